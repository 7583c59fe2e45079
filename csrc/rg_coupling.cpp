// CPU kernels of the rg_coupling family (gather, scatter, fused coupling forward/inverse and
// their backward) and the TORCH_LIBRARY schema of the rgflow_fast ops; the CUDA kernels of
// the same schema live in rg_coupling_cuda.cu. Semantics: rgflow_fast/reference.py.
//
// Every kernel walks the image row by row (B*C*L rows, split across threads with
// at::parallel_for). For a row on the block's lattice it first gathers that row's s, t
// (and masks) from the patch tensors into small buffers, then runs one branch-free loop
// over the row that the compiler vectorises, then scatters any patch-shaped outputs back.
// The log-det is summed per row in the accumulate type and then per sample in row order, so
// every result is bitwise identical for any number of threads.
#include "rg_coupling.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace rgflow_fast {
namespace {

// Lattice coordinate of every image row/column (-1 off the lattice), and the column part of
// the patch offset of every lattice column.
struct Tables {
  std::vector<int64_t> q, col;
  explicit Tables(const Geometry& g) : q(g.L), col(g.L) {
    for (int64_t i = 0; i < g.L; ++i) {
      q[i] = g.lattice(i);
      col[i] = q[i] < 0 ? 0 : g.col_offset(q[i]);
    }
  }
};

// Rows per task: enough work per thread to pay for the fork.
int64_t grain(const Geometry& g) { return std::max<int64_t>(1, 32768 / g.L); }

template <typename scalar_t>
void gather_kernel(const Geometry& g, const scalar_t* x, scalar_t* patches) {
  const Tables tab(g);
  at::parallel_for(0, g.B * g.C * g.L, grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t qi = tab.q[r % g.L];
      if (qi < 0) continue;
      const int64_t base = g.row_offset(r / (g.C * g.L), r / g.L % g.C, qi);
      const scalar_t* xr = x + r * g.L;
      for (int64_t j = 0; j < g.L; ++j) {
        if (tab.q[j] >= 0) patches[base + tab.col[j]] = xr[j];
      }
    }
  });
}

template <typename scalar_t>
void scatter_kernel(const Geometry& g, const scalar_t* patches, const scalar_t* x, scalar_t* out) {
  const Tables tab(g);
  at::parallel_for(0, g.B * g.C * g.L, grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * g.L;
      scalar_t* outr = out + r * g.L;
      std::copy(xr, xr + g.L, outr);
      const int64_t qi = tab.q[r % g.L];
      if (qi < 0) continue;
      const int64_t base = g.row_offset(r / (g.C * g.L), r / g.L % g.C, qi);
      for (int64_t j = 0; j < g.L; ++j) {
        if (tab.q[j] >= 0) outr[j] = patches[base + tab.col[j]];
      }
    }
  });
}

// The elementwise part of one row of a step, over buffers gathered from the patch tensors
// (mask 1 where the step transforms; s, t there, 0 elsewhere). Separate functions with
// restrict pointers and no branches (selects computed from finished values: GCC leaves
// `mask ? f(..) : u` as a branch), so that the compiler vectorises them. Where GCC can, they
// are compiled twice, for x86-64-v3 (AVX2 + FMA: ~3x faster, chosen at load time on CPUs
// that have it) and for the baseline; `flatten` inlines the math into each clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define RG_VECTOR_ROW __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define RG_VECTOR_ROW
#endif

template <bool Inverse, typename scalar_t, typename T>
RG_VECTOR_ROW void forward_row(int64_t L, const scalar_t* __restrict__ x, const T* __restrict__ mask,
                 const T* __restrict__ s, const T* __restrict__ t, scalar_t* __restrict__ out,
                 T* __restrict__ th_out) {
  for (int64_t j = 0; j < L; ++j) {
    const T u = x[j];
    const T th = Math<T>::tanh(s[j]);
    const T e = Math<T>::exp(Inverse ? -th : th);
    const T y = coupling_value<Inverse>(u, t[j], e);
    out[j] = mask[j] != T(0) ? y : u;
    th_out[j] = th;
  }
}

template <bool Inverse, typename scalar_t, typename T>
RG_VECTOR_ROW void backward_row(int64_t L, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g_y,
                  const T* __restrict__ mask, const T* __restrict__ s, const T* __restrict__ t,
                  const T* __restrict__ g_v, T g_ldj, scalar_t* __restrict__ g_x,
                  T* __restrict__ g_s, T* __restrict__ g_t) {
  for (int64_t j = 0; j < L; ++j) {
    const T gy = g_y[j];
    const T th = Math<T>::tanh(s[j]);
    const T e = Math<T>::exp(Inverse ? -th : th);
    T gu, gs, gt;
    coupling_grads<Inverse>(gy + g_v[j], g_ldj, T(x[j]), t[j], th, e, gu, gs, gt);
    g_x[j] = mask[j] != T(0) ? gu : gy;
    // products, not more selects: with three selects GCC gives up on the loop
    g_s[j] = mask[j] * gs;
    g_t[j] = mask[j] * gt;
  }
}

