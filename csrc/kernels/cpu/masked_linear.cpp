// CPU kernels of the masked sparse linear op. See masked_linear.h for the layouts.
#include "kernels/cpu/masked_linear.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_features.h"

#if defined(__x86_64__)
// GCC's own AVX-512 reduction intrinsics trip -Wmaybe-uninitialized (their _mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TS_AVX2 __attribute__((target("avx2,fma")))
#define TS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#endif

namespace torchslim {
namespace cpu {
namespace masked {

// ---------------------------------------------------------------- safe reads

namespace {

// The clamps of "Safe reads" (masked_linear.h): entry ranges into [0, nnz], indices into
// [0, last]. extent <= 0 leaves no entry to read.
struct Bounds {
  int32_t nnz;
  uint32_t last;
  Bounds(int64_t nnz_, int64_t extent)
      : nnz(extent > 0 ? static_cast<int32_t>(std::clamp<int64_t>(nnz_, 0, std::numeric_limits<int32_t>::max())) : 0),
        last(extent > 0 ? static_cast<uint32_t>(std::min<int64_t>(extent, int64_t(1) << 32) - 1) : 0) {}
  // Entries [k0, k1) of row r.
  inline void range(const int32_t* row_ptr, int64_t r, int32_t& k0, int32_t& k1) const {
    const int32_t a = row_ptr[r], b = row_ptr[r + 1];
    k0 = std::clamp(a, int32_t(0), nnz);
    k1 = std::clamp(b, k0, nnz);
  }
  template <typename I>
  inline int64_t at(I c) const {
    return std::min(static_cast<uint32_t>(static_cast<std::make_unsigned_t<I>>(c)), last);
  }
};

}  // namespace

// ---------------------------------------------------------------- structure

namespace {

// Largest index seen, as unsigned (a negative index becomes huge, so one comparison
// covers both ends). Branch-free so the compiler vectorises it; the AVX2 clone is picked
// at run time.
template <typename I>
uint64_t max_unsigned_body(const I* col, int64_t n) {
  using U = std::make_unsigned_t<I>;
  U m = 0;
  for (int64_t k = 0; k < n; ++k) m = std::max(m, static_cast<U>(col[k]));
  return m;
}
#if defined(__x86_64__)
template <typename I>
TS_AVX2 uint64_t max_unsigned_avx2(const I* col, int64_t n) {
  using U = std::make_unsigned_t<I>;
  U m = 0;
  for (int64_t k = 0; k < n; ++k) m = std::max(m, static_cast<U>(col[k]));
  return m;
}
#endif
template <typename I>
uint64_t max_unsigned(const I* col, int64_t n) {
#if defined(__x86_64__)
  if (simd_level() != SimdLevel::Scalar) return max_unsigned_avx2(col, n);
#endif
  return max_unsigned_body(col, n);
}

}  // namespace

template <typename I>
CsrCheck check_csr(const int32_t* row_ptr, int64_t rows, const I* col, int64_t extent) {
  CsrCheck out;
  if (row_ptr[0] != 0) {
    out.fault = CsrFault::FirstNotZero;
    out.where = 0;
    return out;
  }
  bool ordered = true;
  for (int64_t r = 0; r < rows; ++r) ordered &= row_ptr[r + 1] >= row_ptr[r];
  if (!ordered) {
    for (int64_t r = 0; r < rows; ++r) {
      if (row_ptr[r + 1] < row_ptr[r]) {
        out.fault = CsrFault::Decreasing;
        out.where = r;
        return out;
      }
    }
  }
  const int64_t nnz = row_ptr[rows];
  // As unsigned, a negative index is >= 2^(bits-1): cap the extent there so that it fails
  // the one comparison (an int16 index cannot reach 32768 anyway).
  const int64_t cap = std::min<int64_t>(extent, int64_t(1) << (8 * sizeof(I) - 1));
  if (nnz > 0 && (extent <= 0 || max_unsigned(col, nnz) >= static_cast<uint64_t>(cap))) {
    for (int64_t k = 0; k < nnz; ++k) {
      if (col[k] < 0 || col[k] >= extent) {
        out.fault = CsrFault::ColumnOutOfRange;
        out.where = k;
        return out;
      }
    }
  }
  return out;
}

template CsrCheck check_csr<int16_t>(const int32_t*, int64_t, const int16_t*, int64_t);
template CsrCheck check_csr<int32_t>(const int32_t*, int64_t, const int32_t*, int64_t);


void count_rows(const bool* mask, int64_t cols, int32_t* counts, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const unsigned char* m = reinterpret_cast<const unsigned char*>(mask + r * cols);
    int64_t n = 0;
    for (int64_t c = 0; c < cols; ++c) n += m[c] != 0;
    counts[r] = static_cast<int32_t>(n);
  }
}

// Branch-free select on the mask byte so that it vectorises; AVX2 clone picked at run time.
#define TS_MASKED_COPY_BODY                                                           \
  const unsigned char* m = reinterpret_cast<const unsigned char*>(mask);              \
  for (int64_t i = i0; i < i1; ++i) out[i] = w[i] & (U(0) - static_cast<U>(m[i] != 0));

template <typename U>
static void masked_copy_body(const U* w, const bool* mask, U* out, int64_t i0, int64_t i1) {
  TS_MASKED_COPY_BODY
}
#if defined(__x86_64__)
template <typename U>
TS_AVX2 static void masked_copy_avx2(const U* w, const bool* mask, U* out, int64_t i0, int64_t i1) {
  TS_MASKED_COPY_BODY
}
#endif
#undef TS_MASKED_COPY_BODY

template <typename U>
void masked_copy(const U* w, const bool* mask, U* out, int64_t i0, int64_t i1) {
#if defined(__x86_64__)
  if (simd_level() != SimdLevel::Scalar) return masked_copy_avx2(w, mask, out, i0, i1);
#endif
  masked_copy_body(w, mask, out, i0, i1);
}
template void masked_copy<uint16_t>(const uint16_t*, const bool*, uint16_t*, int64_t, int64_t);
template void masked_copy<uint32_t>(const uint32_t*, const bool*, uint32_t*, int64_t, int64_t);
template void masked_copy<uint64_t>(const uint64_t*, const bool*, uint64_t*, int64_t, int64_t);

void count_cols(const bool* mask, int64_t rows, int64_t cols, int32_t* counts, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) counts[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const unsigned char* m = reinterpret_cast<const unsigned char*>(mask + r * cols);
    for (int64_t c = c0; c < c1; ++c) counts[c] += m[c] != 0;
  }
}

template <typename I>
void fill_rows(const bool* mask, int64_t cols, const int32_t* row_ptr, I* col, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const unsigned char* m = reinterpret_cast<const unsigned char*>(mask + r * cols);
    I* out = col + row_ptr[r];
    for (int64_t c = 0; c < cols; ++c) {
      if (m[c]) *out++ = static_cast<I>(c);
    }
  }
}

