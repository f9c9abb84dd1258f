// Fused distillation loss, CPU kernel (torch-free). See kd_loss.h for what it computes.
//
// The row body (below, in the TORCHSLIM_KD_BODY section) is written once against a small
// vector interface V and compiled three times by re-including this file: for AVX-512 and
// AVX2 (inside `#pragma GCC target` regions, so only those functions use the wider ISA)
// and for plain scalar code. Float64 logits use a scalar double body with std::exp2.
#ifndef TORCHSLIM_KD_BODY

#include "kernels/cpu/kd_loss.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* operands).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace torchslim {
namespace cpu {
namespace kd_detail {

struct Bf16 { uint16_t x; };
struct F16 { uint16_t x; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(Bf16 v) { return bits_to_float(uint32_t(v.x) << 16); }
inline float to_float(F16 v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return bits_to_float(float_to_bits(mag) | sign);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round-to-nearest-even conversions from float.
template <class T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline Bf16 from_float<Bf16>(float v) {
  uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{uint16_t(u >> 16)};
}
template <> inline F16 from_float<F16>(float v) {
  uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return F16{uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (u >= 0x477ff000u) return F16{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (u < 0x38800000u) {  // below 2^-14: subnormal half, in units of 2^-24
    const float scaled = bits_to_float(u) * 16777216.0f;  // exact
    return F16{uint16_t(sign | uint32_t(std::nearbyint(scaled)))};
  }
  u += 0xfffu + ((u >> 13) & 1u);
  return F16{uint16_t(sign | ((u - (112u << 23)) >> 13))};
}

constexpr int64_t kBlock = 1024;  // elements per block: both inputs of a block stay in L1
// Rows of at most this many classes take the row-group body (kd_rows_small): W rows at a
// time, one row per SIMD lane, so the per-row work (maxima, sums, the final logarithm)
// is shared by W rows instead of paid per row. Measured (AVX-512, 1 thread, fwd+bwd at
// 4096 rows): 2.4x the row body at C = 10, 1.1-2x at C = 32-56, even at 64 (fp32; bf16
// 1.2x), behind from ~80 classes on, where the transposes cost more than the per-row work.
constexpr int64_t kSmallClasses = 64;
constexpr double kLog2e = 1.4426950408889634;

// 2^f on [-0.5, 0.5], degree 6 (Chebyshev fit, relative error 2.6e-9).
constexpr float kP0 = 0.99999999995954820f, kP1 = 0.69314720671061980f, kP2 = 0.24022651213596563f,
                kP3 = 0.05550327214209915f, kP4 = 0.009618025602807178f, kP5 = 0.0013400432165100828f,
                kP6 = 0.0001546973202032385f;

// log(1 + f) on [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf, about 1 ulp in float).
constexpr float kL0 = 7.0376836292e-2f, kL1 = -1.1514610310e-1f, kL2 = 1.1676998740e-1f, kL3 = -1.2420140846e-1f,
                kL4 = 1.4249322787e-1f, kL5 = -1.6668057665e-1f, kL6 = 2.0000714765e-1f, kL7 = -2.4999993993e-1f,
                kL8 = 3.3333331174e-1f;

struct BlockStats {
  double ms, mt;  // shifts used for the block's exponentials (then: their rescale factors)
  double zs, zt;  // sums of the block's exponentials
  double w;       // sum of e_t * ((t - shift_t) - (s - shift_s)) over the block
  double dz;      // sum of (e_s - e_t): Zs - Zt without the rounding of two large sums
};

inline float nan_ignoring_max(float m, float x) { return x > m ? x : m; }
inline double nan_ignoring_max(double m, double x) { return x > m ? x : m; }

// ---- scalar float interface (W = 1) ----
struct ScalarF {
  using A = float;
  using vf = float;
  using vacc = double;  // one lane sums a whole block: accumulate in double
  static constexpr int W = 1;
  static vacc acc_add(vacc a, vf b) { return a + double(b); }
  static vacc acc_zero() { return 0.0; }
  static vf set1(float v) { return v; }
  static vf zero() { return 0.0f; }
  static vf load(const float* p) { return *p; }
  static vf load(const Bf16* p) { return to_float(*p); }
  static vf load(const F16* p) { return to_float(*p); }
  static void store(float* p, vf v) { *p = v; }
  static void store(Bf16* p, vf v) { *p = from_float<Bf16>(v); }
  static void store(F16* p, vf v) { *p = from_float<F16>(v); }
  template <class P> static void stream(P* p, vf v) { store(p, v); }
  template <class P> static vf load_n(const P* p, int n) { return n > 0 ? load(p) : 0.0f; }
  template <class P> static vf load_pad(const P* p, int n, float fill) { return n > 0 ? load(p) : fill; }
  template <class P> static void store_n(P* p, vf v, int n) { if (n > 0) store(p, v); }
  static void fence() {}
  static vf add(vf a, vf b) { return a + b; }
  static vf sub(vf a, vf b) { return a - b; }
  static vf mul(vf a, vf b) { return a * b; }
  static vf max_ignore_nan(vf acc, vf x) { return nan_ignoring_max(acc, x); }
  static vf select_pos(vf e, vf v) { return e > 0.0f ? v : 0.0f; }
  static float hmax(vf v) { return v; }
  static double hsum(vacc v) { return v; }
  static void transpose(vf*) {}  // 1 x 1
  static vf exp2(vf y) {
    if (y < -127.0f) y = -127.0f;  // NaN passes through
    const float n = std::nearbyint(y);
    const float f = y - n;
    float p = kP6;
    p = p * f + kP5; p = p * f + kP4; p = p * f + kP3; p = p * f + kP2; p = p * f + kP1; p = p * f + kP0;
    if (std::isnan(y)) return y;
    return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  }
};

// ---- scalar double interface (float64 logits: gradcheck and reference-grade results) ----
struct ScalarD {
  using A = double;
  using vf = double;
  using vacc = double;
  static constexpr int W = 1;
  static vacc acc_add(vacc a, vf b) { return a + b; }
  static vacc acc_zero() { return 0.0; }
  static vf set1(double v) { return v; }
  static vf zero() { return 0.0; }
  static vf load(const double* p) { return *p; }
  static void store(double* p, vf v) { *p = v; }
  static void stream(double* p, vf v) { *p = v; }
  static vf load_pad(const double* p, int n, double fill) { return n > 0 ? *p : fill; }
  static void store_n(double* p, vf v, int n) { if (n > 0) *p = v; }
  static void fence() {}
  static vf add(vf a, vf b) { return a + b; }
  static vf sub(vf a, vf b) { return a - b; }
  static vf mul(vf a, vf b) { return a * b; }
  static vf max_ignore_nan(vf acc, vf x) { return nan_ignoring_max(acc, x); }
  static vf select_pos(vf e, vf v) { return e > 0.0 ? v : 0.0; }
  static double hmax(vf v) { return v; }
  static double hsum(vf v) { return v; }
  static vf exp2(vf y) { return std::exp2(y); }
};

}  // namespace kd_detail

#define TORCHSLIM_KD_BODY
namespace kd_scalar {
using namespace kd_detail;
using V = ScalarF;
#include "kernels/cpu/kd_loss.cpp"
}  // namespace kd_scalar

namespace kd_scalar_f64 {
using namespace kd_detail;
using V = ScalarD;
#include "kernels/cpu/kd_loss.cpp"
}  // namespace kd_scalar_f64

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace kd_avx2 {
using namespace kd_detail;

struct Avx2 {
  using A = float;
  using vf = __m256;
  using vacc = __m256;  // 8 lanes, each summing 1/8 of a block
  static constexpr int W = 8;
  static vacc acc_add(vacc a, vf b) { return _mm256_add_ps(a, b); }
  static vacc acc_zero() { return _mm256_setzero_ps(); }
  static vf set1(float v) { return _mm256_set1_ps(v); }
  static vf zero() { return _mm256_setzero_ps(); }
  static vf load(const float* p) { return _mm256_loadu_ps(p); }
  static vf load(const Bf16* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static vf load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static __m128i to_bf16(vf v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
  }
  static void store(Bf16* p, vf v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static void store(F16* p, vf v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  // Streaming stores: p aligned to the vector's byte width.
  static void stream(float* p, vf v) { _mm256_stream_ps(p, v); }
  static void stream(Bf16* p, vf v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static void stream(F16* p, vf v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void fence() { _mm_sfence(); }
  static __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // The first n (< W) elements, the rest 0; 16-bit types through a small buffer (AVX2 has
  // no 16-bit masked load).
  static vf load_n(const float* p, int n) { return _mm256_maskload_ps(p, lanes_below(n)); }
  template <class P> static vf load_n(const P* p, int n) {
    alignas(32) P tmp[8] = {};
    std::memcpy(tmp, p, sizeof(P) * n);
    return load(tmp);
  }
  // The first n (< W) elements, the rest `fill`.
  template <class P> static vf load_pad(const P* p, int n, float fill) {
    return _mm256_blendv_ps(_mm256_set1_ps(fill), load_n(p, n), _mm256_castsi256_ps(lanes_below(n)));
  }
  static void store_n(float* p, vf v, int n) { _mm256_maskstore_ps(p, lanes_below(n), v); }
  template <class P> static void store_n(P* p, vf v, int n) {
    alignas(32) P tmp[8];
    store(tmp, v);
    std::memcpy(p, tmp, sizeof(P) * n);
  }
  // 8 x 8 in place: r[k] holds column k of the rows r[0..7] held before.
  static void transpose(vf* r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3: u[4h + k] = column 4L + k of each 128-bit lane L
      u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
      u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
      u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
      u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
      r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
    }
  }
  static vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
  // log1p(x) for x > -1 with 1 + x finite and normal (the row-group sums guarantee it):
  // log(u) * x / (u - 1), u = 1 + x, which corrects the rounding of u (x where u == 1).
  static vf log1p(vf x) {
    const vf one = _mm256_set1_ps(1.0f);
    const vf u = _mm256_add_ps(one, x);
    const __m256i bits = _mm256_castps_si256(u);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    vf m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)),
                                               _mm256_set1_epi32(0x3f800000)));  // [1, 2)
    const vf big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // + 1 where halved (mask is -1)
    const vf ef = _mm256_cvtepi32_ps(e);
    const vf f = _mm256_sub_ps(m, one);
    const vf z = _mm256_mul_ps(f, f);
    vf y = _mm256_set1_ps(kL0);
    for (float c : {kL1, kL2, kL3, kL4, kL5, kL6, kL7, kL8}) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(c));
    y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
    y = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
    vf lg = _mm256_add_ps(f, y);
    lg = _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), lg);
    const vf d = _mm256_sub_ps(u, one);
    const vf r = _mm256_mul_ps(lg, _mm256_div_ps(x, d));
    return _mm256_blendv_ps(r, x, _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ));
  }
  static vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
  static vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
  static vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  // max(x, acc) returns acc when x is NaN: a NaN logit never becomes the shift.
  static vf max_ignore_nan(vf acc, vf x) { return _mm256_max_ps(x, acc); }
  static vf select_pos(vf e, vf v) { return _mm256_and_ps(_mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_GT_OQ), v); }
  static float hmax(vf v) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    float m = -std::numeric_limits<float>::infinity();
    for (float x : tmp) m = nan_ignoring_max(m, x);
    return m;
  }
  static double hsum(vf v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    alignas(32) double tmp[4];
    _mm256_store_pd(tmp, _mm256_add_pd(lo, hi));
    return (tmp[0] + tmp[1]) + (tmp[2] + tmp[3]);
  }
  static vf exp2(vf y) {
    y = _mm256_max_ps(_mm256_set1_ps(-127.0f), y);  // NaN (second operand) passes through
    const vf n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf f = _mm256_sub_ps(y, n);
    vf p = _mm256_set1_ps(kP6);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP0));
    const __m256i k = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(k, 23)));
  }
};