// One coupling step: out = the image after the step, row_ldj[r] = the step's log-det on row r,
// v (if not null) = the patches of out on the transformed half and zero elsewhere.
template <typename scalar_t, bool Inverse>
void coupling_kernel(const Geometry& g, int64_t parity, const scalar_t* x, const scalar_t* s,
                     const scalar_t* t, scalar_t* out, scalar_t* v,
                     at::acc_type<scalar_t, false>* row_ldj) {
  using T = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, false>;
  const Tables tab(g);
  const int64_t L = g.L;
  at::parallel_for(0, g.B * g.C * L, grain(g), [&](int64_t begin, int64_t end) {
    std::vector<T> buffers(4 * L);
    T* __restrict__ mask = buffers.data();  // 1 where the step transforms
    T* __restrict__ s_row = mask + L;       // s, t there, 0 elsewhere
    T* __restrict__ t_row = s_row + L;
    T* __restrict__ th_row = t_row + L;  // tanh s
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ xr = x + r * L;
      scalar_t* __restrict__ outr = out + r * L;
      const int64_t qi = tab.q[r % L];
      if (qi < 0) {
        std::copy(xr, xr + L, outr);
        row_ldj[r] = 0;
        continue;
      }
      const int64_t base = g.row_offset(r / (g.C * L), r / L % g.C, qi);
      for (int64_t j = 0; j < L; ++j) {
        const bool on = tab.q[j] >= 0 && Geometry::transformed(qi, tab.q[j], parity);
        mask[j] = on ? T(1) : T(0);
        s_row[j] = on ? T(s[base + tab.col[j]]) : T(0);
        t_row[j] = on ? T(t[base + tab.col[j]]) : T(0);
      }
      forward_row<Inverse>(L, xr, mask, s_row, t_row, outr, th_row);
      acc_t sum = 0;
      for (int64_t j = 0; j < L; ++j) sum += th_row[j];
      row_ldj[r] = Inverse ? -sum : sum;
      if (v != nullptr) {
        for (int64_t j = 0; j < L; ++j) {
          if (tab.q[j] >= 0) v[base + tab.col[j]] = mask[j] != T(0) ? outr[j] : scalar_t(0);
        }
      }
    }
  });
}

// Backward of one coupling step, recomputing tanh s and exp from the step's inputs x, s, t.
// g_v (if not null) is the gradient of the emitted patches; it adds to g_y on the transformed half.
template <typename scalar_t, bool Inverse>
void coupling_backward_kernel(const Geometry& g, int64_t parity, const scalar_t* x,
                              const scalar_t* s, const scalar_t* t, const scalar_t* g_y,
                              const scalar_t* g_ldj, const scalar_t* g_v, scalar_t* g_x,
                              scalar_t* g_s, scalar_t* g_t) {
  using T = at::opmath_type<scalar_t>;
  const Tables tab(g);
  const int64_t L = g.L;
  at::parallel_for(0, g.B * g.C * L, grain(g), [&](int64_t begin, int64_t end) {
    std::vector<T> buffers(6 * L);
    T* __restrict__ mask = buffers.data();
    T* __restrict__ s_row = mask + L;
    T* __restrict__ t_row = s_row + L;
    T* __restrict__ gv_row = t_row + L;
    T* __restrict__ gs_row = gv_row + L;
    T* __restrict__ gt_row = gs_row + L;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ xr = x + r * L;
      const scalar_t* __restrict__ gyr = g_y + r * L;
      scalar_t* __restrict__ gxr = g_x + r * L;
      const int64_t qi = tab.q[r % L];
      if (qi < 0) {
        std::copy(gyr, gyr + L, gxr);
        continue;
      }
      const int64_t b = r / (g.C * L);
      const int64_t base = g.row_offset(b, r / L % g.C, qi);
      const T gl = g_ldj[b];
      for (int64_t j = 0; j < L; ++j) {
        const bool on = tab.q[j] >= 0 && Geometry::transformed(qi, tab.q[j], parity);
        const int64_t o = base + tab.col[j];
        mask[j] = on ? T(1) : T(0);
        s_row[j] = on ? T(s[o]) : T(0);
        t_row[j] = on && Inverse ? T(t[o]) : T(0);
        gv_row[j] = on && g_v != nullptr ? T(g_v[o]) : T(0);
      }
      backward_row<Inverse>(L, xr, gyr, mask, s_row, t_row, gv_row, gl, gxr, gs_row, gt_row);
      for (int64_t j = 0; j < L; ++j) {
        if (tab.q[j] >= 0) {
          g_s[base + tab.col[j]] = gs_row[j];
          g_t[base + tab.col[j]] = gt_row[j];
        }
      }
    }
  });
}