template <typename I>
void fill_cols(const bool* mask, int64_t rows, int64_t cols, const int32_t* col_ptr, I* row, int64_t c0,
               int64_t c1) {
  if (c1 <= c0) return;
  int64_t* cursor = new int64_t[c1 - c0];
  for (int64_t c = c0; c < c1; ++c) cursor[c - c0] = col_ptr[c];
  for (int64_t r = 0; r < rows; ++r) {
    const unsigned char* m = reinterpret_cast<const unsigned char*>(mask + r * cols);
    for (int64_t c = c0; c < c1; ++c) {
      if (m[c]) row[cursor[c - c0]++] = static_cast<I>(r);
    }
  }
  delete[] cursor;
}

template <typename I>
bool transpose_perm(const int32_t* row_ptr, const I* col, int64_t rows, const int32_t* col_ptr, int64_t cols,
                    int64_t nnz, int32_t* perm) {
  // Snapshots: the pointers are read once, each write checked against them.
  std::vector<int64_t> cursor(col_ptr, col_ptr + cols);
  std::vector<int64_t> end(col_ptr + 1, col_ptr + cols + 1);
  int64_t k = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t e = row_ptr[r + 1];
    if (e < k || e > nnz) return false;
    for (; k < e; ++k) {
      const int64_t c = col[k];
      if (c < 0 || c >= cols || cursor[c] >= end[c] || cursor[c] < 0 || end[c] > nnz) return false;
      perm[cursor[c]++] = static_cast<int32_t>(k);
    }
  }
  return k == nnz;
}