using V = Avx2;
#include "kernels/cpu/kd_loss.cpp"
}  // namespace kd_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace kd_avx512 {
using namespace kd_detail;

struct Avx512 {
  using A = float;
  using vf = __m512;
  using vacc = __m512;
  static constexpr int W = 16;
  static vacc acc_add(vacc a, vf b) { return _mm512_add_ps(a, b); }
  static vacc acc_zero() { return _mm512_setzero_ps(); }
  static vf set1(float v) { return _mm512_set1_ps(v); }
  static vf zero() { return _mm512_setzero_ps(); }
  static vf load(const float* p) { return _mm512_loadu_ps(p); }
  static vf load(const Bf16* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static vf load(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static __m256i to_bf16(vf v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  static void store(Bf16* p, vf v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void store(F16* p, vf v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void stream(float* p, vf v) { _mm512_stream_ps(p, v); }
  static void stream(Bf16* p, vf v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void stream(F16* p, vf v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void fence() { _mm_sfence(); }
  static __mmask16 lanes_below(int n) { return __mmask16((1u << n) - 1u); }
  // The first n (< W) elements, the rest 0 (masked loads: nothing past p + n is read).
  static vf load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes_below(n), p); }
  static vf load_n(const Bf16* p, int n) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes_below(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static vf load_n(const F16* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes_below(n), p)); }
  // The first n (< W) elements, the rest `fill`.
  template <class P> static vf load_pad(const P* p, int n, float fill) {
    return _mm512_mask_blend_ps(lanes_below(n), _mm512_set1_ps(fill), load_n(p, n));
  }
  static void store_n(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, lanes_below(n), v); }
  static void store_n(Bf16* p, vf v, int n) { _mm256_mask_storeu_epi16(p, lanes_below(n), to_bf16(v)); }
  static void store_n(F16* p, vf v, int n) {
    _mm256_mask_storeu_epi16(p, lanes_below(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  // 16 x 16 in place: r[k] holds column k of the rows r[0..15] held before.
  static void transpose(vf* r) {
    __m512 t[16], u[16], v[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; ++q) {  // rows 4q..4q+3: u[4q + k] = column 4L + k of each 128-bit lane L
      u[4 * q + 0] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
      u[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
      u[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
      u[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {  // gather the 128-bit lanes: even lanes (0x88) and odd lanes (0xdd)
      v[k] = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);
      v[4 + k] = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);
      v[8 + k] = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
      v[12 + k] = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
    }
    for (int k = 0; k < 4; ++k) {
      r[k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0x88);
      r[8 + k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0xdd);
      r[4 + k] = _mm512_shuffle_f32x4(v[4 + k], v[12 + k], 0x88);
      r[12 + k] = _mm512_shuffle_f32x4(v[4 + k], v[12 + k], 0xdd);
    }
  }
  static vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
  // log1p(x) for x > -1 with 1 + x finite and normal (the row-group sums guarantee it):
  // log(u) * x / (u - 1), u = 1 + x, which corrects the rounding of u (x where u == 1).
  static vf log1p(vf x) {
    const vf one = _mm512_set1_ps(1.0f);
    const vf u = _mm512_add_ps(one, x);
    const __m512i bits = _mm512_castps_si512(u);
    __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(127));
    vf m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffff)),
                                               _mm512_set1_epi32(0x3f800000)));  // [1, 2)
    const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
    const vf ef = _mm512_cvtepi32_ps(e);
    const vf f = _mm512_sub_ps(m, one);
    const vf z = _mm512_mul_ps(f, f);
    vf y = _mm512_set1_ps(kL0);
    for (float c : {kL1, kL2, kL3, kL4, kL5, kL6, kL7, kL8}) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(c));
    y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
    y = _mm512_fmadd_ps(ef, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
    vf lg = _mm512_add_ps(f, y);
    lg = _mm512_fmadd_ps(ef, _mm512_set1_ps(0.693359375f), lg);
    const vf d = _mm512_sub_ps(u, one);
    const vf r = _mm512_mul_ps(lg, _mm512_div_ps(x, d));
    return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_EQ_OQ), x);
  }
  static vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
  static vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
  static vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static vf max_ignore_nan(vf acc, vf x) { return _mm512_max_ps(x, acc); }
  static vf select_pos(vf e, vf v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ), v);
  }
  static float hmax(vf v) {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, v);
    float m = -std::numeric_limits<float>::infinity();
    for (float x : tmp) m = nan_ignoring_max(m, x);
    return m;
  }
  static double hsum(vf v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  }
  static vf exp2(vf y) {
    y = _mm512_max_ps(_mm512_set1_ps(-127.0f), y);
    const vf n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf f = _mm512_sub_ps(y, n);
    vf p = _mm512_set1_ps(kP6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP0));
    const __m512i k = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(k, 23)));
  }
};

