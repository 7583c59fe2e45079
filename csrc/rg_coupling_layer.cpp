// rg_coupling_layer on the CPU: one whole RNVP coupling layer (both checkerboard steps, the S
// and T residual-MLP conditioners with weight norm, Swish, √2 residual and σ scale, the
// tanh-clamped affine coupling and the log-det) in one op, forward, inverse and backward.
// The maths and the flat parameter layout: rgflow_fast/coupling_layer.py.
//
// Work is cut into tiles of tile_rows(N) patch rows. A tile runs through the whole layer with its
// activations in cache: every matrix product is one call of a small-matrix kernel on the tile
// (float: this file's AVX2 kernel or oneDNN's micro-kernel, see Products; double: BLAS),
// followed by one fused elementwise pass (bias + Swish, on AVX2 intrinsics in float where the
// CPU has them: avx2_swish; or bias + residual + √2). Inside a call the features run
// permuted so that each step's kept and transformed halves are contiguous (Problem). Tiles are
// fixed whatever the thread count (a layer of one tile runs its two nets on two threads
// instead), and parameter gradients are summed per chunk of tiles and then over chunks in
// order, so results are bitwise the same for any number of threads.
//
// Ops (namespace rgflow_fast):
//   rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute) -> (y, ldj)     autograd here
//   rg_coupling_layer_forward(u, ldj, params, n_mlp, inverse, store) -> (y, ldj, acts)
//   rg_coupling_layer_backward(u, acts, params, grad_y, grad_ldj, n_mlp, inverse)
//       -> (grad_u, grad_params)       acts empty: recompute each tile's activations first
//   rg_coupling_layer_cpu_products() -> the float product kernels here, auto's first
//   rg_coupling_layer_cpu_activation_cache(release) -> [live, kept] bytes of saved activations,
//       then frees the kept ones when release (ActivationCache)

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <c10/core/impl/alloc_cpu.h>

#include "rg_coupling.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

// BLAS as torch links it (MKL or OpenBLAS export the Fortran symbols); weak, so that a torch
// without them still loads the extension and the op says what is missing.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace rgflow_fast {
namespace {

using at::Tensor;

// Rows per tile of an N-row layer, a function of N alone (never of the thread count, so that
// results do not depend on it): 64 rows keep a tile's backward working set (8 buffers of
// rows × width) in L2, and the micro-kernel products are as fast on them as on bigger tiles;
// below 256 rows, 32, so that the model's 64-row layers have two tiles for two threads.
int64_t tile_rows(int64_t N) { return N >= 256 ? 64 : 32; }
// Parameter gradients are accumulated in at most this many chunk buffers (a fixed number, not
// the thread count, so that the summation order never depends on the machine): as many
// threads share a backward; each chunk costs one zeroed copy of the parameters' size.
constexpr int64_t kMaxChunks = 8;

// The Fortran gemm of type T, or nullptr when torch exports none.
template <typename T>
using GemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                        const T*, const int*, const T*, T*, const int*);
template <typename T>
GemmFn<T> blas_gemm();
template <>
GemmFn<float> blas_gemm<float>() { return sgemm_; }
template <>
GemmFn<double> blas_gemm<double>() { return dgemm_; }

// Column-major C (m×n) = alpha·op(A)·op(B) + beta·C.
template <typename T>
void gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
          int ldc) {
  blas_gemm<T>()(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// oneDNN's batch-reduce GEMM micro-kernel, which torch exports for float on x86 (row-major,
// C (M×N) [+]= A (M×K) · B (K×N)). It uses the CPU's widest vector units whoever made the
// CPU, where MKL runs generic code on some (AMD's with AVX-512: benchmarks/RESULTS.md).
// Probed once.
bool brgemm_usable() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static const bool usable = [] {
    try {
      float a = 1.f, b = 1.f, c = 0.f;
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
      return c == 1.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return usable;
#else
  return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define RGF_AVX2_KERNEL 1
#endif

// What runs the float products of a call (double always runs on BLAS):
//   avx2    this file's AVX2/FMA register-blocked kernel (below)
//   onednn  oneDNN's micro-kernel
//   blas    torch's BLAS
// "auto": oneDNN where the CPU has AVX-512 (its AVX-512 code beats a 256-bit kernel), else
// avx2 where the CPU has AVX2 and FMA (there it matches or beats oneDNN's AVX2 code on these
// tiles, whose speed also varied more from run to run: benchmarks/RESULTS.md), else oneDNN,
// else BLAS. The environment variable RGFLOW_FAST_CPU_PRODUCTS overrides the choice per call.
enum class Products { kAvx2, kOneDnn, kBlas };

bool cpu_has_avx2_fma() {
#ifdef RGF_AVX2_KERNEL
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

Products auto_products() {
  static const Products chosen = [] {
#ifdef RGF_AVX2_KERNEL
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f");
#else
    const bool avx512 = false;
#endif
    if (avx512 && brgemm_usable()) return Products::kOneDnn;
    if (cpu_has_avx2_fma()) return Products::kAvx2;
    return brgemm_usable() ? Products::kOneDnn : Products::kBlas;
  }();
  return chosen;
}

const char* products_name(Products how) {
  return how == Products::kAvx2 ? "avx2" : how == Products::kOneDnn ? "onednn" : "blas";
}

// The float product kernels this machine runs, the one "auto" picks first.
std::vector<std::string> cpu_products() {
  std::vector<std::string> names{products_name(auto_products())};
  for (Products how : {Products::kAvx2, Products::kOneDnn, Products::kBlas}) {
    const bool runs = how == Products::kAvx2 ? cpu_has_avx2_fma()
                      : how == Products::kOneDnn ? brgemm_usable()
                                                 : blas_gemm<float>() != nullptr;
    if (runs && how != auto_products()) names.push_back(products_name(how));
  }
  return names;
}

Products float_products() {
  const char* env = std::getenv("RGFLOW_FAST_CPU_PRODUCTS");
  const std::string want = env ? env : "auto";
  if (want == "auto") return auto_products();
  if (want == "avx2") {
    TORCH_CHECK(cpu_has_avx2_fma(), "RGFLOW_FAST_CPU_PRODUCTS=avx2: this CPU has no AVX2/FMA; unset it or use 'auto'");
    return Products::kAvx2;
  }
  if (want == "onednn") {
    TORCH_CHECK(brgemm_usable(),
                "RGFLOW_FAST_CPU_PRODUCTS=onednn: this torch or CPU has no usable oneDNN micro-kernel; unset it or "
                "use 'auto'");
    return Products::kOneDnn;
  }
  TORCH_CHECK(want == "blas", "RGFLOW_FAST_CPU_PRODUCTS must be 'auto', 'avx2', 'onednn' or 'blas'; got '", want, "'");
  return Products::kBlas;
}

#ifdef RGF_AVX2_KERNEL
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// One register block of the AVX2 kernel: C (MR × 8·NV) [+]= A' (MR × K) · B (K × 8·NV), with
// A'(i, k) = A[i·ars + k·acs]; the last 8 columns masked when Masked (a panel's ragged end).
// 6 × 16 keeps 12 accumulators, 2 rows of B and a broadcast in the 16 ymm registers.
template <int MR, int NV, bool Masked>
inline __attribute__((always_inline)) void avx2_block(int64_t K, const float* A, int64_t ars, int64_t acs,
                                                      const float* B, int64_t ldb, float* C, int64_t ldc, bool add,
                                                      __m256i mask, const float* prefetch) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const bool ragged = Masked && v == NV - 1;
      acc[i][v] = !add ? _mm256_setzero_ps()
                       : ragged ? _mm256_maskload_ps(C + i * ldc + 8 * v, mask) : _mm256_loadu_ps(C + i * ldc + 8 * v);
    }
  for (int64_t k = 0; k < K; ++k) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(prefetch + k * ldb), _MM_HINT_T0);
    __m256 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      b[v] = Masked && v == NV - 1 ? _mm256_maskload_ps(B + k * ldb + 8 * v, mask) : _mm256_loadu_ps(B + k * ldb + 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * ars + k * acs);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      if (Masked && v == NV - 1)
        _mm256_maskstore_ps(C + i * ldc + 8 * v, mask, acc[i][v]);
      else
        _mm256_storeu_ps(C + i * ldc + 8 * v, acc[i][v]);
    }
}

// One panel of up to 8·NV columns over all M rows: blocks of 6 rows, then the rest.
template <int NV, bool Masked>
inline __attribute__((always_inline)) void avx2_panel(int64_t M, int64_t K, const float* A, int64_t ars, int64_t acs,
                                                      const float* B, int64_t ldb, float* C, int64_t ldc, bool add,
                                                      __m256i mask, const float* next) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    avx2_block<6, NV, Masked>(K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, add, mask, i == 0 ? next : nullptr);
  if (i != 0) next = nullptr;  // the panel's first block prefetched the next one
  const float* a = A + i * ars;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: return avx2_block<5, NV, Masked>(K, a, ars, acs, B, ldb, c, ldc, add, mask, next);
    case 4: return avx2_block<4, NV, Masked>(K, a, ars, acs, B, ldb, c, ldc, add, mask, next);
    case 3: return avx2_block<3, NV, Masked>(K, a, ars, acs, B, ldb, c, ldc, add, mask, next);
    case 2: return avx2_block<2, NV, Masked>(K, a, ars, acs, B, ldb, c, ldc, add, mask, next);
    case 1: return avx2_block<1, NV, Masked>(K, a, ars, acs, B, ldb, c, ldc, add, mask, next);
    default: return;
  }
}