template <typename T, typename I>
void gather(const T* w, int64_t stride_r, int64_t stride_c, const int32_t* row_ptr, const I* col, int64_t nnz,
            int64_t extent, T* val, int64_t r0, int64_t r1) {
  const Bounds bd(nnz, extent);
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * stride_r;
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    for (; k < e; ++k) val[k] = wr[bd.at(col[k]) * stride_c];
  }
}

// ---------------------------------------------------------------- transpose

template <typename T>
static void transpose_block_scalar(const T* in, int64_t ldi, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* out,
                                   int64_t ldo) {
  for (int64_t c = c0; c < c1; ++c) {
    T* o = out + c * ldo;
    for (int64_t r = r0; r < r1; ++r) o[r] = in[r * ldi + c];
  }
}

#if defined(__x86_64__)
// 8x8 float block: out[c + j][r + i] = in[r + i][c + j].
TS_AVX2 static inline void transpose8x8_avx2(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + ldi), r2 = _mm256_loadu_ps(in + 2 * ldi),
         r3 = _mm256_loadu_ps(in + 3 * ldi), r4 = _mm256_loadu_ps(in + 4 * ldi), r5 = _mm256_loadu_ps(in + 5 * ldi),
         r6 = _mm256_loadu_ps(in + 6 * ldi), r7 = _mm256_loadu_ps(in + 7 * ldi);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
         s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
         s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
         s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(out + ldo, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(out + 2 * ldo, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(out + 3 * ldo, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(out + 4 * ldo, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(out + 5 * ldo, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(out + 6 * ldo, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(out + 7 * ldo, _mm256_permute2f128_ps(s3, s7, 0x31));
}

TS_AVX2 static void transpose_avx2(const float* in, int64_t ldi, int64_t rows, int64_t c0, int64_t c1, float* out,
                                   int64_t ldo) {
  constexpr int64_t kTile = 64;  // 64x64 tiles keep both sides in L1
  for (int64_t ct = c0; ct < c1; ct += kTile) {
    const int64_t cte = std::min(ct + kTile, c1);
    for (int64_t rt = 0; rt < rows; rt += kTile) {
      const int64_t rte = std::min(rt + kTile, rows);
      int64_t c = ct;
      for (; c + 8 <= cte; c += 8) {
        int64_t r = rt;
        for (; r + 8 <= rte; r += 8) transpose8x8_avx2(in + r * ldi + c, ldi, out + c * ldo + r, ldo);
        transpose_block_scalar(in, ldi, r, rte, c, c + 8, out, ldo);
      }
      transpose_block_scalar(in, ldi, rt, rte, c, cte, out, ldo);
    }
  }
}
#endif

template <typename T>
void transpose_pad(const T* in, int64_t ldi, int64_t rows, int64_t rows_pad, int64_t cols, T* out, int64_t ldo,
                   int64_t c0, int64_t c1) {
  (void)cols;
#if defined(__x86_64__)
  if (std::is_same_v<T, float> && simd_level() != SimdLevel::Scalar) {
    transpose_avx2(reinterpret_cast<const float*>(in), ldi, rows, c0, c1, reinterpret_cast<float*>(out), ldo);
  } else
#endif
  {
    constexpr int64_t kB = 16;
    for (int64_t cb = c0; cb < c1; cb += kB) {
      for (int64_t rb = 0; rb < rows; rb += kB) {
        transpose_block_scalar(in, ldi, rb, std::min(rb + kB, rows), cb, std::min(cb + kB, c1), out, ldo);
      }
    }
  }
  if (rows_pad > rows) {
    for (int64_t c = c0; c < c1; ++c) std::fill(out + c * ldo + rows, out + c * ldo + rows_pad, T(0));
  }
}

// ---------------------------------------------------------------- non-finite inputs

template <typename T>
static bool row_all_finite(const T* x, int64_t K) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U kExp = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U any = 0;
  for (int64_t j = 0; j < K; ++j) {  // branch-free so that it vectorises
    U bits;
    std::memcpy(&bits, x + j, sizeof(T));
    any |= static_cast<U>((bits & kExp) == kExp);
  }
  return any == 0;
}

template <typename T, typename I>
bool nonfinite_fixup(const T* x, int64_t ldx, int64_t K, const int32_t* row_ptr, const I* col, int64_t nnz,
                     int64_t N, T* y, int64_t ldy, int64_t b0, int64_t b1) {
  const Bounds bd(nnz, K);
  bool seen = false;
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * ldx;
    if (row_all_finite(xb, K)) continue;
    seen = true;
    bool has_nan = false;
    std::vector<int64_t> infs;
    for (int64_t j = 0; j < K; ++j) {
      if (xb[j] != xb[j]) has_nan = true;
      else if (xb[j] - xb[j] != xb[j] - xb[j]) infs.push_back(j);
    }
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t r = 0; r < N; ++r) {
      bool poison = has_nan;
      int32_t k0, k1;
      bd.range(row_ptr, r, k0, k1);
      const I* first = col + k0;
      const I* last = col + k1;
      for (size_t i = 0; !poison && i < infs.size(); ++i) {
        poison = !std::binary_search(first, last, static_cast<I>(infs[i]));
      }
      if (poison) y[b * ldy + r] = nan;
    }
  }
  return seen;
}

// ---------------------------------------------------------------- scalar bodies

template <typename T, typename I>
static void spmv_scalar(const T* x, const int32_t* row_ptr, const I* col, const T* val, const Bounds& bd,
                        const T* bias, T* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    for (; k + 3 < e; k += 4) {
      a0 += val[k] * x[bd.at(col[k])];
      a1 += val[k + 1] * x[bd.at(col[k + 1])];
      a2 += val[k + 2] * x[bd.at(col[k + 2])];
      a3 += val[k + 3] * x[bd.at(col[k + 3])];
    }
    for (; k < e; ++k) a0 += val[k] * x[bd.at(col[k])];
    y[r] = (bias ? bias[r] : T(0)) + ((a0 + a1) + (a2 + a3));
  }
}

template <typename T, typename I>
static void spmm_t_scalar(const T* xt, int64_t ldx, int64_t nb, const int32_t* row_ptr, const I* col,
                          const T* val, const Bounds& bd, const T* bias, T* yt, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int64_t kChunk = 64;
  for (int64_t b0 = 0; b0 < nb; b0 += kChunk) {
    const int64_t w = std::min(kChunk, nb - b0);
    for (int64_t r = r0; r < r1; ++r) {
      T acc[kChunk];
      const T b = bias ? bias[r] : T(0);
      for (int64_t j = 0; j < w; ++j) acc[j] = b;
      int32_t k, e;
      bd.range(row_ptr, r, k, e);
      for (; k < e; ++k) {
        const T v = val[k];
        const T* p = xt + bd.at(col[k]) * ldx + b0;
        for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
      }
      std::memcpy(yt + r * ldy + b0, acc, sizeof(T) * w);
    }
  }
}

template <typename T, typename I>
static void sddmm_t_scalar(const T* gt, int64_t ldg, const T* xt, int64_t ldx, int64_t nb,
                           const int32_t* row_ptr, const I* col, const Bounds& bd, T* dw, int64_t ldw,
                           int64_t ncols, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* d = dw + r * ldw;
    std::fill(d, d + ncols, T(0));
    const T* g = gt + r * ldg;
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    for (; k < e; ++k) {
      const int64_t c = bd.at(col[k]);
      const T* p = xt + c * ldx;
      T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (int64_t b = 0; b < nb; b += 4) {  // nb is a multiple of 16
        a0 += g[b] * p[b];
        a1 += g[b + 1] * p[b + 1];
        a2 += g[b + 2] * p[b + 2];
        a3 += g[b + 3] * p[b + 3];
      }
      d[c] = (a0 + a1) + (a2 + a3);
    }
  }
}