using V = Avx512;
#include "kernels/cpu/kd_loss.cpp"
}  // namespace kd_avx512
#pragma GCC pop_options
#endif  // __x86_64__
#undef TORCHSLIM_KD_BODY

double kd_loss_rows(const KdLossParams& p, int64_t begin, int64_t end) {
  if (begin >= end) return 0.0;
  if (p.dtype == KdDtype::F64) return kd_scalar_f64::rows_entry<>(p, begin, end);
#if defined(__x86_64__)
  switch (simd_level()) {
    case SimdLevel::AVX512: return kd_avx512::rows_entry<>(p, begin, end);
    case SimdLevel::AVX2: return kd_avx2::rows_entry<>(p, begin, end);
    default: break;
  }
#endif
  return kd_scalar::rows_entry<>(p, begin, end);
}

}  // namespace cpu
}  // namespace torchslim

#else  // TORCHSLIM_KD_BODY: the row body, compiled once per vector interface V

template <class In, class A>
static inline void store_one(In* dst, A v) {
  if constexpr (std::is_same_v<In, A>) *dst = v;
  else *dst = from_float<In>(float(v));
}

template <class In, bool kGrad>
static double kd_rows(const KdLossParams& p, int64_t begin, int64_t end) {
  using A = typename V::A;
  using vf = typename V::vf;
  constexpr int W = V::W;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t C = p.classes;
  const int64_t nb = (C + kBlock - 1) / kBlock;
  const double T = p.temperature;
  const double invT = 1.0 / T;
  const vf vkk = V::set1(A(invT * kLog2e));

  const In* S = static_cast<const In*>(p.student);
  const In* Tt = static_cast<const In*>(p.teacher);
  In* G = static_cast<In*>(p.grad);
  const A* RW = static_cast<const A*>(p.row_weight);

  // Student exponentials go to the gradient row itself (it is rewritten in place) unless the
  // gradient is streamed out or has another dtype; teacher exponentials to the scratch.
  const bool in_place = std::is_same_v<In, A> && !p.stream_grad;
  const int64_t scratch_len = kGrad ? (in_place ? C : 2 * C) : 0;
  std::unique_ptr<A[]> scratch(new A[scratch_len + 1]);
  std::vector<BlockStats> blocks(nb);
  double total = 0.0;

  for (int64_t r = begin; r < end; ++r) {
    const In* s = S + r * p.student_row_stride;
    const In* t = Tt + r * p.teacher_row_stride;
    const double wr = RW ? double(RW[r]) : 1.0;
    In* g = kGrad ? G + r * C : nullptr;
    if (wr == 0.0) {  // padding row: counts for nothing, whatever its logits hold
      if constexpr (kGrad) std::memset(static_cast<void*>(g), 0, sizeof(In) * C);
      if (p.row_loss) p.row_loss[r] = 0.0;
      continue;
    }
    A* es = nullptr;
    A* et = nullptr;
    if constexpr (kGrad) {
      et = scratch.get();
      es = in_place ? reinterpret_cast<A*>(g) : scratch.get() + C;
    }

    A run_s = kNegInf, run_t = kNegInf;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t lo = b * kBlock;
      const int64_t n = std::min<int64_t>(kBlock, C - lo);
      const In* sb = s + lo;
      const In* tb = t + lo;
      // Pass A: the block's maxima (the block is now in L1 for pass B).
      vf vms = V::set1(kNegInf), vmt = V::set1(kNegInf);
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        vms = V::max_ignore_nan(vms, V::load(sb + i));
        vmt = V::max_ignore_nan(vmt, V::load(tb + i));
      }
      if (i < n) {  // tail: masked loads, -inf in the other lanes
        vms = V::max_ignore_nan(vms, V::load_pad(sb + i, int(n - i), kNegInf));
        vmt = V::max_ignore_nan(vmt, V::load_pad(tb + i, int(n - i), kNegInf));
      }
      const A bms = V::hmax(vms), bmt = V::hmax(vmt);
      run_s = nan_ignoring_max(run_s, bms);
      run_t = nan_ignoring_max(run_t, bmt);
      // All -inf so far: shift by 0 so that exp(-inf - 0) = 0 instead of NaN.
      const A sh_s = run_s == kNegInf ? A(0) : run_s;
      const A sh_t = run_t == kNegInf ? A(0) : run_t;
      const vf vsh_s = V::set1(sh_s), vsh_t = V::set1(sh_t);

      // Pass B: one exponential per element per input, sums, and the KL cross term.
      using vacc = typename V::vacc;
      vacc vzs = V::acc_zero(), vzt = V::acc_zero(), vw = V::acc_zero(), vdz = V::acc_zero();
      auto step = [&](vf xs, vf xt, A* es_out, A* et_out) {
        const vf ds = V::sub(xs, vsh_s);
        const vf dt = V::sub(xt, vsh_t);
        const vf e_s = V::exp2(V::mul(ds, vkk));
        const vf e_t = V::exp2(V::mul(dt, vkk));
        vzs = V::acc_add(vzs, e_s);
        vzt = V::acc_add(vzt, e_t);
        vdz = V::acc_add(vdz, V::sub(e_s, e_t));
        // 0 * log 0 = 0: classes the teacher gives no mass contribute nothing.
        vw = V::acc_add(vw, V::select_pos(e_t, V::mul(e_t, V::sub(dt, ds))));
        if constexpr (kGrad) {
          V::store(es_out, e_s);
          V::store(et_out, e_t);
        }
      };
      i = 0;
      for (; i + W <= n; i += W) {
        step(V::load(sb + i), V::load(tb + i), kGrad ? es + lo + i : nullptr, kGrad ? et + lo + i : nullptr);
      }
      if (i < n) {  // tail: pad with -inf, whose exponentials are 0; only n - i lanes are stored
        const int m = int(n - i);
        alignas(64) A os[W], ot[W];
        step(V::load_pad(sb + i, m, kNegInf), V::load_pad(tb + i, m, kNegInf), os, ot);
        if constexpr (kGrad) {
          V::store_n(es + lo + i, V::load(os), m);
          V::store_n(et + lo + i, V::load(ot), m);
        }
      }
      blocks[b] = BlockStats{double(sh_s), double(sh_t), V::hsum(vzs), V::hsum(vzt), V::hsum(vw), V::hsum(vdz)};
    }

    // Combine the blocks in double: rescale each to the row's final shift.
    const double Ms = blocks[nb - 1].ms, Mt = blocks[nb - 1].mt;
    double Zs = 0.0, Zt = 0.0, Wx = 0.0, Dz = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      BlockStats& k = blocks[b];
      const double fs = k.zs == 0.0 ? 0.0 : (k.ms == Ms ? 1.0 : std::exp((k.ms - Ms) * invT));
      const double ft = k.zt == 0.0 ? 0.0 : (k.mt == Mt ? 1.0 : std::exp((k.mt - Mt) * invT));
      Zs += fs * k.zs;
      Zt += ft * k.zt;
      if (ft != 0.0) Wx += ft * (k.w + ((k.mt - Mt) - (k.ms - Ms)) * k.zt);
      Dz += fs * k.dz + (fs - ft) * k.zt;  // fs * zs - ft * zt
      k.ms = fs;
      k.mt = ft;
    }
    // KL = E_t[(t - Mt)/T - (s - Ms)/T] + log Zs - log Zt, the last two as log1p((Zs - Zt) / Zt):
    // at high temperatures Zs ~ Zt and T^2 would amplify the rounding of two separate logs.
    double kl = Wx * invT / Zt + std::log1p(Dz / Zt);
    if (kl < 0.0) kl = 0.0;  // rounding only: KL >= 0 (NaN passes through)
    const double loss = wr * T * T * kl;
    if (p.row_loss) p.row_loss[r] = loss;
    total += loss;

    if constexpr (kGrad) {
      // Pass C: grad = w_r * T * scale * (p_s - p_t), from the kept exponentials.
      const double gr = wr * T * p.grad_scale;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t lo = b * kBlock;
        const int64_t n = std::min<int64_t>(kBlock, C - lo);
        const A cs = A(gr * blocks[b].ms / Zs);
        const A ct = A(gr * blocks[b].mt / Zt);
        const vf vcs = V::set1(cs), vct = V::set1(ct);
        const A* esb = es + lo;
        const A* etb = et + lo;
        In* gb = g + lo;
        // Equal scales (identical rows among others): cs * (e_s - e_t), exactly 0 where e_s == e_t.
        const bool same = cs == ct;
        auto vec_at = [&](int64_t i) {
          const vf a = V::load(esb + i), b = V::load(etb + i);
          return same ? V::mul(vcs, V::sub(a, b)) : V::sub(V::mul(vcs, a), V::mul(vct, b));
        };
        auto one_at = [&](int64_t i) { return same ? cs * (esb[i] - etb[i]) : cs * esb[i] - ct * etb[i]; };
        int64_t i = 0;
        if (p.stream_grad) {
          constexpr uintptr_t kAlign = uintptr_t(W) * sizeof(In);
          for (; i < n && reinterpret_cast<uintptr_t>(gb + i) % kAlign != 0; ++i) store_one(gb + i, one_at(i));
          for (; i + W <= n; i += W) V::stream(gb + i, vec_at(i));
        } else {
          for (; i + W <= n; i += W) V::store(gb + i, vec_at(i));
        }
        if (i < n) {  // tail: masked loads and stores (nothing past the row is read or written)
          const int m = int(n - i);
          const vf a = V::load_pad(esb + i, m, A(0)), b = V::load_pad(etb + i, m, A(0));
          V::store_n(gb + i, same ? V::mul(vcs, V::sub(a, b)) : V::sub(V::mul(vcs, a), V::mul(vct, b)), m);
        }
      }
    }
  }
  if constexpr (kGrad) {
    if (p.stream_grad) V::fence();
  }
  return total;
}