// C (M×N, ldc) [+]= A' (M×K) · B (K×N, ldb), A'(i, k) = A[i·ars + k·acs]: A row-major
// (ars = lda, acs = 1) or transposed (ars = 1, acs = lda) with no copy. Panels of 16 columns,
// the ragged last one masked; each panel of B (K × 16) stays in L1 while the rows go by.
void avx2_product(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool add) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j = 0; j < N; j += 16) {
    const int64_t nr = std::min<int64_t>(16, N - j);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nr > 8 ? nr - 8 : nr)), lanes);
    const float* b = B + j;
    float* c = C + j;
    const float* next = j + 16 < N ? b + 16 : nullptr;
    if (nr == 16)
      avx2_panel<2, false>(M, K, A, ars, acs, b, ldb, c, ldc, add, mask, next);
    else if (nr > 8)
      avx2_panel<2, true>(M, K, A, ars, acs, b, ldb, c, ldc, add, mask, next);
    else if (nr == 8)
      avx2_panel<1, false>(M, K, A, ars, acs, b, ldb, c, ldc, add, mask, next);
    else
      avx2_panel<1, true>(M, K, A, ars, acs, b, ldb, c, ldc, add, mask, next);
  }
}

// σ(x) = 1 / (1 + e^-x) on 8 floats, e^y = 2^n · p(r) with n = round(y / ln 2), r = y - n ln 2
// (|r| ≤ ln 2 / 2) and p the degree-6 Taylor polynomial (relative error below 1.3e-7), 2^n
// added straight into p's exponent bits. y is clamped to [-87, 88], beyond which σ is 0 or 1
// in float; a NaN x gives a finite σ, and Swish's factor h carries the NaN on. Half the
// instructions of rg_coupling.h's expm1, which is exact near 0 and keeps NaN, and written
// out because the compiler's vectorised version of the same was no faster.
inline __attribute__((always_inline)) __m256 avx2_sigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f), shift = _mm256_set1_ps(12582912.f);  // 1.5 · 2^23
  const __m256 y = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), _mm256_set1_ps(-87.f)),
                                 _mm256_set1_ps(88.f));
  const __m256 t = _mm256_fmadd_ps(y, _mm256_set1_ps(1.44269504088896341f), shift);  // low bits: n
  const __m256 n = _mm256_sub_ps(t, shift);
  // ln 2 = 0.693359375 - 2.12194440e-4, the first part short enough that n times it is exact
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f),
                                    _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), y));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 720.f), r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, one);
  p = _mm256_fmadd_ps(p, r, one);
  // t's bits are shift's plus n: shifted left by 23, shift's drop out and n · 2^23 is left
  const __m256 e = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  return _mm256_div_ps(one, _mm256_add_ps(one, e));
}

// swish (below) on avx2_sigmoid over a (rows × w) block, the last 8 columns of a row masked
// when w is not a multiple of 8: h += bias when bias, a = h · σ(β h), sigmoid = σ(β h) when
// sigmoid.
void avx2_swish(int64_t rows, int64_t w, float* h, const float* bias, const float* beta, float* a, float* sigmoid) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(w % 8)), lanes);
  for (int64_t row = 0; row < rows; ++row) {
    float* hr = h + row * w;
    float* ar = a + row * w;
    float* sr = sigmoid ? sigmoid + row * w : nullptr;
    for (int64_t j = 0; j < w; j += 8) {
      const bool tail = j + 8 > w;
      const auto load = [&](const float* x) { return tail ? _mm256_maskload_ps(x, mask) : _mm256_loadu_ps(x); };
      const auto store = [&](float* x, __m256 v) { tail ? _mm256_maskstore_ps(x, mask, v) : _mm256_storeu_ps(x, v); };
      __m256 hv = load(hr + j);
      if (bias) {
        hv = _mm256_add_ps(hv, load(bias + j));
        store(hr + j, hv);
      }
      const __m256 sg = avx2_sigmoid(_mm256_mul_ps(load(beta + j), hv));
      if (sr) store(sr + j, sg);
      store(ar + j, _mm256_mul_ps(hv, sg));
    }
  }
}