// ---------------------------------------------------------------- AVX2 (fp32)
#if defined(__x86_64__)

TS_AVX2 static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Batch 1. Hardware gathers are slow on current x86 cores (Zen 4: ~0.5 entry per cycle);
// eight scalar loads assembled into a vector run at ~1 entry per cycle, with four
// independent accumulators to hide the FMA latency. Used at the AVX2 and AVX-512 levels.
template <typename I>
TS_AVX2 static inline __m256 gather8(const float* x, const I* c, const Bounds& bd) {
  return _mm256_setr_ps(x[bd.at(c[0])], x[bd.at(c[1])], x[bd.at(c[2])], x[bd.at(c[3])], x[bd.at(c[4])],
                        x[bd.at(c[5])], x[bd.at(c[6])], x[bd.at(c[7])]);
}

template <typename I>
TS_AVX2 static void spmv_avx2(const float* x, const int32_t* row_ptr, const I* col, const float* val,
                              const Bounds& bd, const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 32 <= e; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), gather8(x, col + k, bd), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), gather8(x, col + k + 8, bd), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 16), gather8(x, col + k + 16, bd), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 24), gather8(x, col + k + 24, bd), a3);
    }
    for (; k + 8 <= e; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), gather8(x, col + k, bd), a0);
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < e; ++k) s += val[k] * x[bd.at(col[k])];
    y[r] = (bias ? bias[r] : 0.0f) + s;
  }
}

