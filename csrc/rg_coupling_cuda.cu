// CUDA kernels of the rg_coupling family, registered for the CUDA dispatch key of the schema
// defined in rg_coupling.cpp (load that library first). Semantics: rgflow_fast/reference.py.
//
// One thread per image pixel; a block covers a chunk of one (b, c) plane. The coupling's
// log-det is reduced per block in shared memory in a fixed order, then per sample with a
// torch sum: no atomics, so results are deterministic.
#include "rg_coupling.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace rgflow_fast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }

// Launch shape: grid.x = B*C planes, grid.y = chunks of a plane (at most 64 blocks of
// kThreads each, looping over the rest of the plane).
dim3 plane_grid(const Geometry& g) {
  const int64_t chunks = (g.L * g.L + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(g.B * g.C), static_cast<unsigned>(chunks < 64 ? chunks : 64));
}

// Pixel loop of one block: calls f(b, c, i, j, pixel offset) for its pixels.
template <typename F>
__device__ __forceinline__ void for_block_pixels(const Geometry& g, F f) {
  const int64_t plane = blockIdx.x;
  const int64_t b = plane / g.C, c = plane % g.C;
  for (int64_t idx = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; idx < g.L * g.L;
       idx += int64_t(gridDim.y) * blockDim.x) {
    f(b, c, idx / g.L, idx % g.L, plane * g.L * g.L + idx);
  }
}

template <typename scalar_t>
__global__ void gather_kernel(Geometry g, const scalar_t* __restrict__ x,
                              scalar_t* __restrict__ patches) {
  for_block_pixels(g, [&](int64_t b, int64_t c, int64_t i, int64_t j, int64_t o) {
    const int64_t p = g.site(b, c, i, j, 0).p;
    if (p >= 0) patches[p] = x[o];
  });
}

template <typename scalar_t>
__global__ void scatter_kernel(Geometry g, const scalar_t* __restrict__ patches,
                               const scalar_t* __restrict__ x, scalar_t* __restrict__ out) {
  for_block_pixels(g, [&](int64_t b, int64_t c, int64_t i, int64_t j, int64_t o) {
    const int64_t p = g.site(b, c, i, j, 0).p;
    out[o] = p >= 0 ? patches[p] : x[o];
  });
}

// One coupling step; partial[plane * gridDim.y + blockIdx.y] = this block's log-det share.
template <typename scalar_t, bool Inverse>
__global__ void coupling_kernel(Geometry g, int64_t parity, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                scalar_t* __restrict__ out, scalar_t* __restrict__ v,
                                at::opmath_type<scalar_t>* __restrict__ partial) {
  using T = at::opmath_type<scalar_t>;
  T acc = 0;
  for_block_pixels(g, [&](int64_t b, int64_t c, int64_t i, int64_t j, int64_t o) {
    const auto [p, transformed] = g.site(b, c, i, j, parity);
    if (!transformed) {
      out[o] = x[o];
      if (v != nullptr && p >= 0) v[p] = scalar_t(0);
      return;
    }
    const T th = tanh_(T(s[p]));
    const T y = coupling_value<Inverse>(T(x[o]), T(t[p]), exp_(Inverse ? -th : th));
    out[o] = scalar_t(y);
    if (v != nullptr) v[p] = scalar_t(y);
    acc += Inverse ? -th : th;
  });
  __shared__ T shared[kThreads];
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x * gridDim.y + blockIdx.y] = shared[0];
}

// Backward of one coupling step, recomputing tanh s and exp from the inputs x, s, t; g_v
// (if not null) adds to g_y on the transformed half.
template <typename scalar_t, bool Inverse>
__global__ void coupling_backward_kernel(Geometry g, int64_t parity,
                                         const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ s,
                                         const scalar_t* __restrict__ t,
                                         const scalar_t* __restrict__ g_y,
                                         const scalar_t* __restrict__ g_ldj,
                                         const scalar_t* __restrict__ g_v,
                                         scalar_t* __restrict__ g_x, scalar_t* __restrict__ g_s,
                                         scalar_t* __restrict__ g_t) {
  using T = at::opmath_type<scalar_t>;
  for_block_pixels(g, [&](int64_t b, int64_t c, int64_t i, int64_t j, int64_t o) {
    const auto [p, transformed] = g.site(b, c, i, j, parity);
    if (!transformed) {
      g_x[o] = g_y[o];
      if (p >= 0) {
        g_s[p] = scalar_t(0);
        g_t[p] = scalar_t(0);
      }
      return;
    }
    const T th = tanh_(T(s[p]));
    const T e = exp_(Inverse ? -th : th);
    const T grad = T(g_y[o]) + (g_v != nullptr ? T(g_v[p]) : T(0));
    T gu, gs, gt;
    coupling_grads<Inverse>(grad, T(g_ldj[b]), T(x[o]), T(t[p]), th, e, gu, gs, gt);
    g_x[o] = scalar_t(gu);
    g_s[p] = scalar_t(gs);
    g_t[p] = scalar_t(gt);
  });
}