// Wt (in × out) = the transpose of V (out × in) with row o scaled by scale[o], in 8 × 8 blocks
// transposed in registers; the ragged edges one by one.
void avx2_scaled_transpose(int64_t out, int64_t in, const float* V, const float* scale, float* Wt) {
  const int64_t out8 = out / 8 * 8, in8 = in / 8 * 8;
  for (int64_t o = 0; o < out8; o += 8) {
    for (int64_t j = 0; j < in8; j += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_mul_ps(_mm256_loadu_ps(V + (o + i) * in + j), _mm256_set1_ps(scale[o + i]));
      for (int i = 0; i < 8; i += 2) {  // t[i] = r[i], r[i+1] interleaved, per 128-bit half
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {  // r[i + c]: column c (and c + 4) of rows i … i+3
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(Wt + (j + c) * out + o, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
        _mm256_storeu_ps(Wt + (j + c + 4) * out + o, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
      }
    }
  }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t j = o < out8 ? in8 : 0; j < in; ++j) Wt[j * out + o] = V[o * in + j] * scale[o];
}
#pragma GCC pop_options
#endif

// Whether the elementwise passes on AVX2 intrinsics (avx2_swish, avx2_scaled_transpose) run
// here (the CPU has AVX2 and FMA), checked once.
bool avx2_passes() {
  static const bool yes = cpu_has_avx2_fma();
  return yes;
}

// Row-major C (M×N, ldc) [+]= A' (M×K) · B (K×N, ldb) with A'(i, k) = A[i·ars + k·acs], on
// the chosen float kernel; `scratch` (M·K values) holds A' for the kernels that need it
// row-major. Double, and float on "blas": BLAS (column-major: a row-major matrix is its
// column-major transpose).
template <typename T>
void product(Products how, int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t acs, const T* B,
             int64_t ldb, T* C, int64_t ldc, bool add, T* scratch) {
  if constexpr (std::is_same_v<T, float>) {
#ifdef RGF_AVX2_KERNEL
    if (how == Products::kAvx2) return avx2_product(M, N, K, A, ars, acs, B, ldb, C, ldc, add);
#endif
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if (how == Products::kOneDnn) {
      int64_t lda = ars;
      if (acs != 1) {  // the micro-kernel reads A row-major: 16 × 16 blocks keep the copy in a few lines
        for (int64_t i0 = 0; i0 < M; i0 += 16)
          for (int64_t k0 = 0; k0 < K; k0 += 16) {
            const int64_t i1 = std::min(M, i0 + 16), k1 = std::min(K, k0 + 16);
            for (int64_t i = i0; i < i1; ++i)
#pragma omp simd
              for (int64_t k = k0; k < k1; ++k) scratch[i * K + k] = A[i * ars + k * acs];
          }
        A = scratch;
        lda = K;
      }
      return at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
    }
#endif
  }
  // column-major: Cᵀ (N×M) = Bᵀ (N×K) · A'ᵀ (K×M); read column-major, B is Bᵀ, and A is A'ᵀ
  // (ld ars) when acs = 1, A' (ld acs) when ars = 1
  const char ta = acs == 1 ? 'n' : 't';
  gemm<T>('n', ta, N, M, K, T(1), B, ldb, A, acs == 1 ? ars : acs, add ? T(1) : T(0), C, ldc);
}

// Grow-only scratch of the calling thread, one per Slot: a call's tile buffers and weights
// neither zero-fill nor fault in fresh pages, which at the model's small levels cost more
// than the layer's arithmetic. A slot never holds two live buffers of one thread at once.
enum Slot {
  kWeights,      // the calling thread's W and Wt (make_problem)
  kRowsOrChunks, // forward: per-row log-dets; backward: the chunks' gradient sums
  kWork,         // each worker's tile work buffers; backward, after the tiles: gradient sums
  kRecord,       // each worker's tile activations when they are not stored
  kNetWork,      // the work buffers of one net when a tile's two nets run on two threads
  kWeightNorm,   // make_problem: one linear layer's weight norm before its permutation
  kRowGrad,      // backward: the log-det gradient per row
  kUnusedY,      // backward recompute: the forward's outputs, not needed
  kUnusedLdj,
};
template <typename T, Slot S>
T* thread_scratch(int64_t n) {
  thread_local std::unique_ptr<T[]> buffer;
  thread_local int64_t capacity = 0;
  if (capacity < n) {
    buffer.reset(new T[n]);
    capacity = n;
  }
  return buffer.get();
}

// The allocator of the activations a training forward saves for its backward. They are tens
// of MB per layer, freed by the backward and allocated again by the next forward; from glibc
// they often come back as fresh pages (a trimmed heap top, or mmap), which the forward then
// faults in 4 KiB at a time, up to a quarter of a training step (benchmarks/RESULTS.md). So a
// freed block is kept, and an allocation takes a kept block of exactly its size. Live plus
// kept bytes never exceed the peak of live bytes: a miss frees kept blocks (largest first)
// until the new block fits under that peak, or none is left.
class ActivationCache final : public c10::Allocator {
 public:
  static ActivationCache& get() {
    static ActivationCache* cache = new ActivationCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    std::lock_guard<std::mutex> lock(mutex_);
    void* ptr = nullptr;
    const auto hit = kept_.find(n);
    if (hit != kept_.end()) {
      ptr = hit->second;
      kept_.erase(hit);
      kept_bytes_ -= n;
    } else {
      while (!kept_.empty() && live_bytes_ + kept_bytes_ + n > peak_bytes_) {
        const auto largest = std::prev(kept_.end());
        c10::free_cpu(largest->second);
        kept_bytes_ -= largest->first;
        kept_.erase(largest);
      }
      ptr = c10::alloc_cpu(n);
    }
    live_.emplace(ptr, n);
    live_bytes_ += n;
    peak_bytes_ = std::max(peak_bytes_, live_bytes_ + kept_bytes_);
    return {ptr, ptr, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // [live bytes, kept bytes]; then, when `release`, frees every kept block (the peak starts
  // again from the live bytes).
  std::vector<int64_t> info(bool release) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int64_t> bytes{static_cast<int64_t>(live_bytes_), static_cast<int64_t>(kept_bytes_)};
    if (release) {
      for (const auto& [size, ptr] : kept_) c10::free_cpu(ptr);
      kept_.clear();
      kept_bytes_ = 0;
      peak_bytes_ = live_bytes_;
    }
    return bytes;
  }

 private:
  static void give_back(void* ptr) {
    ActivationCache& cache = get();
    std::lock_guard<std::mutex> lock(cache.mutex_);
    const auto block = cache.live_.find(ptr);
    const size_t n = block->second;
    cache.live_.erase(block);
    cache.live_bytes_ -= n;
    cache.kept_.emplace(n, ptr);
    cache.kept_bytes_ += n;
  }

  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;
  std::multimap<size_t, void*> kept_;
  size_t live_bytes_ = 0, kept_bytes_ = 0, peak_bytes_ = 0;
};

std::vector<int64_t> activation_cache(bool release) { return ActivationCache::get().info(release); }

// sigmoid on rg_coupling.h's exp, which vectorises in float
template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + Math<T>::exp(-x));
}

// Where each activation of a tile lives: segment-major, so that every segment of a tile is a
// (rows × width) matrix with leading dimension width. Segments per step (in application
// order): the step's input x; per net, the residual stream z_0 … z_R (z_0 = the masked input,
// z_R = R(v)) and the hidden pre-activations h_{r,1} … h_{r,n_mlp}.
//
// A rolling layout (inference: nothing is kept for a backward) gives the same segments six
// slots of max(D, H) columns that they share as soon as a value is dead: x and the S net's h
// one slot, the T net's h one (so that the two nets can run at once), each net's z_r two slots
// by the parity of r. A tile's activations then stay in cache.
struct Layout {
  int64_t D, H, n_res, n_mlp, per_net, per_step, row_width;
  std::vector<int64_t> offset, width;

  Layout(int64_t D_, int64_t H_, int64_t n_res_, int64_t n_mlp_, bool rolling = false)
      : D(D_), H(H_), n_res(n_res_), n_mlp(n_mlp_) {
    per_net = (n_res + 1) + n_res * n_mlp;
    per_step = 1 + 2 * per_net;
    const int64_t slot = std::max(D, H);
    row_width = rolling ? 6 * slot : 0;
    for (int64_t s = 0; s < 2 * per_step; ++s) {
      const int64_t local = s % per_step, in_net = local == 0 ? -1 : (local - 1) % per_net;
      const int64_t w = (local == 0 || in_net <= n_res) ? D : H;
      width.push_back(w);
      if (!rolling) {
        offset.push_back(row_width);
        row_width += w;
      } else {
        const int64_t net = local == 0 ? 0 : (local - 1) / per_net;
        offset.push_back(local == 0 ? 0 : in_net > n_res ? slot * 5 * net : slot * (1 + 2 * net + in_net % 2));
      }
    }
  }
  int64_t x(int64_t st) const { return st * per_step; }
  int64_t z(int64_t st, int64_t net, int64_t r) const { return st * per_step + 1 + net * per_net + r; }
  int64_t h(int64_t st, int64_t net, int64_t r, int64_t i) const {
    return st * per_step + 1 + net * per_net + (n_res + 1) + r * n_mlp + (i - 1);
  }
};

// A tile's view of an activation buffer of n_rows rows (the saved tensor, or a tile scratch).
template <typename T>
struct Record {
  T* base;
  int64_t n_rows, row0;
  const Layout* L;
  T* operator()(int64_t seg) const { return base + n_rows * L->offset[seg] + row0 * L->width[seg]; }
};

// One net's parameters: per linear layer l = r·(n_mlp+1) + i, the Swish β before it, the
// weight-normalised W and its transpose Wt (each only where the call reads it) and the bias;
// then σ.
template <typename T>
struct Net {
  std::vector<const T*> beta, W, Wt, b;
  const T* sigma;
};

// Features [begin, begin + count) of a row.
struct Range {
  int64_t begin, count;
};

// Inside a call the D features run permuted: first those the parity-0 step keeps, then those
// it transforms, each group in its original order (perm[j'] = the original index of feature
// j'). Each step's kept and transformed features are then one contiguous range (parity 1 swaps
// them), so the products that see only one half run on that half: the first block's first
// linear layer (its input, the masked x, is zero on the transformed half) and the last block's
// last one (only the transformed half of R(v) is used). The skipped terms are zeros, so the
// sums are those of the whole products.
template <typename T>
struct Problem {
  Layout L;
  Net<T> net[2];
  std::vector<int64_t> perm;
  int64_t n_kept0;  // features the parity-0 step keeps
  bool inverse;
  Products products;
  int64_t in_width(int64_t i) const { return i == 0 ? L.D : L.H; }
  int64_t out_width(int64_t i) const { return i == L.n_mlp ? L.D : L.H; }
  int64_t max_width() const { return std::max(L.D, L.H); }
  int64_t parity(int64_t st) const { return inverse ? 1 - st : st; }
  Range kept(int64_t st) const { return parity(st) == 0 ? Range{0, n_kept0} : Range{n_kept0, L.D - n_kept0}; }
  Range transformed(int64_t st) const {
    return parity(st) == 0 ? Range{n_kept0, L.D - n_kept0} : Range{0, n_kept0};
  }
  // to = from (m × width) with its features (its rows where by_rows, else its columns) in the
  // call's order; `back`: from the call's order to the original one.
  void reorder(const T* from, T* to, int64_t m, int64_t width, bool by_rows, bool back) const {
    for (int64_t r = 0; r < m; ++r) {
      if (by_rows)
        std::copy_n(from + (back ? r : perm[r]) * width, width, to + (back ? perm[r] : r) * width);
      else if (back)
        for (int64_t c = 0; c < width; ++c) to[r * width + perm[c]] = from[r * width + c];
      else
        for (int64_t c = 0; c < width; ++c) to[r * width + c] = from[r * width + perm[c]];
    }
  }
};

// a = swish(h) = h·σ(β h) over a (rows × w) block; with bias, h += b first (in place); with
// s (the backward's), also s = σ(β h).
template <typename T>
void swish(int64_t rows, int64_t w, T* h, const T* bias, const T* beta, T* a, T* s) {
#ifdef RGF_AVX2_KERNEL
  if constexpr (std::is_same_v<T, float>)
    if (avx2_passes()) return avx2_swish(rows, w, h, bias, beta, a, s);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    T* hr = h + r * w;
    T* ar = a + r * w;
    if (bias) {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) hr[j] += bias[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const T sg = sigmoid(beta[j] * hr[j]);
      if (s) s[r * w + j] = sg;
      ar[j] = hr[j] * sg;
    }
  }
}