template <int NV, typename I>
TS_AVX2 static void spmm_rows_avx2(const float* xt, int64_t ldx, const int32_t* row_ptr, const I* col,
                                   const float* val, const Bounds& bd, const float* bias, float* yt, int64_t ldy,
                                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m256 a[NV];
    const __m256 b = _mm256_set1_ps(bias ? bias[r] : 0.0f);
    for (int j = 0; j < NV; ++j) a[j] = b;
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    for (; k < e; ++k) {
      const __m256 v = _mm256_set1_ps(val[k]);
      const float* p = xt + bd.at(col[k]) * ldx;
      for (int j = 0; j < NV; ++j) a[j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 8 * j), a[j]);
    }
    float* o = yt + r * ldy;
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(o + 8 * j, a[j]);
  }
}

template <typename I>
TS_AVX2 static void spmm_t_avx2(const float* xt, int64_t ldx, int64_t nb, const int32_t* row_ptr, const I* col,
                                const float* val, const Bounds& bd, const float* bias, float* yt, int64_t ldy,
                                int64_t r0, int64_t r1) {
  for (int64_t b0 = 0; b0 < nb; b0 += 64) {
    const int64_t w = std::min<int64_t>(64, nb - b0);  // 16, 32, 48 or 64
    switch (w / 16) {
      case 4: spmm_rows_avx2<8>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
      case 3: spmm_rows_avx2<6>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
      case 2: spmm_rows_avx2<4>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
      default: spmm_rows_avx2<2>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
    }
  }
}

template <typename I>
TS_AVX2 static void sddmm_t_avx2(const float* gt, int64_t ldg, const float* xt, int64_t ldx, int64_t nb,
                                 const int32_t* row_ptr, const I* col, const Bounds& bd, float* dw, int64_t ldw,
                                 int64_t ncols, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dw + r * ldw;
    std::memset(d, 0, sizeof(float) * ncols);
    const float* g = gt + r * ldg;
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    for (; k < e; ++k) {
      const int64_t c = bd.at(col[k]);
      const float* p = xt + c * ldx;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; b += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + b), _mm256_loadu_ps(p + b), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(g + b + 8), _mm256_loadu_ps(p + b + 8), a1);
      }
      d[c] = hsum256(_mm256_add_ps(a0, a1));
    }
  }
}

// ---------------------------------------------------------------- AVX-512 (fp32)