// Few classes per row: rows r0..r0+W-1 are loaded (W x W tiles, transposed in registers)
// into a column-major scratch col[j] = class j of the W rows, one row per lane, so every
// vector step serves W rows. Per lane this is the single-block case of kd_rows: the same
// shifts, exponentials, sums and final formulas (sums of <= kSmallClasses terms in float).
// VS: V, as a template parameter so that the f64 body (no transpose) never instantiates it.
template <class In, bool kGrad, class VS = V>
static double kd_rows_small(const KdLossParams& p, int64_t begin, int64_t end) {
  using A = float;
  using vf = typename VS::vf;
  constexpr int W = VS::W;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t C = p.classes;
  const int64_t tiles = (C + W - 1) / W;
  const double T = p.temperature;
  const double invT = 1.0 / T;
  const vf vkk = VS::set1(A(invT * kLog2e));
  const In* S = static_cast<const In*>(p.student);
  const In* Tt = static_cast<const In*>(p.teacher);
  In* G = static_cast<In*>(p.grad);
  const A* RW = static_cast<const A*>(p.row_weight);

  // Column-major tiles of the group: logits, then their exponentials in place.
  alignas(64) A cs_buf[kSmallClasses * W], ct_buf[kSmallClasses * W];
  alignas(64) A zs[W], zt[W], wx[W], dz[W], gs[W], gt[W], keep[W];
  vf tile[W];
  double total = 0.0;

  // Rows r0.. (nr of them; the other lanes read as 0) of one input into buf, transposed.
  auto load_group = [&](const In* base, int64_t stride, int64_t r0, int nr, A* buf) {
    for (int64_t jt = 0; jt < tiles; ++jt) {
      const int64_t j0 = jt * W;
      const int n = int(std::min<int64_t>(W, C - j0));
      for (int l = 0; l < W; ++l) {
        const In* row = base + (r0 + l) * stride + j0;
        tile[l] = l >= nr ? VS::zero() : (n == W ? VS::load(row) : VS::load_n(row, n));
      }
      VS::transpose(tile);
      for (int k = 0; k < n; ++k) VS::store(buf + (j0 + k) * W, tile[k]);
    }
  };

  for (int64_t r0 = begin; r0 < end; r0 += W) {
    const int nr = int(std::min<int64_t>(W, end - r0));
    load_group(S, p.student_row_stride, r0, nr, cs_buf);
    load_group(Tt, p.teacher_row_stride, r0, nr, ct_buf);

    // Row maxima (a NaN logit never becomes the shift; all -inf: shift by 0).
    vf vms = VS::set1(kNegInf), vmt = VS::set1(kNegInf);
    for (int64_t j = 0; j < C; ++j) {
      vms = VS::max_ignore_nan(vms, VS::load(cs_buf + j * W));
      vmt = VS::max_ignore_nan(vmt, VS::load(ct_buf + j * W));
    }
    alignas(64) A ms[W], mt[W];
    VS::store(ms, vms);
    VS::store(mt, vmt);
    for (int l = 0; l < W; ++l) {
      if (ms[l] == kNegInf) ms[l] = 0.0f;
      if (mt[l] == kNegInf) mt[l] = 0.0f;
    }
    const vf vsh_s = VS::load(ms), vsh_t = VS::load(mt);

    // One exponential per element per input, the sums and the KL cross term.
    vf vzs = VS::zero(), vzt = VS::zero(), vw = VS::zero(), vdz = VS::zero();
    for (int64_t j = 0; j < C; ++j) {
      const vf ds = VS::sub(VS::load(cs_buf + j * W), vsh_s);
      const vf dt = VS::sub(VS::load(ct_buf + j * W), vsh_t);
      const vf e_s = VS::exp2(VS::mul(ds, vkk));
      const vf e_t = VS::exp2(VS::mul(dt, vkk));
      vzs = VS::add(vzs, e_s);
      vzt = VS::add(vzt, e_t);
      vdz = VS::add(vdz, VS::sub(e_s, e_t));
      vw = VS::add(vw, VS::select_pos(e_t, VS::mul(e_t, VS::sub(dt, ds))));  // 0 * log 0 = 0
      if constexpr (kGrad) {
        VS::store(cs_buf + j * W, e_s);
        VS::store(ct_buf + j * W, e_t);
      }
    }
    VS::store(zs, vzs);
    VS::store(zt, vzt);
    VS::store(wx, vw);
    VS::store(dz, vdz);

    // The loss and the gradient's two scales (kd_rows with one block). Vector (float) when
    // every lane is a row that counts with non-zero sums, per row in double otherwise.
    const double gscale = T * p.grad_scale;
    bool ordinary = false;
    if constexpr (W > 1) {
      ordinary = nr == W;
      for (int l = 0; ordinary && l < W; ++l) {
        ordinary = zs[l] != 0.0f && zt[l] != 0.0f && (!RW || RW[r0 + l] != 0.0f);
      }
    }
    if constexpr (W > 1) {
      if (ordinary) {
        const vf vwr = RW ? VS::load(RW + r0) : VS::set1(1.0f);
        // kl = W / (T Zt) + log1p(Dz / Zt) >= 0 (rounding only; NaN passes through).
        vf kl = VS::add(VS::div(VS::mul(vw, VS::set1(A(invT))), vzt), VS::log1p(VS::div(vdz, vzt)));
        kl = VS::max_ignore_nan(kl, VS::zero());
        alignas(64) A loss[W];
        VS::store(loss, VS::mul(VS::mul(vwr, VS::set1(A(T * T))), kl));
        const vf vg = VS::mul(vwr, VS::set1(A(gscale)));
        VS::store(gs, VS::div(vg, vzs));
        VS::store(gt, VS::div(vg, vzt));
        for (int l = 0; l < W; ++l) {
          keep[l] = 1.0f;
          if (p.row_loss) p.row_loss[r0 + l] = double(loss[l]);
          total += double(loss[l]);
        }
      }
    }
    for (int l = 0; l < W && !ordinary; ++l) {
      gs[l] = gt[l] = keep[l] = 0.0f;
      if (l >= nr) continue;
      const int64_t r = r0 + l;
      const double wr = RW ? double(RW[r]) : 1.0;
      if (wr == 0.0) {  // padding row: counts for nothing, whatever its logits hold
        if (p.row_loss) p.row_loss[r] = 0.0;
        continue;
      }
      const double fs = zs[l] == 0.0f ? 0.0 : 1.0, ft = zt[l] == 0.0f ? 0.0 : 1.0;
      const double Zs = fs * zs[l], Zt = ft * zt[l];
      const double Wx = ft != 0.0 ? double(wx[l]) : 0.0;
      const double Dz = fs * dz[l] + (fs - ft) * zt[l];
      double kl = Wx * invT / Zt + std::log1p(Dz / Zt);
      if (kl < 0.0) kl = 0.0;  // rounding only: KL >= 0 (NaN passes through)
      const double loss = wr * T * T * kl;
      if (p.row_loss) p.row_loss[r] = loss;
      total += loss;
      gs[l] = A(wr * gscale * fs / Zs);
      gt[l] = A(wr * gscale * ft / Zt);
      keep[l] = 1.0f;
    }

    if constexpr (kGrad) {
      // grad = gs * e_s - gt * e_t, written as gs * (e_s - e_t) + (gs - gt) * e_t: exactly 0
      // where the rows agree (gs == gt, e_s == e_t). Padding rows get exact zeros.
      const vf vgs = VS::load(gs), vdg = VS::sub(vgs, VS::load(gt)), vkeep = VS::load(keep);
      for (int64_t jt = 0; jt < tiles; ++jt) {
        const int64_t j0 = jt * W;
        const int n = int(std::min<int64_t>(W, C - j0));
        for (int k = 0; k < W; ++k) {
          if (k >= n) { tile[k] = VS::zero(); continue; }
          const vf es = VS::load(cs_buf + (j0 + k) * W), et = VS::load(ct_buf + (j0 + k) * W);
          tile[k] = VS::select_pos(vkeep, VS::add(VS::mul(vgs, VS::sub(es, et)), VS::mul(vdg, et)));
        }
        VS::transpose(tile);  // back to one row per vector
        for (int l = 0; l < nr; ++l) {
          In* g = G + (r0 + l) * C + j0;
          if (n == W) VS::store(g, tile[l]);
          else VS::store_n(g, tile[l], n);
        }
      }
    }
  }
  return total;
}