// ---------------------------------------------------------------------------------- forward

// One net of step st on a tile of `rows` rows whose step input is `cur` (ld D): z_0 = the
// masked input, then each residual block; every z_r and h into `rec`. A, out: rows ·
// max_width each.
template <typename T>
void net_forward(const Problem<T>& p, const Record<T>& rec, int64_t rows, int64_t st, int64_t n, const T* cur, T* A,
                 T* out) {
  const Layout& L = p.L;
  const int64_t D = L.D, H = L.H;
  const T inv_sqrt2 = T(1) / std::sqrt(T(2));
  const Range tr = p.transformed(st), kp = p.kept(st);
  const Net<T>& net = p.net[n];
  T* z = rec(L.z(st, n, 0));
  std::copy(cur, cur + rows * D, z);
  for (int64_t row = 0; row < rows; ++row) std::fill_n(z + row * D + tr.begin, tr.count, T(0));
  for (int64_t r = 0; r < L.n_res; ++r) {
    const int64_t l0 = r * (L.n_mlp + 1);
    swish<T>(rows, D, z, nullptr, net.beta[l0], A, nullptr);
    for (int64_t i = 1; i <= L.n_mlp; ++i) {
      T* h = rec(L.h(st, n, r, i));
      const int64_t w = p.in_width(i - 1);
      if (i == 1 && r == 0)  // the masked input: its kept half only
        product<T>(p.products, rows, H, kp.count, A + kp.begin, w, 1, net.Wt[l0] + kp.begin * H, H, h, H, false,
                   nullptr);
      else
        product<T>(p.products, rows, H, w, A, w, 1, net.Wt[l0 + i - 1], H, h, H, false, nullptr);
      swish<T>(rows, H, h, net.b[l0 + i - 1], net.beta[l0 + i], A, nullptr);
    }
    // R(v)'s transformed half only (its kept half is never read)
    const Range cols = r == L.n_res - 1 ? tr : Range{0, D};
    product<T>(p.products, rows, cols.count, H, A, H, 1, net.Wt[l0 + L.n_mlp] + cols.begin, D, out + cols.begin, D,
               false, nullptr);
    T* z_next = rec(L.z(st, n, r + 1));
    const T* b = net.b[l0 + L.n_mlp];
    for (int64_t row = 0; row < rows; ++row) {
#pragma omp simd
      for (int64_t j = cols.begin; j < cols.begin + cols.count; ++j)
        z_next[row * D + j] = (z[row * D + j] + (out[row * D + j] + b[j])) * inv_sqrt2;
    }
    z = z_next;
  }
}

// The coupling of step st on a tile, once both nets have run: cur (rows × D) in place, the
// step's per-row log-dets into ldj_rows (rows × 2).
template <typename T>
void coupling_forward(const Problem<T>& p, const Record<T>& rec, int64_t rows, int64_t st, T* cur, T* ldj_rows) {
  const Layout& L = p.L;
  const int64_t D = L.D;
  const Range tr = p.transformed(st);
  const T* zs = rec(L.z(st, 0, L.n_res));
  const T* zt = rec(L.z(st, 1, L.n_res));
  const T* sig_s = p.net[0].sigma;
  const T* sig_t = p.net[1].sigma;
  for (int64_t row = 0; row < rows; ++row) {
    T acc = 0;
    for (int64_t j = tr.begin; j < tr.begin + tr.count; ++j) {
      const int64_t i = row * D + j;
      const T s = Math<T>::tanh(sig_s[j] * zs[i]);
      const T t = sig_t[j] * zt[i];
      cur[i] = p.inverse ? (cur[i] - t) * Math<T>::exp(-s) : cur[i] * Math<T>::exp(s) + t;
      acc += s;
    }
    ldj_rows[row * 2 + st] = p.inverse ? -acc : acc;
  }
}

// --------------------------------------------------------------------------------- backward

// Offsets of each parameter's gradient in a flat accumulator: per net, per linear layer
// dβ (in), dW (out×in), db (out); then dσ (D).
struct GradLayout {
  std::vector<int64_t> beta[2], W[2], b[2];
  int64_t sigma[2];
  int64_t size = 0;
  std::vector<std::pair<int64_t, int64_t>> not_W;  // (offset, length) of every gradient but the dWs
  template <typename T>
  explicit GradLayout(const Problem<T>& p) {
    for (int64_t n = 0; n < 2; ++n) {
      for (int64_t r = 0; r < p.L.n_res; ++r) {
        for (int64_t i = 0; i <= p.L.n_mlp; ++i) {
          beta[n].push_back(size);
          not_W.emplace_back(size, p.in_width(i));
          size += p.in_width(i);
          W[n].push_back(size);
          size += p.in_width(i) * p.out_width(i);
          b[n].push_back(size);
          not_W.emplace_back(size, p.out_width(i));
          size += p.out_width(i);
        }
      }
      sigma[n] = size;
      not_W.emplace_back(size, p.L.D);
      size += p.L.D;
    }
  }
};

// The coupling's backward of step st on a tile: g (rows × D), the grad of the step's output,
// becomes that of its input, but for the nets' share on the kept half (added by the caller);
// gnet_s, gnet_t get the grads of R_s(v), R_t(v); dσ added into acc (GradLayout). gl: the
// log-det's gradient for each row.
template <typename T>
void coupling_backward(const Problem<T>& p, const GradLayout& gl_layout, const Record<T>& rec, int64_t rows, int64_t st,
                       const T* gl, T* g, T* gnet_s, T* gnet_t, T* acc) {
  const Layout& L = p.L;
  const int64_t D = L.D;
  const Range tr = p.transformed(st), kp = p.kept(st);
  const T* x = rec(L.x(st));
  const T* zs = rec(L.z(st, 0, L.n_res));
  const T* zt = rec(L.z(st, 1, L.n_res));
  const T* sig_s = p.net[0].sigma;
  const T* sig_t = p.net[1].sigma;
  T* dsig_s = acc + gl_layout.sigma[0];
  T* dsig_t = acc + gl_layout.sigma[1];
  for (int64_t row = 0; row < rows; ++row) {
    std::fill_n(gnet_s + row * D + kp.begin, kp.count, T(0));
    std::fill_n(gnet_t + row * D + kp.begin, kp.count, T(0));
    for (int64_t j = tr.begin; j < tr.begin + tr.count; ++j) {
      const int64_t i = row * D + j;
      const T s = Math<T>::tanh(sig_s[j] * zs[i]);
      const T dtanh = T(1) - s * s;
      T g_s, g_t;
      if (!p.inverse) {  // y = x·e^s + t, ldj += s
        const T e = Math<T>::exp(s);
        g_s = (g[i] * x[i] * e + gl[row]) * dtanh;
        g_t = g[i];
        g[i] = g[i] * e;
      } else {  // y = (x - t)·e^{-s}, ldj -= s
        const T e = Math<T>::exp(-s);
        const T t = sig_t[j] * zt[i];
        g_s = (-g[i] * (x[i] - t) * e - gl[row]) * dtanh;
        g_t = -g[i] * e;
        g[i] = g[i] * e;
      }
      dsig_s[j] += g_s * zs[i];
      dsig_t[j] += g_t * zt[i];
      gnet_s[i] = g_s * sig_s[j];
      gnet_t[i] = g_t * sig_t[j];
    }
  }
}