#define RG_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor rg_gather_cpu(const at::Tensor& x_, int64_t k, int64_t d, int64_t off) {
  const Geometry g = make_geometry(x_, k, d, off);
  const at::Tensor x = x_.contiguous();
  at::Tensor patches = at::empty({g.B * g.P, g.C, k, k}, x.options());
  RG_DISPATCH(x.scalar_type(), "rg_gather_cpu", [&] {
    gather_kernel<scalar_t>(g, x.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>());
  });
  return patches;
}

at::Tensor rg_scatter_cpu(const at::Tensor& patches_, const at::Tensor& x_, int64_t k, int64_t d,
                          int64_t off) {
  const Geometry g = make_geometry(x_, k, d, off);
  check_patches(patches_, x_, g, "patches");
  const at::Tensor x = x_.contiguous(), patches = patches_.contiguous();
  at::Tensor out = at::empty_like(x);
  RG_DISPATCH(x.scalar_type(), "rg_scatter_cpu", [&] {
    scatter_kernel<scalar_t>(g, patches.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rg_coupling_cpu(
    const at::Tensor& x, const at::Tensor& s, const at::Tensor& t, int64_t k, int64_t d,
    int64_t off, int64_t parity, bool inverse, bool emit) {
  const CouplingStep step = prepare_coupling(x, s, t, k, d, off, parity, emit);
  const Geometry& g = step.g;
  at::Tensor ldj = at::empty({g.B}, x.options());
  RG_DISPATCH(x.scalar_type(), "rg_coupling_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    std::vector<acc_t> row_ldj(g.B * g.C * g.L);
    auto kernel = inverse ? coupling_kernel<scalar_t, true> : coupling_kernel<scalar_t, false>;
    kernel(g, parity, step.x.const_data_ptr<scalar_t>(), step.s.const_data_ptr<scalar_t>(),
           step.t.const_data_ptr<scalar_t>(), step.out.mutable_data_ptr<scalar_t>(),
           emit ? step.v.mutable_data_ptr<scalar_t>() : nullptr, row_ldj.data());
    scalar_t* ldj_ptr = ldj.mutable_data_ptr<scalar_t>();
    const int64_t rows_per_sample = g.C * g.L;
    for (int64_t b = 0; b < g.B; ++b) {
      acc_t sum = 0;
      for (int64_t r = 0; r < rows_per_sample; ++r) sum += row_ldj[b * rows_per_sample + r];
      ldj_ptr[b] = static_cast<scalar_t>(sum);
    }
  });
  return {step.out, ldj, step.v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rg_coupling_backward_cpu(
    const at::Tensor& x, const at::Tensor& s, const at::Tensor& t, const at::Tensor& g_y,
    const at::Tensor& g_ldj, const std::optional<at::Tensor>& g_v, int64_t k, int64_t d,
    int64_t off, int64_t parity, bool inverse) {
  const CouplingBackward back = prepare_coupling_backward(x, s, t, g_y, g_ldj, g_v, k, d, off, parity);
  RG_DISPATCH(x.scalar_type(), "rg_coupling_backward_cpu", [&] {
    auto kernel = inverse ? coupling_backward_kernel<scalar_t, true>
                          : coupling_backward_kernel<scalar_t, false>;
    kernel(back.g, parity, back.x.const_data_ptr<scalar_t>(), back.s.const_data_ptr<scalar_t>(),
           back.t.const_data_ptr<scalar_t>(), back.grad_y.const_data_ptr<scalar_t>(),
           back.grad_ldj.const_data_ptr<scalar_t>(),
           back.grad_v.defined() ? back.grad_v.const_data_ptr<scalar_t>() : nullptr,
           back.grad_x.mutable_data_ptr<scalar_t>(), back.grad_s.mutable_data_ptr<scalar_t>(),
           back.grad_t.mutable_data_ptr<scalar_t>());
  });
  return {back.grad_x, back.grad_s, back.grad_t};
}

}  // namespace
}  // namespace rgflow_fast

// The schema, shared by the CPU and CUDA implementations (the same as OP_SCHEMAS in
// rgflow_fast/backends.py, which registers their autograd formulas and fake kernels).
TORCH_LIBRARY(rgflow_fast, m) {
  m.def("rg_gather(Tensor x, int kernel_size, int dilation, int offset) -> Tensor");
  m.def(
      "rg_scatter(Tensor patches, Tensor x, int kernel_size, int dilation, int offset) -> Tensor");
  m.def(
      "rg_coupling(Tensor x, Tensor s, Tensor t, int kernel_size, int dilation, int offset, "
      "int parity, bool inverse, bool emit) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rg_coupling_backward(Tensor x, Tensor s, Tensor t, Tensor grad_y, Tensor grad_ldj, "
      "Tensor? grad_v, int kernel_size, int dilation, int offset, int parity, bool inverse) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rgflow_fast, CPU, m) {
  m.impl("rg_gather", &rgflow_fast::rg_gather_cpu);
  m.impl("rg_scatter", &rgflow_fast::rg_scatter_cpu);
  m.impl("rg_coupling", &rgflow_fast::rg_coupling_cpu);
  m.impl("rg_coupling_backward", &rgflow_fast::rg_coupling_backward_cpu);
}
