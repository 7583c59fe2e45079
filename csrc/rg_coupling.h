// Shared by the CPU (rg_coupling.cpp) and CUDA (rg_coupling_cuda.cu) kernels of the
// rg_coupling family: block geometry, the coupling formulas, the CPU's vectorisable math, and
// the host-side input checks and output allocation of every op (written once here, so both
// devices check the same). Other CPU kernel families may use the math too.
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

  // Where pixel (i, j) of image plane (b, c) sits: its offset in the patch tensor (-1 when no
  // patch holds it) and whether a step with this parity transforms it.
  struct Site {
    int64_t p;
    bool transformed;
  };
  RG_HOST_DEVICE Site site(int64_t b, int64_t c, int64_t i, int64_t j, int64_t parity) const {
    const int64_t qi = lattice(i), qj = lattice(j);
    if (qi < 0 || qj < 0) return {-1, false};
    return {row_offset(b, c, qi) + col_offset(qj), transformed(qi, qj, parity)};
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

#ifndef __CUDACC__
#include <cmath>
#include <cstring>

namespace rgflow_fast {

// --- CPU math: tanh and exp that vectorise (no libm calls in float) -------------------------

// e^x - 1 in float without libm calls, so that loops over it vectorise. e^x = 2^n e^r with
// n = round(x / ln 2), |r| <= ln2 / 2, and e^r - 1 by its Taylor series to degree 7
// (remainder < 6e-9, below float rounding); accurate relative to the result near 0 too.
// x is clamped to [-87, 87] (so 2^n stays a normal float); NaN passes through.
inline float expm1_fast(float x) {
  float xc = x < -87.f ? -87.f : (x > 87.f ? 87.f : x);
  xc = x == x ? xc : 0.f;
  const float shift = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (xc * 1.44269504088896341f + shift) - shift;
  // ln 2 = 0.693359375 - 2.12194440e-4, the first part short enough that n * it is exact
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  const float em1_r = p * r;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;  // 2^n
  std::memcpy(&scale, &bits, sizeof scale);
  const float out = scale * em1_r + (scale - 1.f);
  return x == x ? out : x;
}

// tanh x = -expm1(-2|x|) / (2 + expm1(-2|x|)), with the sign of x.
inline float tanh_fast(float x) {
  const float em1 = expm1_fast(-2.f * std::fabs(x));
  return std::copysign(-em1 / (2.f + em1), x);
}

// The math of the compute type: vectorisable float versions, libm for double.
template <typename T>
struct Math;
template <>
struct Math<float> {
  static float tanh(float x) { return tanh_fast(x); }
  static float exp(float x) { return 1.f + expm1_fast(x); }
};
template <>
struct Math<double> {
  static double tanh(double x) { return std::tanh(x); }
  static double exp(double x) { return std::exp(x); }
};

}  // namespace rgflow_fast
#endif  // __CUDACC__

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

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

// Checks that t has shape `sizes` (`shape` names them, e.g. "(B*P, C, k, k)") and the image's
// dtype and device.
inline void check_like(const at::Tensor& t, at::IntArrayRef sizes, const char* shape,
                       const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "rgflow_fast: ", name, " must have shape ", shape, " = ", sizes,
              " and the image's dtype and device (", x.scalar_type(), ", ", x.device(), "); got ",
              t.sizes(), " (", t.scalar_type(), ", ", t.device(), ")");
}

// Checks a patch tensor (B*P, C, k, k) of the image.
inline void check_patches(const at::Tensor& p, const at::Tensor& x, const Geometry& g,
                          const char* name) {
  check_like(p, {g.B * g.P, g.C, g.k, g.k}, "(B*P, C, k, k)", x, name);
}

inline void check_parity(int64_t parity) {
  TORCH_CHECK(parity == 0 || parity == 1, "rgflow_fast: parity must be 0 or 1; got ", parity);
}

// One coupling step (rg_coupling): checked, contiguous inputs and allocated outputs.
struct CouplingStep {
  Geometry g;
  at::Tensor x, s, t;  // contiguous
  at::Tensor out, v;   // out (B, C, L, L); v (B*P, C, k, k) if emit, else empty
};

inline CouplingStep prepare_coupling(const at::Tensor& x, const at::Tensor& s, const at::Tensor& t,
                                     int64_t k, int64_t d, int64_t off, int64_t parity, bool emit) {
  const Geometry g = make_geometry(x, k, d, off);
  check_patches(s, x, g, "s");
  check_patches(t, x, g, "t");
  check_parity(parity);
  CouplingStep step{g, x.contiguous(), s.contiguous(), t.contiguous(), {}, {}};
  step.out = at::empty_like(step.x);
  step.v = emit ? at::empty_like(step.s) : at::empty({0}, x.options());
  return step;
}

// The backward of one step (rg_coupling_backward): checked, contiguous inputs (grad_v
// undefined when absent) and allocated gradients.
struct CouplingBackward {
  Geometry g;
  at::Tensor x, s, t, grad_y, grad_ldj, grad_v;  // contiguous
  at::Tensor grad_x, grad_s, grad_t;
};

inline CouplingBackward prepare_coupling_backward(
    const at::Tensor& x, const at::Tensor& s, const at::Tensor& t, const at::Tensor& grad_y,
    const at::Tensor& grad_ldj, const std::optional<at::Tensor>& grad_v, int64_t k, int64_t d,
    int64_t off, int64_t parity) {
  const Geometry g = make_geometry(x, k, d, off);
  check_patches(s, x, g, "s");
  check_patches(t, x, g, "t");
  check_parity(parity);
  check_like(grad_y, x.sizes(), "(B, C, L, L)", x, "grad_y");
  check_like(grad_ldj, {g.B}, "(B,)", x, "grad_ldj");
  if (grad_v.has_value()) check_patches(*grad_v, x, g, "grad_v");
  CouplingBackward back{g, x.contiguous(), s.contiguous(), t.contiguous(), grad_y.contiguous(),
                        grad_ldj.contiguous(),
                        grad_v.has_value() ? grad_v->contiguous() : at::Tensor(), {}, {}, {}};
  back.grad_x = at::empty_like(back.x);
  back.grad_s = at::empty_like(back.s);
  back.grad_t = at::empty_like(back.t);
  return back;
}

}  // namespace rgflow_fast