#define RG_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor rg_gather_cuda(const at::Tensor& x_, int64_t k, int64_t d, int64_t off) {
  const Geometry g = make_geometry(x_, k, d, off);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  at::Tensor patches = at::empty({g.B * g.P, g.C, k, k}, x.options());
  if (x.numel() == 0) return patches;
  RG_DISPATCH(x.scalar_type(), "rg_gather_cuda", [&] {
    gather_kernel<scalar_t><<<plane_grid(g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g, x.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return patches;
}

at::Tensor rg_scatter_cuda(const at::Tensor& patches_, const at::Tensor& x_, int64_t k, int64_t d,
                           int64_t off) {
  const Geometry g = make_geometry(x_, k, d, off);
  check_patches(patches_, x_, g, "patches");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), patches = patches_.contiguous();
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  RG_DISPATCH(x.scalar_type(), "rg_scatter_cuda", [&] {
    scatter_kernel<scalar_t><<<plane_grid(g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g, patches.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rg_coupling_cuda(
    const at::Tensor& x, const at::Tensor& s, const at::Tensor& t, int64_t k, int64_t d,
    int64_t off, int64_t parity, bool inverse, bool emit) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CouplingStep step = prepare_coupling(x, s, t, k, d, off, parity, emit);
  const Geometry& g = step.g;
  if (x.numel() == 0) return {step.out, at::zeros({g.B}, x.options()), step.v};
  const dim3 grid = plane_grid(g);
  const auto opmath = at::toOpMathType(x.scalar_type());
  at::Tensor partial = at::empty({g.B, g.C * int64_t(grid.y)}, x.options().dtype(opmath));
  RG_DISPATCH(x.scalar_type(), "rg_coupling_cuda", [&] {
    auto kernel = inverse ? coupling_kernel<scalar_t, true> : coupling_kernel<scalar_t, false>;
    kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g, parity, step.x.const_data_ptr<scalar_t>(), step.s.const_data_ptr<scalar_t>(),
        step.t.const_data_ptr<scalar_t>(), step.out.mutable_data_ptr<scalar_t>(),
        emit ? step.v.mutable_data_ptr<scalar_t>() : nullptr,
        partial.mutable_data_ptr<at::opmath_type<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {step.out, partial.sum(1).to(x.scalar_type()), step.v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rg_coupling_backward_cuda(
    const at::Tensor& x, const at::Tensor& s, const at::Tensor& t, const at::Tensor& g_y,
    const at::Tensor& g_ldj, const std::optional<at::Tensor>& g_v, int64_t k, int64_t d,
    int64_t off, int64_t parity, bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CouplingBackward back = prepare_coupling_backward(x, s, t, g_y, g_ldj, g_v, k, d, off, parity);
  if (x.numel() == 0) return {back.grad_x, back.grad_s, back.grad_t};
  RG_DISPATCH(x.scalar_type(), "rg_coupling_backward_cuda", [&] {
    auto kernel = inverse ? coupling_backward_kernel<scalar_t, true>
                          : coupling_backward_kernel<scalar_t, false>;
    kernel<<<plane_grid(back.g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        back.g, parity, back.x.const_data_ptr<scalar_t>(), back.s.const_data_ptr<scalar_t>(),
        back.t.const_data_ptr<scalar_t>(), back.grad_y.const_data_ptr<scalar_t>(),
        back.grad_ldj.const_data_ptr<scalar_t>(),
        back.grad_v.defined() ? back.grad_v.const_data_ptr<scalar_t>() : nullptr,
        back.grad_x.mutable_data_ptr<scalar_t>(), back.grad_s.mutable_data_ptr<scalar_t>(),
        back.grad_t.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {back.grad_x, back.grad_s, back.grad_t};
}

}  // namespace
}  // namespace rgflow_fast

TORCH_LIBRARY_IMPL(rgflow_fast, CUDA, m) {
  m.impl("rg_gather", &rgflow_fast::rg_gather_cuda);
  m.impl("rg_scatter", &rgflow_fast::rg_scatter_cuda);
  m.impl("rg_coupling", &rgflow_fast::rg_coupling_cuda);
  m.impl("rg_coupling_backward", &rgflow_fast::rg_coupling_backward_cuda);
}