template <int NV, typename I>
TS_AVX512 static void spmm_rows_avx512(const float* xt, int64_t ldx, const int32_t* row_ptr, const I* col,
                                       const float* val, const Bounds& bd, const float* bias, float* yt,
                                       int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 a[NV], c[NV];
    const __m512 b = _mm512_set1_ps(bias ? bias[r] : 0.0f);
    for (int j = 0; j < NV; ++j) {
      a[j] = b;
      c[j] = _mm512_setzero_ps();
    }
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    for (; k + 1 < e; k += 2) {
      const __m512 v0 = _mm512_set1_ps(val[k]);
      const __m512 v1 = _mm512_set1_ps(val[k + 1]);
      const float* p0 = xt + bd.at(col[k]) * ldx;
      const float* p1 = xt + bd.at(col[k + 1]) * ldx;
      for (int j = 0; j < NV; ++j) {
        a[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16 * j), a[j]);
        c[j] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 16 * j), c[j]);
      }
    }
    if (k < e) {
      const __m512 v0 = _mm512_set1_ps(val[k]);
      const float* p0 = xt + bd.at(col[k]) * ldx;
      for (int j = 0; j < NV; ++j) a[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16 * j), a[j]);
    }
    float* o = yt + r * ldy;
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_add_ps(a[j], c[j]));
  }
}

template <typename I>
TS_AVX512 static void spmm_t_avx512(const float* xt, int64_t ldx, int64_t nb, const int32_t* row_ptr,
                                    const I* col, const float* val, const Bounds& bd, const float* bias, float* yt,
                                    int64_t ldy, int64_t r0, int64_t r1) {
  // Batch chunks of 64 outside, rows inside: a chunk of X^T (in_features x 64 floats)
  // stays in L2 while every row of the range streams over it.
  for (int64_t b0 = 0; b0 < nb; b0 += 64) {
    const int64_t w = std::min<int64_t>(64, nb - b0);
    switch (w / 16) {
      case 4: spmm_rows_avx512<4>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
      case 3: spmm_rows_avx512<3>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
      case 2: spmm_rows_avx512<2>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
      default: spmm_rows_avx512<1>(xt + b0, ldx, row_ptr, col, val, bd, bias, yt + b0, ldy, r0, r1); break;
    }
  }
}

template <typename I>
TS_AVX512 static void sddmm_t_avx512(const float* gt, int64_t ldg, const float* xt, int64_t ldx, int64_t nb,
                                     const int32_t* row_ptr, const I* col, const Bounds& bd, float* dw,
                                     int64_t ldw, int64_t ncols, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dw + r * ldw;
    std::memset(d, 0, sizeof(float) * ncols);
    const float* g = gt + r * ldg;
    int32_t k, e;
    bd.range(row_ptr, r, k, e);
    // Two entries at a time: independent FMA chains, one reduction each.
    for (; k + 1 < e; k += 2) {
      const int64_t c0i = bd.at(col[k]), c1i = bd.at(col[k + 1]);
      const float* p0 = xt + c0i * ldx;
      const float* p1 = xt + c1i * ldx;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
      int64_t b = 0;
      for (; b + 32 <= nb; b += 32) {
        const __m512 g0 = _mm512_loadu_ps(g + b), g1 = _mm512_loadu_ps(g + b + 16);
        a0 = _mm512_fmadd_ps(g0, _mm512_loadu_ps(p0 + b), a0);
        a1 = _mm512_fmadd_ps(g1, _mm512_loadu_ps(p0 + b + 16), a1);
        c0 = _mm512_fmadd_ps(g0, _mm512_loadu_ps(p1 + b), c0);
        c1 = _mm512_fmadd_ps(g1, _mm512_loadu_ps(p1 + b + 16), c1);
      }
      if (b < nb) {
        const __m512 g0 = _mm512_loadu_ps(g + b);
        a0 = _mm512_fmadd_ps(g0, _mm512_loadu_ps(p0 + b), a0);
        c0 = _mm512_fmadd_ps(g0, _mm512_loadu_ps(p1 + b), c0);
      }
      d[c0i] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      d[c1i] = _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
    }
    if (k < e) {
      const int64_t c0i = bd.at(col[k]);
      const float* p0 = xt + c0i * ldx;
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; b += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(g + b), _mm512_loadu_ps(p0 + b), a0);
      d[c0i] = _mm512_reduce_add_ps(a0);
    }
  }
}

#endif  // __x86_64__

// ---------------------------------------------------------------- dispatch

template <typename T, typename I>
void spmv(const T* x, const int32_t* row_ptr, const I* col, const T* val, int64_t nnz, int64_t extent,
          const T* bias, T* y, int64_t r0, int64_t r1) {
  const Bounds bd(nnz, extent);
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    const SimdLevel level = simd_level();
    if (level != SimdLevel::Scalar) return spmv_avx2(x, row_ptr, col, val, bd, bias, y, r0, r1);
  }