// One net's backward through its residual blocks in step st on a tile: gz (rows × D), the grad
// of R(v), becomes that of v; the net's parameter gradients added into acc (GradLayout).
// `fresh`: see tile_backward. `work`: 5 · rows · max_width.
template <typename T>
void net_backward(const Problem<T>& p, const GradLayout& gl_layout, const Record<T>& rec, int64_t rows, int64_t st,
                  int64_t n, T* gz, T* acc, bool fresh, T* work) {
  const Layout& L = p.L;
  const int64_t D = L.D, mw = p.max_width();
  const T inv_sqrt2 = T(1) / std::sqrt(T(2));
  const Range tr = p.transformed(st), kp = p.kept(st);
  T* A = work;                 // recomputed Swish output
  T* SG = A + rows * mw;       // recomputed sigmoid
  T* DP = SG + rows * mw;      // grad of a pre-activation
  T* DA = DP + rows * mw;      // grad of a Swish output
  T* T_scratch = DA + rows * mw;  // DPᵀ, for the kernels that read it row-major
  const Net<T>& net = p.net[n];
  for (int64_t r = L.n_res - 1; r >= 0; --r) {
    const int64_t l0 = r * (L.n_mlp + 1);
    T* z = rec(L.z(st, n, r));
    // DP: grad of linear i's output, walking i = n_mlp … 0 (F's output is linear n_mlp's)
#pragma omp simd
    for (int64_t i = 0; i < rows * D; ++i) DP[i] = gz[i] *= inv_sqrt2;
    for (int64_t i = L.n_mlp; i >= 0; --i) {
      const int64_t w_in = p.in_width(i), w_out = p.out_width(i), l = l0 + i;
      T* pre = i == 0 ? z : rec(L.h(st, n, r, i));
      const T* beta = net.beta[l];
      swish<T>(rows, w_in, pre, nullptr, beta, A, SG);
      T* db = acc + gl_layout.b[n][l];
      for (int64_t row = 0; row < rows; ++row) {
#pragma omp simd
        for (int64_t j = 0; j < w_out; ++j) db[j] += DP[row * w_out + j];
      }
      // dW (out×in) += DPᵀ · A, then DA = DP · W. The half products (Problem): the last
      // linear layer's DP is zero outside the transformed half, the first one's A outside
      // the kept half; the two steps' halves of that dW are disjoint, so a fresh chunk's
      // first tile writes each in its own step.
      T* dW = acc + gl_layout.W[n][l];
      if (i == L.n_mlp && r == L.n_res - 1) {
        product<T>(p.products, tr.count, w_in, rows, DP + tr.begin, 1, w_out, A, w_in, dW + tr.begin * w_in, w_in,
                   !fresh, T_scratch);
        product<T>(p.products, rows, w_in, tr.count, DP + tr.begin, w_out, 1, net.W[l] + tr.begin * w_in, w_in, DA,
                   w_in, false, nullptr);
      } else if (i == 0 && r == 0) {
        product<T>(p.products, w_out, kp.count, rows, DP, 1, w_out, A + kp.begin, w_in, dW + kp.begin, w_in, !fresh,
                   T_scratch);
        product<T>(p.products, rows, kp.count, w_out, DP, w_out, 1, net.W[l] + kp.begin, w_in, DA + kp.begin, w_in,
                   false, nullptr);
        for (int64_t row = 0; row < rows; ++row) std::fill_n(DA + row * w_in + tr.begin, tr.count, T(0));
      } else {
        product<T>(p.products, w_out, w_in, rows, DP, 1, w_out, A, w_in, dW, w_in, !(fresh && st == 1), T_scratch);
        product<T>(p.products, rows, w_in, w_out, DP, w_out, 1, net.W[l], w_in, DA, w_in, false, nullptr);
      }
      T* dbeta = acc + gl_layout.beta[n][l];
      for (int64_t row = 0; row < rows; ++row) {
#pragma omp simd
        for (int64_t j = 0; j < w_in; ++j) {
          const int64_t k = row * w_in + j;
          const T h = pre[k], sgm = SG[k], dsg = sgm * (T(1) - sgm);
          dbeta[j] += DA[k] * h * h * dsg;
          DP[k] = DA[k] * (sgm + beta[j] * h * dsg);
        }
      }
    }
    for (int64_t i = 0; i < rows * D; ++i) gz[i] += DP[i];
  }
}

// W = g ⊙ V / ‖V‖_row of one linear layer (V: out × in) where W, and its transpose where Wt
// (each may be null); `scale`: scratch for out values.
template <typename T>
void weight_norm(int64_t out, int64_t in, const T* V, const T* g, T* scale, T* W, T* Wt) {
  for (int64_t o = 0; o < out; ++o) {
    T sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < in; ++j) sq += V[o * in + j] * V[o * in + j];
    scale[o] = g[o] / std::sqrt(sq);
  }
  if (W) {
    for (int64_t o = 0; o < out; ++o)
#pragma omp simd
      for (int64_t j = 0; j < in; ++j) W[o * in + j] = V[o * in + j] * scale[o];
  }
  if (!Wt) return;
#ifdef RGF_AVX2_KERNEL
  if constexpr (std::is_same_v<T, float>)
    if (avx2_passes()) return avx2_scaled_transpose(out, in, V, scale, Wt);
#endif
  for (int64_t j0 = 0; j0 < in; j0 += 16)  // 16 × 16 blocks keep the transpose in a few lines
    for (int64_t o0 = 0; o0 < out; o0 += 16)
      for (int64_t j = j0; j < std::min(in, j0 + 16); ++j)
        for (int64_t o = o0; o < std::min(out, o0 + 16); ++o) Wt[j * out + o] = V[o * in + j] * scale[o];
}

// Back from W = g ⊙ V / ‖V‖_row to the weight-norm parameters of one linear layer (out × in):
// with n = ‖V_o‖ and V̂ = V_o / n, dg_o = Σ_j dW_oj V̂_oj and dV_o = (g_o / n)(dW_o − dg_o V̂_o).
template <typename T>
void weight_norm_backward(int64_t out, int64_t in, const T* V, const T* g, const T* dW, T* dV, T* dg) {
  for (int64_t o = 0; o < out; ++o) {
    const T* v = V + o * in;
    const T* dw = dW + o * in;
    T sq = 0, dot = 0;
#pragma omp simd reduction(+ : sq, dot)
    for (int64_t j = 0; j < in; ++j) {
      sq += v[j] * v[j];
      dot += dw[j] * v[j];
    }
    const T norm = std::sqrt(sq), dgo = dot / norm, scale = g[o] / norm, along = dgo / norm;
    dg[o] = dgo;
#pragma omp simd
    for (int64_t j = 0; j < in; ++j) dV[o * in + j] = scale * (dw[j] - along * v[j]);
  }
}

// out = Σ_c partial[c·stride + i] over the chunks c in order, for i < length: a gradient
// summed over chunks element by element (the same sums whatever splits the work).
template <typename T>
void sum_chunks(const T* partial, int64_t chunks, int64_t stride, int64_t length, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < length; ++i) out[i] = partial[i];
  for (int64_t c = 1; c < chunks; ++c)
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) out[i] += partial[c * stride + i];
}

// The tiles' elementwise passes are most of the time outside BLAS: compile the tile code (and
// the weight norm) for wider vector units as well and pick the version at load time (function
// multiversioning), so that one build runs everywhere. `flatten` inlines the templates into
// each version.
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define RGF_TILE_CODE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define RGF_TILE_CODE
#endif

#define RGF_TILE_ENTRY_POINTS(T)                                                                            \
  RGF_TILE_CODE void run_net_forward(const Problem<T>& p, const Record<T>& rec, int64_t rows, int64_t st,    \
                                     int64_t n, const T* cur, T* A, T* out) {                              \
    net_forward(p, rec, rows, st, n, cur, A, out);                                                         \
  }                                                                                                         \
  RGF_TILE_CODE void run_coupling_forward(const Problem<T>& p, const Record<T>& rec, int64_t rows, int64_t st, \
                                          T* cur, T* ldj_rows) {                                           \
    coupling_forward(p, rec, rows, st, cur, ldj_rows);                                                     \
  }                                                                                                         \
  RGF_TILE_CODE void run_coupling_backward(const Problem<T>& p, const GradLayout& gl, const Record<T>& rec,  \
                                           int64_t rows, int64_t st, const T* gl_rows, T* g, T* gnet_s,    \
                                           T* gnet_t, T* acc) {                                            \
    coupling_backward(p, gl, rec, rows, st, gl_rows, g, gnet_s, gnet_t, acc);                              \
  }                                                                                                         \
  RGF_TILE_CODE void run_net_backward(const Problem<T>& p, const GradLayout& gl, const Record<T>& rec,       \
                                      int64_t rows, int64_t st, int64_t n, T* gz, T* acc, bool fresh,      \
                                      T* work) {                                                           \
    net_backward(p, gl, rec, rows, st, n, gz, acc, fresh, work);                                           \
  }                                                                                                         \
  RGF_TILE_CODE void run_weight_norm(int64_t out, int64_t in, const T* V, const T* g, T* scale, T* W, T* Wt) { \
    weight_norm(out, in, V, g, scale, W, Wt);                                                              \
  }                                                                                                         \
  RGF_TILE_CODE void run_weight_norm_backward(int64_t out, int64_t in, const T* V, const T* g, const T* dW, T* dV, \
                                              T* dg) {                                                      \
    weight_norm_backward(out, in, V, g, dW, dV, dg);                                                       \
  }                                                                                                         \
  RGF_TILE_CODE void run_sum_chunks(const T* partial, int64_t chunks, int64_t stride, int64_t length, T* out) { \
    sum_chunks(partial, chunks, stride, length, out);                                                      \
  }
