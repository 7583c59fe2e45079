// Shared by the CPU (rg_coupling.cpp) and CUDA (rg_coupling_cuda.cu) kernels of the
// rg_coupling family: block geometry, the coupling formulas, and host-side input checks.
//
// Geometry (see rgflow_fast/geometry.py): an image (B, C, L, L), a block with kernel k
// (even), dilation d and offset off has m = L/(k*d) patches per side, P = m*m per image.
// Image row i is on the block's lattice when (i - off) mod L is a multiple of d; its lattice
// coordinate q = ((i - off) mod L) / d = pi*k + a names the patch row pi and the row a inside
// the patch (columns alike). Every patch element is exactly one lattice pixel, so gather and
// scatter are bijections between patch elements and lattice pixels, and a kernel that walks
// the image writes each patch element exactly once.
//
// Coupling step with parity p at a transformed element (a + b + p odd), th = tanh(s):
//   forward  y = x * exp(th) + t,      ldj += th
//   inverse  x = (y - t) * exp(-th),   ldj -= th
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define RG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RG_HOST_DEVICE inline
#endif

namespace rgflow_fast {

struct Geometry {
  int64_t B, C, L, k, d, off, m, P;

  // Lattice coordinate of image row (or column) i, or -1 when the block does not touch it.
  RG_HOST_DEVICE int64_t lattice(int64_t i) const {
    int64_t r = (i - off) % L;
    r += r < 0 ? L : 0;
    return r % d ? -1 : r / d;
  }

  // Offset in the patch tensor (B*P, C, k, k) of image (b, c) at lattice coordinates
  // (qi, qj): row_offset(b, c, qi) + col_offset(qj), so a kernel can hoist the row part.
  RG_HOST_DEVICE int64_t row_offset(int64_t b, int64_t c, int64_t qi) const {
    return ((b * P + (qi / k) * m) * C + c) * k * k + (qi % k) * k;
  }
  RG_HOST_DEVICE int64_t col_offset(int64_t qj) const { return (qj / k) * C * k * k + qj % k; }

  // Whether a step with this parity transforms lattice pixel (qi, qj): a + b + parity odd
  // (k is even, so a = qi mod k has the parity of qi).
  RG_HOST_DEVICE static bool transformed(int64_t qi, int64_t qj, int64_t parity) {
    return ((qi + qj + parity) & 1) != 0;
  }
};

// Output of one step at a transformed element; e = exp(th) forward, exp(-th) inverse.
template <bool Inverse, typename T>
RG_HOST_DEVICE T coupling_value(T u, T t, T e) {
  return Inverse ? (u - t) * e : u * e + t;
}

// Gradients of one step at a transformed element, from the output gradient g, the log-det
// gradient gl and the step's input u. d(out)/d(th) is u*e forward and -(u - t)*e inverse;
// d(ldj)/d(th) is +1 forward and -1 inverse; d(th)/ds = 1 - th^2.
template <bool Inverse, typename T>
RG_HOST_DEVICE void coupling_grads(T g, T gl, T u, T t, T th, T e, T& gu, T& gs, T& gt) {
  const T dth = Inverse ? -(g * (u - t) * e + gl) : g * u * e + gl;
  gu = g * e;
  gt = Inverse ? -gu : g;
  gs = dth * (T(1) - th * th);
}

}  // namespace rgflow_fast

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace rgflow_fast {

// Checks an image (B, C, L, L) and the block parameters; returns the block's geometry.
inline Geometry make_geometry(const at::Tensor& x, int64_t k, int64_t d, int64_t off) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) == x.size(3),
              "rgflow_fast: the image must have shape (B, C, L, L); got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "rgflow_fast: the image must be floating point; got ",
              x.scalar_type());
  TORCH_CHECK(k >= 2 && k % 2 == 0, "rgflow_fast: kernel_size must be even and >= 2; got ", k);
  TORCH_CHECK(d >= 1, "rgflow_fast: dilation must be >= 1; got ", d);
  const int64_t L = x.size(2);
  TORCH_CHECK(L % (k * d) == 0, "rgflow_fast: image size ", L,
              " must be a multiple of kernel_size*dilation = ", k * d);
  const int64_t m = L / (k * d);
  return Geometry{x.size(0), x.size(1), L, k, d, off, m, m * m};
}

// Checks that a patch tensor has shape (B*P, C, k, k) and the image's dtype and device.
inline void check_patches(const at::Tensor& p, const at::Tensor& x, const Geometry& g,
                          const char* name) {
  TORCH_CHECK(p.dim() == 4 && p.size(0) == g.B * g.P && p.size(1) == g.C && p.size(2) == g.k &&
                  p.size(3) == g.k,
              "rgflow_fast: ", name, " must have shape (B*P, C, k, k) = (", g.B * g.P, ", ", g.C,
              ", ", g.k, ", ", g.k, "); got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() && p.device() == x.device(), "rgflow_fast: ",
              name, " (", p.scalar_type(), ", ", p.device(), ") must match the image (",
              x.scalar_type(), ", ", x.device(), ")");
}

inline void check_parity(int64_t parity) {
  TORCH_CHECK(parity == 0 || parity == 1, "rgflow_fast: parity must be 0 or 1; got ", parity);
}

}  // namespace rgflow_fast