#endif
  spmv_scalar(x, row_ptr, col, val, bd, bias, y, r0, r1);
}

template <typename T, typename I>
void spmm_t(const T* xt, int64_t ldx, int64_t nb, const int32_t* row_ptr, const I* col, const T* val, int64_t nnz,
            int64_t extent, const T* bias, T* yt, int64_t ldy, int64_t r0, int64_t r1) {
  const Bounds bd(nnz, extent);
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    const SimdLevel level = simd_level();
    if (level == SimdLevel::AVX512) return spmm_t_avx512(xt, ldx, nb, row_ptr, col, val, bd, bias, yt, ldy, r0, r1);
    if (level == SimdLevel::AVX2) return spmm_t_avx2(xt, ldx, nb, row_ptr, col, val, bd, bias, yt, ldy, r0, r1);
  }
#endif
  spmm_t_scalar(xt, ldx, nb, row_ptr, col, val, bd, bias, yt, ldy, r0, r1);
}

template <typename T, typename I>
void sddmm_t(const T* gt, int64_t ldg, const T* xt, int64_t ldx, int64_t nb, const int32_t* row_ptr,
             const I* col, int64_t nnz, T* dw, int64_t ldw, int64_t ncols, int64_t r0, int64_t r1) {
  const Bounds bd(nnz, ncols);
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    const SimdLevel level = simd_level();
    if (level == SimdLevel::AVX512)
      return sddmm_t_avx512(gt, ldg, xt, ldx, nb, row_ptr, col, bd, dw, ldw, ncols, r0, r1);
    if (level == SimdLevel::AVX2) return sddmm_t_avx2(gt, ldg, xt, ldx, nb, row_ptr, col, bd, dw, ldw, ncols, r0, r1);
  }
#endif
  sddmm_t_scalar(gt, ldg, xt, ldx, nb, row_ptr, col, bd, dw, ldw, ncols, r0, r1);
}

// ---------------------------------------------------------------- instantiations

#define TS_INST_I(I)                                                                                        \
  template void fill_rows<I>(const bool*, int64_t, const int32_t*, I*, int64_t, int64_t);                   \
  template void fill_cols<I>(const bool*, int64_t, int64_t, const int32_t*, I*, int64_t, int64_t);            \
  template bool transpose_perm<I>(const int32_t*, const I*, int64_t, const int32_t*, int64_t, int64_t, int32_t*);

#define TS_INST_TI(T, I)                                                                                     \
  template void gather<T, I>(const T*, int64_t, int64_t, const int32_t*, const I*, int64_t, int64_t, T*,  \
                             int64_t, int64_t);                                                         \
  template bool nonfinite_fixup<T, I>(const T*, int64_t, int64_t, const int32_t*, const I*, int64_t, int64_t, \
                                      T*, int64_t, int64_t, int64_t);                                      \
  template void spmv<T, I>(const T*, const int32_t*, const I*, const T*, int64_t, int64_t, const T*, T*,     \
                           int64_t, int64_t);                                                            \
  template void spmm_t<T, I>(const T*, int64_t, int64_t, const int32_t*, const I*, const T*, int64_t,       \
                             int64_t, const T*, T*, int64_t, int64_t, int64_t);                            \
  template void sddmm_t<T, I>(const T*, int64_t, const T*, int64_t, int64_t, const int32_t*, const I*,      \
                              int64_t, T*, int64_t, int64_t, int64_t, int64_t);

TS_INST_I(int16_t)
TS_INST_I(int32_t)
TS_INST_TI(float, int16_t)
TS_INST_TI(float, int32_t)
TS_INST_TI(double, int16_t)
TS_INST_TI(double, int32_t)
template void transpose_pad<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t, int64_t,
                                   int64_t);
template void transpose_pad<double>(const double*, int64_t, int64_t, int64_t, int64_t, double*, int64_t,
                                    int64_t, int64_t);

}  // namespace masked
}  // namespace cpu
}  // namespace torchslim