RGF_TILE_ENTRY_POINTS(float)
RGF_TILE_ENTRY_POINTS(double)

// Runs the layer on `rows` rows u (ld D), writing y, the two steps' per-row log-dets
// (ldj_rows, rows × 2) and every activation into `rec`. `work`: 3 · rows · max_width. With
// `nets_apart` the S and T nets of a step run on two threads, each with its own work buffers
// (for a layer of a single tile, which would otherwise run on one).
template <typename T>
void tile_forward(const Problem<T>& p, const Record<T>& rec, int64_t rows, const T* u, T* y, T* ldj_rows, T* work,
                  bool nets_apart = false) {
  const int64_t D = p.L.D, mw = p.max_width();
  T* cur = work;
  p.reorder(u, cur, rows, D, /*by_rows=*/false, /*back=*/false);
  for (int64_t st = 0; st < 2; ++st) {
    std::copy(cur, cur + rows * D, rec(p.L.x(st)));
    if (nets_apart) {
      at::parallel_for(0, 2, 1, [&](int64_t n0, int64_t n1) {
        T* net_work = thread_scratch<T, kNetWork>(2 * rows * mw);
        for (int64_t n = n0; n < n1; ++n) run_net_forward(p, rec, rows, st, n, cur, net_work, net_work + rows * mw);
      });
    } else {
      for (int64_t n = 0; n < 2; ++n) run_net_forward(p, rec, rows, st, n, cur, work + rows * mw, work + 2 * rows * mw);
    }
    run_coupling_forward(p, rec, rows, st, cur, ldj_rows);
  }
  p.reorder(cur, y, rows, D, /*by_rows=*/false, /*back=*/true);
}

// Back-propagates grad_y (rows × D) through the layer of one tile whose activations are in
// `rec`; writes grad_u and adds parameter gradients into `acc` (GradLayout). gl: the
// log-det's gradient for each row. `work`: 8 · rows · max_width. `fresh`: acc's dW blocks
// hold nothing yet, so the first product into each (step 1's) writes instead of adding,
// which saves zeroing them (the rest of acc must be zero). `nets_apart`: as tile_forward's.
template <typename T>
void tile_backward(const Problem<T>& p, const GradLayout& gl_layout, const Record<T>& rec, int64_t rows,
                   const T* grad_y, const T* gl, T* grad_u, T* acc, T* work, bool fresh, bool nets_apart = false) {
  const int64_t D = p.L.D, mw = p.max_width();
  T* g = work;  // grad of the current step's output, then input
  T* gnet[2] = {g + rows * mw, g + 2 * rows * mw};  // grads of R_s(v), R_t(v), then of v
  p.reorder(grad_y, g, rows, D, /*by_rows=*/false, /*back=*/false);
  for (int64_t st = 1; st >= 0; --st) {
    run_coupling_backward(p, gl_layout, rec, rows, st, gl, g, gnet[0], gnet[1], acc);
    if (nets_apart) {
      at::parallel_for(0, 2, 1, [&](int64_t n0, int64_t n1) {
        T* net_work = thread_scratch<T, kNetWork>(5 * rows * mw);
        for (int64_t n = n0; n < n1; ++n) run_net_backward(p, gl_layout, rec, rows, st, n, gnet[n], acc, fresh, net_work);
      });
    } else {
      for (int64_t n = 0; n < 2; ++n)
        run_net_backward(p, gl_layout, rec, rows, st, n, gnet[n], acc, fresh, g + 3 * rows * mw);
    }
    const Range kp = p.kept(st);
    for (int64_t n = 0; n < 2; ++n)  // v = (1 - m) ⊙ x
      for (int64_t row = 0; row < rows; ++row)
#pragma omp simd
        for (int64_t j = kp.begin; j < kp.begin + kp.count; ++j) g[row * D + j] += gnet[n][row * D + j];
  }
  p.reorder(g, grad_u, rows, D, /*by_rows=*/false, /*back=*/true);
}

// ------------------------------------------------------------------------------ the ops

// Whether a call of `tiles` tiles runs each tile's two nets on two threads: when a single tile
// would otherwise leave the other threads idle.
bool nets_on_two_threads(int64_t tiles) {
  return tiles == 1 && at::get_num_threads() > 1 && !at::in_parallel_region();
}

struct Sizes {
  int64_t N, C, k, D, B, P, n_res, H;
};

Sizes check_inputs(const Tensor& u, const Tensor& ldj, at::TensorList params, int64_t n_mlp) {
  TORCH_CHECK(u.dim() == 4 && u.size(2) == u.size(3), "rg_coupling_layer: u must be (N, C, k, k); got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "rg_coupling_layer (cpu): float32 or float64 only; got ", u.scalar_type(),
              " (the 'torch' backend runs other dtypes)");
  TORCH_CHECK(u.device().is_cpu(), "rg_coupling_layer (cpu): u must be a CPU tensor; got ", u.device());
  TORCH_CHECK(ldj.dim() == 1 && ldj.size(0) >= 1 && u.size(0) % ldj.size(0) == 0,
              "rg_coupling_layer: ldj must be (B,) with N = B·P rows in u; got ", ldj.sizes(), " for u ", u.sizes());
  TORCH_CHECK(n_mlp >= 1, "rg_coupling_layer: n_mlp must be >= 1; got ", n_mlp);
  const int64_t per_block = 4 * (n_mlp + 1);
  const int64_t per_net = static_cast<int64_t>(params.size()) / 2;
  TORCH_CHECK(params.size() % 2 == 0 && per_net >= 1 && (per_net - 1) % per_block == 0,
              "rg_coupling_layer: params must hold 2·(4·n_res_blocks·(n_mlp+1) + 1) tensors; got ", params.size());
  Sizes s;
  s.N = u.size(0);
  s.C = u.size(1);
  s.k = u.size(2);
  s.D = s.C * s.k * s.k;
  s.B = ldj.size(0);
  s.P = s.N / s.B;
  s.n_res = (per_net - 1) / per_block;
  s.H = s.n_res ? params[3].numel() : s.D;  // the first linear layer's bias
  for (const Tensor& t : params)
    TORCH_CHECK(t.scalar_type() == u.scalar_type() && t.device() == u.device(),
                "rg_coupling_layer: every parameter must match u's dtype and device");
  for (int64_t n = 0; n < 2; ++n) {
    for (int64_t l = 0; l < s.n_res * (n_mlp + 1); ++l) {
      const int64_t i = l % (n_mlp + 1);
      const int64_t w_in = i == 0 ? s.D : s.H, w_out = i == n_mlp ? s.D : s.H;
      const int64_t base = n * per_net + 4 * l;
      TORCH_CHECK(params[base].numel() == w_in && params[base + 1].dim() == 2 && params[base + 1].size(0) == w_out &&
                      params[base + 1].size(1) == w_in && params[base + 2].numel() == w_out &&
                      params[base + 3].numel() == w_out,
                  "rg_coupling_layer: parameter shapes of linear layer ", l, " (net ", n,
                  ") do not match D = ", s.D, ", hidden = ", s.H);
    }
    TORCH_CHECK(params[n * per_net + per_net - 1].numel() == s.D, "rg_coupling_layer: σ must have D = ", s.D, " entries");
  }
  TORCH_CHECK(s.N < (int64_t(1) << 31) / std::max(s.D, s.H), "rg_coupling_layer: too many rows for 32-bit BLAS");
  return s;
}