template <class VV = V>
static double rows_entry(const KdLossParams& p, int64_t begin, int64_t end) {
  const bool grad = p.grad != nullptr;
  if constexpr (std::is_same_v<typename VV::A, double>) {
    return grad ? kd_rows<double, true>(p, begin, end) : kd_rows<double, false>(p, begin, end);
  } else {
    const bool small = p.classes <= kSmallClasses;
    switch (p.dtype) {
      case KdDtype::F32:
        if (small) return grad ? kd_rows_small<float, true>(p, begin, end) : kd_rows_small<float, false>(p, begin, end);
        return grad ? kd_rows<float, true>(p, begin, end) : kd_rows<float, false>(p, begin, end);
      case KdDtype::BF16:
        if (small) return grad ? kd_rows_small<Bf16, true>(p, begin, end) : kd_rows_small<Bf16, false>(p, begin, end);
        return grad ? kd_rows<Bf16, true>(p, begin, end) : kd_rows<Bf16, false>(p, begin, end);
      case KdDtype::F16:
        if (small) return grad ? kd_rows_small<F16, true>(p, begin, end) : kd_rows_small<F16, false>(p, begin, end);
        return grad ? kd_rows<F16, true>(p, begin, end) : kd_rows<F16, false>(p, begin, end);
      default:
        break;
    }
  }
  return 0.0;
}

#endif  // TORCHSLIM_KD_BODY