// Problem description with weight norm applied: W = g ⊙ V / ‖V‖_row (what the backward's
// products read) and its transpose (the forward's), each only where `need_W` / `need_Wt`,
// computed once per call into the calling thread's scratch (valid until its next call).
template <typename T>
Problem<T> make_problem(const Sizes& s, const std::vector<Tensor>& params, int64_t n_mlp, bool inverse, bool need_W,
                        bool need_Wt) {
  const Products products = std::is_same_v<T, float> ? float_products() : Products::kBlas;
  TORCH_CHECK(products != Products::kBlas || blas_gemm<T>() != nullptr,
              "rg_coupling_layer (cpu): this torch exports no BLAS gemm (sgemm_/dgemm_); use the 'torch' backend");
  Problem<T> p{Layout(s.D, s.H, s.n_res, n_mlp), {}, {}, 0, inverse, products};
  for (int64_t transformed = 0; transformed < 2; ++transformed) {  // parity 0 transforms where a + b is odd
    if (transformed) p.n_kept0 = static_cast<int64_t>(p.perm.size());
    for (int64_t j = 0; j < s.D; ++j)
      if (((j / s.k) % s.k + j % s.k) % 2 == transformed) p.perm.push_back(j);
  }
  const int64_t per_net = static_cast<int64_t>(params.size()) / 2, D = s.D, mw = p.max_width();
  int64_t per_block = 0;  // weights of one residual block
  for (int64_t i = 0; i <= n_mlp; ++i) per_block += p.in_width(i) * p.out_width(i);
  // W and Wt, both nets; the D-sized vectors (β, b, σ) permuted
  T* next = thread_scratch<T, kWeights>(2 * (2 * s.n_res * per_block + (2 * s.n_res + 1) * D));
  auto permuted = [&](const T* v) {
    T* out = next;
    next += D;
    p.reorder(v, out, 1, D, /*by_rows=*/false, /*back=*/false);
    return out;
  };
  const int64_t n_linear = s.n_res * (n_mlp + 1);
  std::vector<T*> W_of(2 * n_linear);  // where each linear layer's W goes, its Wt after it
  for (int64_t n = 0; n < 2; ++n) {
    for (int64_t l = 0; l < n_linear; ++l) {
      const int64_t base = n * per_net + 4 * l, i = l % (n_mlp + 1);
      W_of[n * n_linear + l] = next;
      p.net[n].W.push_back(next);
      p.net[n].Wt.push_back(next + p.out_width(i) * p.in_width(i));
      next += 2 * p.out_width(i) * p.in_width(i);
      p.net[n].beta.push_back(i == 0 ? permuted(params[base].data_ptr<T>()) : params[base].data_ptr<T>());
      p.net[n].b.push_back(i == n_mlp ? permuted(params[base + 3].data_ptr<T>()) : params[base + 3].data_ptr<T>());
    }
    p.net[n].sigma = permuted(params[n * per_net + per_net - 1].data_ptr<T>());
  }
  // the weight norms, one task per linear layer
  at::parallel_for(0, 2 * n_linear, 1, [&](int64_t k0, int64_t k1) {
    T* W0 = thread_scratch<T, kWeightNorm>(2 * mw * mw + mw);  // an unpermuted W and Wt; g_o / ‖V_o‖
    T* Wt0 = W0 + mw * mw;
    T* scale = Wt0 + mw * mw;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n = k / n_linear, l = k % n_linear, base = n * per_net + 4 * l, i = l % (n_mlp + 1);
      const int64_t out = p.out_width(i), in = p.in_width(i);
      T* W = W_of[k];
      T* Wt = W + out * in;
      const T* V = params[base + 1].data_ptr<T>();
      const T* g = params[base + 2].data_ptr<T>();
      if (i != 0 && i != n_mlp) {
        run_weight_norm(out, in, V, g, scale, need_W ? W : nullptr, need_Wt ? Wt : nullptr);
        continue;
      }
      // computed unpermuted, then their D-sized side (W's columns and Wt's rows for the first
      // layer of a block, the other way round for the last) permuted
      run_weight_norm(out, in, V, g, scale, need_W ? W0 : nullptr, need_Wt ? Wt0 : nullptr);
      if (need_W) p.reorder(W0, W, out, in, /*by_rows=*/i != 0, /*back=*/false);
      if (need_Wt) p.reorder(Wt0, Wt, in, out, /*by_rows=*/i == 0, /*back=*/false);
    }
  });
  return p;
}

std::vector<Tensor> contiguous(at::TensorList params) {
  std::vector<Tensor> out;
  out.reserve(params.size());
  for (const Tensor& t : params) out.push_back(t.contiguous());
  return out;
}

std::tuple<Tensor, Tensor, Tensor> layer_forward(const Tensor& u_in, const Tensor& ldj, at::TensorList params_in,
                                                 int64_t n_mlp, bool inverse, bool store) {
  const Sizes s = check_inputs(u_in, ldj, params_in, n_mlp);
  const Tensor u = u_in.contiguous();
  const std::vector<Tensor> params = contiguous(params_in);
  Tensor y = at::empty_like(u);
  Tensor ldj_out = at::empty_like(ldj);
  Tensor acts;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "rg_coupling_layer_forward", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(s, params, n_mlp, inverse, /*need_W=*/false, /*need_Wt=*/true);
    const Layout rolling(s.D, s.H, s.n_res, n_mlp, /*rolling=*/true);
    acts = store ? at::detail::empty_generic({s.N * p.L.row_width}, &ActivationCache::get(),
                                             c10::DispatchKeySet(c10::DispatchKey::CPU), u.scalar_type(),
                                             std::nullopt)
                 : at::empty({0}, u.options());
    scalar_t* rows_ldj = thread_scratch<scalar_t, kRowsOrChunks>(s.N * 2);
    const int64_t tile = tile_rows(s.N), tiles = (s.N + tile - 1) / tile;
    const scalar_t* u_ptr = u.data_ptr<scalar_t>();
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    scalar_t* acts_ptr = store ? acts.data_ptr<scalar_t>() : nullptr;
    const bool nets_apart = nets_on_two_threads(tiles);
    auto run_tiles = [&](int64_t t0, int64_t t1) {
      scalar_t* work = thread_scratch<scalar_t, kWork>(3 * tile * p.max_width());
      scalar_t* scratch = store ? nullptr : thread_scratch<scalar_t, kRecord>(tile * rolling.row_width);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tile, rows = std::min(tile, s.N - r0);
        const Record<scalar_t> rec = store ? Record<scalar_t>{acts_ptr, s.N, r0, &p.L}
                                           : Record<scalar_t>{scratch, rows, 0, &rolling};
        tile_forward(p, rec, rows, u_ptr + r0 * s.D, y_ptr + r0 * s.D, rows_ldj + r0 * 2, work, nets_apart);
      }
    };
    if (nets_apart)
      run_tiles(0, 1);
    else
      at::parallel_for(0, tiles, 1, run_tiles);
    // per image, step by step, in row order: the reference's summation order
    const Tensor ldj_c = ldj.contiguous();
    const scalar_t* ldj_in = ldj_c.data_ptr<scalar_t>();
    scalar_t* out = ldj_out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < s.B; ++b) {
      scalar_t total = ldj_in[b];
      for (int64_t st = 0; st < 2; ++st) {
        scalar_t sum = 0;
        for (int64_t q = 0; q < s.P; ++q) sum += rows_ldj[(b * s.P + q) * 2 + st];
        total += sum;
      }
      out[b] = total;
    }
  });
  return {y.view(u_in.sizes()), ldj_out, acts};
}

std::tuple<Tensor, std::vector<Tensor>> layer_backward(const Tensor& u_in, const Tensor& acts, at::TensorList params_in,
                                                       const Tensor& grad_y_in, const Tensor& grad_ldj, int64_t n_mlp,
                                                       bool inverse) {
  const Sizes s = check_inputs(u_in, grad_ldj, params_in, n_mlp);
  TORCH_CHECK(grad_y_in.sizes() == u_in.sizes() && grad_y_in.scalar_type() == u_in.scalar_type() &&
                  grad_y_in.device() == u_in.device(),
              "rg_coupling_layer_backward: grad_y must match u (", u_in.sizes(), ")");
  const Tensor u = u_in.contiguous();
  const Tensor grad_y = grad_y_in.contiguous();
  const std::vector<Tensor> params = contiguous(params_in);
  Tensor grad_u = at::empty_like(u);
  std::vector<Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "rg_coupling_layer_backward", [&] {
    using T = scalar_t;
    const bool stored = acts.numel() > 0;
    const Problem<T> p = make_problem<T>(s, params, n_mlp, inverse, /*need_W=*/true, /*need_Wt=*/!stored);
    TORCH_CHECK(!stored || acts.numel() == s.N * p.L.row_width,
                "rg_coupling_layer_backward: acts do not match this layer (", acts.numel(), " values)");
    const GradLayout gl(p);
    const int64_t tile = tile_rows(s.N), tiles = (s.N + tile - 1) / tile;
    const int64_t chunks = std::min(tiles, kMaxChunks);
    // each chunk zeroes its own buffer (but the dWs, which its first tile writes) in the parallel region
    T* partial = thread_scratch<T, kRowsOrChunks>(chunks * gl.size);
    T* row_gl = thread_scratch<T, kRowGrad>(s.N);
    const Tensor gldj = grad_ldj.contiguous();
    for (int64_t r = 0; r < s.N; ++r) row_gl[r] = gldj.data_ptr<T>()[r / s.P];
    const T* u_ptr = u.data_ptr<T>();
    const T* gy_ptr = grad_y.data_ptr<T>();
    T* gu_ptr = grad_u.data_ptr<T>();
    T* acts_ptr = stored ? acts.data_ptr<T>() : nullptr;
    const bool nets_apart = nets_on_two_threads(tiles);
    auto run_chunks = [&](int64_t c0, int64_t c1) {
      T* work = thread_scratch<T, kWork>(8 * tile * p.max_width());
      T* scratch = stored ? nullptr : thread_scratch<T, kRecord>(tile * p.L.row_width);
      T* y_unused = stored ? nullptr : thread_scratch<T, kUnusedY>(tile * s.D);
      T* ldj_unused = stored ? nullptr : thread_scratch<T, kUnusedLdj>(tile * 2);
      for (int64_t c = c0; c < c1; ++c) {
        T* acc = partial + c * gl.size;
        for (const auto& [offset, length] : gl.not_W) std::fill_n(acc + offset, length, T(0));
        const int64_t first = c * tiles / chunks;
        for (int64_t t = first; t < (c + 1) * tiles / chunks; ++t) {
          const int64_t r0 = t * tile, rows = std::min(tile, s.N - r0);
          Record<T> rec{acts_ptr, s.N, r0, &p.L};
          if (!stored) {
            rec = Record<T>{scratch, rows, 0, &p.L};
            tile_forward(p, rec, rows, u_ptr + r0 * s.D, y_unused, ldj_unused, work, nets_apart);
          }
          tile_backward(p, gl, rec, rows, gy_ptr + r0 * s.D, row_gl + r0, gu_ptr + r0 * s.D, acc, work, t == first,
                        nets_apart);
        }
      }
    };
    if (nets_apart)
      run_chunks(0, 1);
    else
      at::parallel_for(0, chunks, 1, run_chunks);
    // The outputs: per net, per linear layer dβ, dV, dg, db; then dσ.
    const int64_t per_net = static_cast<int64_t>(params.size()) / 2, n_linear = s.n_res * (n_mlp + 1);
    grads.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) grads[i] = at::empty(params_in[i].sizes(), u.options());
    // Each gradient summed over the chunks, one task per linear layer, its D-sized side back in
    // the original feature order (Problem); dW straight on to V and g.
    const int64_t mw = p.max_width();
    at::parallel_for(0, 2 * (n_linear + 1), 1, [&](int64_t k0, int64_t k1) {
      T* sum = thread_scratch<T, kWork>(2 * mw * mw);
      T* dW = sum + mw * mw;
      // the chunks' sum of `length` values at `offset`: into `out`, or, with `unpermute`, into
      // `out` with each value at its original feature index
      auto chunk_sum = [&](int64_t offset, int64_t length, T* out, bool unpermute) {
        run_sum_chunks(partial + offset, chunks, gl.size, length, unpermute ? sum : out);
        if (unpermute) p.reorder(sum, out, 1, length, /*by_rows=*/false, /*back=*/true);
      };
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t n = k / (n_linear + 1), l = k % (n_linear + 1), base = n * per_net + 4 * l;
        if (l == n_linear) {  // σ
          chunk_sum(gl.sigma[n], s.D, grads[n * per_net + per_net - 1].data_ptr<T>(), true);
          continue;
        }
        const int64_t i = l % (n_mlp + 1), w_in = p.in_width(i), w_out = p.out_width(i);
        chunk_sum(gl.beta[n][l], w_in, grads[base].data_ptr<T>(), i == 0);
        chunk_sum(gl.b[n][l], w_out, grads[base + 3].data_ptr<T>(), i == n_mlp);
        const T* dW_sum = partial + gl.W[n][l];  // a single chunk holds the sum
        if (chunks > 1) {
          run_sum_chunks(dW_sum, chunks, gl.size, w_out * w_in, sum);
          dW_sum = sum;
        }
        if (i == 0 || i == n_mlp) {  // its columns / rows back in the original order
          p.reorder(dW_sum, dW, w_out, w_in, /*by_rows=*/i != 0, /*back=*/true);
          dW_sum = dW;
        }
        run_weight_norm_backward(w_out, w_in, params[base + 1].data_ptr<T>(), params[base + 2].data_ptr<T>(), dW_sum,
                                 grads[base + 1].data_ptr<T>(), grads[base + 2].data_ptr<T>());
      }
    });
  });
  return {grad_u.view(u_in.sizes()), grads};
}

// ----------------------------------------------------------------------------- autograd

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& u,
                                                const Tensor& ldj, at::TensorList params, int64_t n_mlp,
                                                bool inverse, bool recompute) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op("rgflow_fast::rg_coupling_layer_forward")
                          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, at::TensorList,
                                                                     int64_t, bool, bool)>();
    auto [y, ldj_out, acts] = fwd.call(u, ldj, params, n_mlp, inverse, !recompute);
    std::vector<Tensor> saved{u, acts};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n_mlp"] = n_mlp;
    ctx->saved_data["inverse"] = inverse;
    ctx->saved_data["batch"] = ldj.size(0);
    return {y, ldj_out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto bwd = op("rgflow_fast::rg_coupling_layer_backward")
                          .typed<std::tuple<Tensor, std::vector<Tensor>>(const Tensor&, const Tensor&, at::TensorList,
                                                                          const Tensor&, const Tensor&, int64_t, bool)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor& u = saved[0];
    const std::vector<Tensor> params(saved.begin() + 2, saved.end());
    Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(u);
    Tensor grad_ldj = grads[1].defined() ? grads[1] : at::zeros({ctx->saved_data["batch"].toInt()}, u.options());
    auto [grad_u, grad_params] = bwd.call(u, saved[1], params, grad_y, grad_ldj, ctx->saved_data["n_mlp"].toInt(),
                                          ctx->saved_data["inverse"].toBool());
    torch::autograd::variable_list out{grad_u, grad_ldj};
    out.insert(out.end(), grad_params.begin(), grad_params.end());
    out.resize(out.size() + 3);  // n_mlp, inverse, recompute
    return out;
  }
};

std::tuple<Tensor, Tensor> layer_autograd(const Tensor& u, const Tensor& ldj, at::TensorList params, int64_t n_mlp,
                                          bool inverse, bool recompute) {
  bool needs_grad = torch::autograd::GradMode::is_enabled() && (u.requires_grad() || ldj.requires_grad());
  for (const Tensor& t : params) needs_grad = needs_grad || (torch::autograd::GradMode::is_enabled() && t.requires_grad());
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto plain = op("rgflow_fast::rg_coupling_layer")
                            .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, at::TensorList, int64_t,
                                                              bool, bool)>();
    return plain.call(u, ldj, params, n_mlp, inverse, recompute);
  }
  auto out = LayerFunction::apply(u, ldj, params, n_mlp, inverse, recompute);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> layer_inference(const Tensor& u, const Tensor& ldj, at::TensorList params, int64_t n_mlp,
                                           bool inverse, bool recompute) {
  auto [y, ldj_out, acts] = layer_forward(u, ldj, params, n_mlp, inverse, false);
  return {y, ldj_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rgflow_fast, m) {
  m.def("rg_coupling_layer(Tensor u, Tensor ldj, Tensor[] params, int n_mlp, bool inverse, bool recompute) -> (Tensor, Tensor)");
  m.def("rg_coupling_layer_forward(Tensor u, Tensor ldj, Tensor[] params, int n_mlp, bool inverse, bool store) -> (Tensor, Tensor, Tensor)");
  m.def("rg_coupling_layer_cpu_products() -> str[]", &cpu_products);
  m.def("rg_coupling_layer_cpu_activation_cache(bool release) -> int[]", &activation_cache);
  m.def("rg_coupling_layer_backward(Tensor u, Tensor acts, Tensor[] params, Tensor grad_y, Tensor grad_ldj, int n_mlp, bool inverse) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(rgflow_fast, CPU, m) {
  m.impl("rg_coupling_layer", &layer_inference);
  m.impl("rg_coupling_layer_forward", &layer_forward);
  m.impl("rg_coupling_layer_backward", &layer_backward);
}

TORCH_LIBRARY_IMPL(rgflow_fast, Autograd, m) {
  m.impl("rg_coupling_layer", &layer_autograd);
}

}  // namespace rgflow_fast
