// CPU kernels of sparse_codebook_linear: scalar bodies plus AVX2 / AVX-512 bodies chosen at
// run time (function target attributes; the file is compiled for the baseline ISA).
//
// Batch 1 (spmv), per row, 16 kept weights per step on AVX-512:
//  - codes: packed 4-bit, 16 codes are 8 bytes (8.5 when the step starts on a high nibble:
//    one 64-bit load, shifted); vpermd spreads the two dwords over the lanes and vpsrlvd
//    moves nibble i to lane i; one vpermps then looks up all 16 in the codebook register
//    (it reads only the low 4 bits of each lane). Byte codes: vpmovzxbd, then vpermps
//    (K <= 16), vpermt2ps over two registers (K <= 32) or a gather from the table.
//  - x: the 16 columns by scalar loads assembled in registers (faster than vgatherdps on Zen 4).
// AVX2: 8 weights per step, two 8-entry halves of the codebook looked up by vpermps and
// blended on code bit 3; x gathered by scalar loads (faster than vgatherdps on Zen 4).
// Batched (spmm_t): X^T with the batch contiguous; per row the codes of 16 weights are
// decoded to 16 floats at once, then each weight is broadcast against up to 64 batch
// columns (batch chunks outside, rows inside, like the masked op's kernel).
#include "kernels/cpu/sparse_codebook_linear.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/cpu/cpu_features.h"

#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TS_AVX2 __attribute__((target("avx2,fma")))
#define TS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#endif

namespace torchslim {
namespace cpu {
namespace sck {
namespace {

inline int code_at(const uint8_t* codes, bool packed, int64_t k) {
  return packed ? (codes[k >> 1] >> ((k & 1) << 2)) & 0x0F : codes[k];
}

// The clamps of "Safe reads" (sparse_codebook_linear.h): entry ranges into [0, nnz],
// columns into [0, last]. cols <= 0 leaves no entry to read.
struct Bounds {
  int64_t nnz;
  uint32_t last;
  explicit Bounds(const Structure& s)
      : nnz(s.cols > 0 ? std::clamp<int64_t>(s.nnz, 0, std::numeric_limits<int32_t>::max()) : 0),
        last(s.cols > 0 ? static_cast<uint32_t>(std::min<int64_t>(s.cols, int64_t(1) << 32) - 1) : 0) {}
  // Entries [k0, k1) of row r.
  inline void range(const int32_t* row_ptr, int64_t r, int64_t& k0, int64_t& k1) const {
    const int64_t a = row_ptr[r], b = row_ptr[r + 1];
    k0 = std::clamp<int64_t>(a, 0, nnz);
    k1 = std::clamp<int64_t>(b, k0, nnz);
  }
  template <typename I>
  inline int64_t at(I c) const {
    return std::min(static_cast<uint32_t>(static_cast<std::make_unsigned_t<I>>(c)), last);
  }
};

// Calls f(const I* col) with the structure's column type.
template <typename F>
inline void with_col(const Structure& s, F&& f) {
  if (s.col32) f(static_cast<const int32_t*>(s.col));
  else f(static_cast<const int16_t*>(s.col));
}

// ---------------------------------------------------------------- scalar bodies
template <typename T, typename I>
void spmv_scalar(const Structure& s, const T* table, const T* x, const T* bias, T* y, int64_t r0, int64_t r1) {
  const I* col = static_cast<const I*>(s.col);
  const Bounds bd(s);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k, e;
    bd.range(s.row_ptr, r, k, e);
    T a0 = 0, a1 = 0;
    for (; k + 1 < e; k += 2) {
      a0 += table[code_at(s.codes, s.packed, k)] * x[bd.at(col[k])];
      a1 += table[code_at(s.codes, s.packed, k + 1)] * x[bd.at(col[k + 1])];
    }
    if (k < e) a0 += table[code_at(s.codes, s.packed, k)] * x[bd.at(col[k])];
    y[r] = (a0 + a1) + (bias ? bias[r] : T(0));
  }
}

template <typename T, typename I>
void spmm_t_scalar(const Structure& s, const T* table, const T* xt, int64_t ldx, int64_t nb, const T* bias, T* yt,
                   int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int64_t kChunk = 64;
  const I* col = static_cast<const I*>(s.col);
  const Bounds bd(s);
  for (int64_t b0 = 0; b0 < nb; b0 += kChunk) {
    const int64_t w = std::min(kChunk, nb - b0);
    for (int64_t r = r0; r < r1; ++r) {
      T acc[kChunk];
      const T b = bias ? bias[r] : T(0);
      for (int64_t j = 0; j < w; ++j) acc[j] = b;
      int64_t k0, k1;
      bd.range(s.row_ptr, r, k0, k1);
      for (int64_t k = k0; k < k1; ++k) {
        const T v = table[code_at(s.codes, s.packed, k)];
        const T* p = xt + bd.at(col[k]) * ldx + b0;
        for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
      }
      std::memcpy(yt + r * ldy + b0, acc, sizeof(T) * w);
    }
  }
}

template <typename T, typename I>
void grad_codebook_scalar(const Structure& s, const T* gt, int64_t ldg, const T* xt, int64_t ldx, int64_t nb,
                          int64_t r0, int64_t r1, double* hist) {
  const I* col = static_cast<const I*>(s.col);
  const Bounds bd(s);
  const int last_code = std::max(s.num_clusters, 1) - 1;  // hist has num_clusters entries: bound every write
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = gt + r * ldg;
    int64_t k0, k1;
    bd.range(s.row_ptr, r, k0, k1);
    for (int64_t k = k0; k < k1; ++k) {
      const T* p = xt + bd.at(col[k]) * ldx;
      T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
      int64_t b = 0;
      for (; b + 4 <= nb; b += 4) {
        d0 += g[b] * p[b];
        d1 += g[b + 1] * p[b + 1];
        d2 += g[b + 2] * p[b + 2];
        d3 += g[b + 3] * p[b + 3];
      }
      for (; b < nb; ++b) d0 += g[b] * p[b];
      hist[std::min(code_at(s.codes, s.packed, k), last_code)] += static_cast<double>((d0 + d1) + (d2 + d3));
    }
  }
}

#if defined(__x86_64__)
// ---------------------------------------------------------------- AVX-512 bodies
enum class Lut { Nibble16, Byte16, Byte32, Byte256 };

Lut lut_for(const Structure& s) {
  if (s.packed) return Lut::Nibble16;
  if (s.num_clusters <= 16) return Lut::Byte16;
  if (s.num_clusters <= 32) return Lut::Byte32;
  return Lut::Byte256;
}

// The 16 codes of entries k..k+15 (all < row end), one per 32-bit lane (only the low bits
// that the lookup reads are meaningful for packed codes).
template <Lut L>
TS_AVX512 inline __m512i codes16(const uint8_t* codes, int64_t k) {
  if constexpr (L == Lut::Nibble16) {
    const uint8_t* p = codes + (k >> 1);
    uint64_t v;
    std::memcpy(&v, p, 8);
    if (k & 1) v = (v >> 4) | (static_cast<uint64_t>(p[8]) << 60);  // p[8] holds entry k + 15
    const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return _mm512_srlv_epi32(_mm512_permutexvar_epi32(sel, _mm512_castsi128_si512(_mm_cvtsi64_si128(
                                                               static_cast<long long>(v)))),
                             sh);
  } else {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k)));
  }
}

struct Lut512 {
  __m512 c0, c1;
  const float* table;
};

template <Lut L>
TS_AVX512 inline __m512 lookup(const Lut512& t, __m512i q) {
  if constexpr (L == Lut::Nibble16 || L == Lut::Byte16) return _mm512_permutexvar_ps(q, t.c0);
  else if constexpr (L == Lut::Byte32) return _mm512_permutex2var_ps(t.c0, q, t.c1);
  else return _mm512_i32gather_ps(q, t.table, 4);
}

// The last n (< 16) entries of a row: codes and x by scalar reads into zero-padded vectors.
template <Lut L, typename I>
TS_AVX512 inline __m512 tail_product(const Structure& s, const Bounds& bd, const Lut512& t, const I* col,
                                     const float* x, int64_t k, int64_t n) {
  alignas(64) int32_t cc[16] = {0};
  alignas(64) float xv[16] = {0};
  for (int64_t i = 0; i < n; ++i) {
    cc[i] = code_at(s.codes, s.packed, k + i);
    xv[i] = x[bd.at(col[k + i])];
  }
  return _mm512_mul_ps(lookup<L>(t, _mm512_load_si512(cc)), _mm512_load_ps(xv));
}

// x[c[0..15]]: scalar loads assembled in registers (measured faster than vgatherdps on Zen 4).
// x[c[0..15]]: scalar loads assembled in registers. vgatherdps is 1.8x slower on Zen 4
// here (0.83 vs 0.46 ms for 4096x4096 at 10% density, one thread); splitting four int16
// columns out of one 64-bit load measured the same as loading each.
template <typename I>
TS_AVX512 inline __m512 gather16(const float* x, const I* c, const Bounds& bd) {
  const __m256 lo = _mm256_setr_ps(x[bd.at(c[0])], x[bd.at(c[1])], x[bd.at(c[2])], x[bd.at(c[3])], x[bd.at(c[4])],
                                   x[bd.at(c[5])], x[bd.at(c[6])], x[bd.at(c[7])]);
  const __m256 hi = _mm256_setr_ps(x[bd.at(c[8])], x[bd.at(c[9])], x[bd.at(c[10])], x[bd.at(c[11])],
                                   x[bd.at(c[12])], x[bd.at(c[13])], x[bd.at(c[14])], x[bd.at(c[15])]);
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

template <Lut L, typename I>
TS_AVX512 void spmv_avx512(const Structure& s, const float* table, const float* x, const float* bias, float* y,
                           int64_t r0, int64_t r1) {
  const I* col = static_cast<const I*>(s.col);
  const Lut512 t{_mm512_loadu_ps(table), _mm512_loadu_ps(table + 16), table};
  const Bounds bd(s);
  const int64_t nnz = bd.nnz;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k, e;
    bd.range(s.row_ptr, r, k, e);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= e; k += 32) {
      const __m512 w0 = lookup<L>(t, codes16<L>(s.codes, k));
      const __m512 w1 = lookup<L>(t, codes16<L>(s.codes, k + 16));
      a0 = _mm512_fmadd_ps(w0, gather16(x, col + k, bd), a0);
      a1 = _mm512_fmadd_ps(w1, gather16(x, col + k + 16, bd), a1);
    }
    if (k + 16 <= e) {
      a0 = _mm512_fmadd_ps(lookup<L>(t, codes16<L>(s.codes, k)), gather16(x, col + k, bd), a0);
      k += 16;
    }
    if (k < e) {
      if (k + 16 <= nnz) {
        // A whole step past the row end stays inside the structure (codes and columns of
        // the next rows, all checked): read it and mask the lanes off.
        const __mmask16 m = static_cast<__mmask16>((1u << (e - k)) - 1);
        a1 = _mm512_mask3_fmadd_ps(lookup<L>(t, codes16<L>(s.codes, k)), gather16(x, col + k, bd), a1, m);
      } else {
        a1 = _mm512_add_ps(a1, tail_product<L>(s, bd, t, col, x, k, e - k));
      }
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (bias ? bias[r] : 0.0f);
  }
}

// Weights of entries k..k+n-1 (n <= 16) into w[0..n) (w[n..16) may be written too).
template <Lut L>
TS_AVX512 inline void decode16(const Structure& s, const Lut512& t, int64_t k, int64_t n, int64_t nnz, float* w) {
  if (k + 16 <= nnz) {  // a whole step stays inside the structure even past the row end
    _mm512_store_ps(w, lookup<L>(t, codes16<L>(s.codes, k)));
  } else {
    for (int64_t i = 0; i < n; ++i) w[i] = t.table[code_at(s.codes, s.packed, k + i)];
  }
}

template <int NV, Lut L, typename I>
TS_AVX512 void spmm_rows_avx512(const Structure& s, const Lut512& t, const float* xt, int64_t ldx, const float* bias,
                                float* yt, int64_t ldy, int64_t r0, int64_t r1) {
  const I* col = static_cast<const I*>(s.col);
  const Bounds bd(s);
  const int64_t nnz = bd.nnz;
  alignas(64) float wb[16];
  for (int64_t r = r0; r < r1; ++r) {
    __m512 a[NV], c[NV];
    const __m512 b = _mm512_set1_ps(bias ? bias[r] : 0.0f);
    for (int j = 0; j < NV; ++j) {
      a[j] = b;
      c[j] = _mm512_setzero_ps();
    }
    int64_t k0, e;
    bd.range(s.row_ptr, r, k0, e);
    for (int64_t k = k0; k < e; k += 16) {
      const int64_t n = std::min<int64_t>(16, e - k);
      decode16<L>(s, t, k, n, nnz, wb);
      int64_t i = 0;
      for (; i + 1 < n; i += 2) {
        const __m512 v0 = _mm512_set1_ps(wb[i]);
        const __m512 v1 = _mm512_set1_ps(wb[i + 1]);
        const float* p0 = xt + bd.at(col[k + i]) * ldx;
        const float* p1 = xt + bd.at(col[k + i + 1]) * ldx;
        for (int j = 0; j < NV; ++j) {
          a[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16 * j), a[j]);
          c[j] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 16 * j), c[j]);
        }
      }
      if (i < n) {
        const __m512 v0 = _mm512_set1_ps(wb[i]);
        const float* p0 = xt + bd.at(col[k + i]) * ldx;
        for (int j = 0; j < NV; ++j) a[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16 * j), a[j]);
      }
    }
    float* o = yt + r * ldy;
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_add_ps(a[j], c[j]));
  }
}

template <Lut L, typename I>
TS_AVX512 void spmm_t_avx512(const Structure& s, const float* table, const float* xt, int64_t ldx, int64_t nb,
                             const float* bias, float* yt, int64_t ldy, int64_t r0, int64_t r1) {
  const Lut512 t{_mm512_loadu_ps(table), _mm512_loadu_ps(table + 16), table};
  // Batch chunks of 64 outside, rows inside: the chunk of X^T stays in L2 across the rows.
  for (int64_t b0 = 0; b0 < nb; b0 += 64) {
    switch (std::min<int64_t>(64, nb - b0) / 16) {
      case 4: spmm_rows_avx512<4, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
      case 3: spmm_rows_avx512<3, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
      case 2: spmm_rows_avx512<2, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
      default: spmm_rows_avx512<1, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
    }
  }
}

// ---------------------------------------------------------------- AVX2 bodies
TS_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

struct Lut256 {
  __m256 c0, c1;
  const float* table;
};

// Weights of entries k..k+7: two 8-entry halves and a blend on code bit 3 (K <= 16), else a
// gather from the table.
template <Lut L>
TS_AVX2 inline __m256 weights8(const Structure& s, const Lut256& t, int64_t k) {
  __m256i q;
  if constexpr (L == Lut::Nibble16) {
    const uint8_t* p = s.codes + (k >> 1);
    uint32_t v;
    std::memcpy(&v, p, 4);
    if (k & 1) v = (v >> 4) | (static_cast<uint32_t>(p[4]) << 28);  // p[4] holds entry k + 7
    q = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  } else {
    q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.codes + k)));
  }
  if constexpr (L == Lut::Nibble16 || L == Lut::Byte16) {
    const __m256 lo = _mm256_permutevar8x32_ps(t.c0, q);
    const __m256 hi = _mm256_permutevar8x32_ps(t.c1, q);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
  } else {
    return _mm256_i32gather_ps(t.table, q, 4);
  }
}

template <typename I>
TS_AVX2 inline __m256 gather8(const float* x, const I* c, const Bounds& bd) {
  return _mm256_setr_ps(x[bd.at(c[0])], x[bd.at(c[1])], x[bd.at(c[2])], x[bd.at(c[3])], x[bd.at(c[4])],
                        x[bd.at(c[5])], x[bd.at(c[6])], x[bd.at(c[7])]);
}

template <Lut L, typename I>
TS_AVX2 void spmv_avx2(const Structure& s, const float* table, const float* x, const float* bias, float* y,
                       int64_t r0, int64_t r1) {
  const I* col = static_cast<const I*>(s.col);
  const Lut256 t{_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8), table};
  const Bounds bd(s);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k, e;
    bd.range(s.row_ptr, r, k, e);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= e; k += 16) {
      a0 = _mm256_fmadd_ps(weights8<L>(s, t, k), gather8(x, col + k, bd), a0);
      a1 = _mm256_fmadd_ps(weights8<L>(s, t, k + 8), gather8(x, col + k + 8, bd), a1);
    }
    if (k + 8 <= e) {
      a0 = _mm256_fmadd_ps(weights8<L>(s, t, k), gather8(x, col + k, bd), a0);
      k += 8;
    }
    float acc = hsum256(_mm256_add_ps(a0, a1));
    for (; k < e; ++k) acc += table[code_at(s.codes, s.packed, k)] * x[bd.at(col[k])];
    y[r] = acc + (bias ? bias[r] : 0.0f);
  }
}

template <int NV, Lut L, typename I>
TS_AVX2 void spmm_rows_avx2(const Structure& s, const Lut256& t, const float* xt, int64_t ldx, const float* bias,
                            float* yt, int64_t ldy, int64_t r0, int64_t r1) {
  const I* col = static_cast<const I*>(s.col);
  const Bounds bd(s);
  alignas(32) float wb[8];
  for (int64_t r = r0; r < r1; ++r) {
    __m256 a[NV];
    const __m256 b = _mm256_set1_ps(bias ? bias[r] : 0.0f);
    for (int j = 0; j < NV; ++j) a[j] = b;
    int64_t k0, e;
    bd.range(s.row_ptr, r, k0, e);
    for (int64_t k = k0; k < e; k += 8) {
      const int64_t n = std::min<int64_t>(8, e - k);
      if (n == 8) _mm256_store_ps(wb, weights8<L>(s, t, k));
      else for (int64_t i = 0; i < n; ++i) wb[i] = t.table[code_at(s.codes, s.packed, k + i)];
      for (int64_t i = 0; i < n; ++i) {
        const __m256 v = _mm256_set1_ps(wb[i]);
        const float* p = xt + bd.at(col[k + i]) * ldx;
        for (int j = 0; j < NV; ++j) a[j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 8 * j), a[j]);
      }
    }
    float* o = yt + r * ldy;
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(o + 8 * j, a[j]);
  }
}

template <Lut L, typename I>
TS_AVX2 void spmm_t_avx2(const Structure& s, const float* table, const float* xt, int64_t ldx, int64_t nb,
                         const float* bias, float* yt, int64_t ldy, int64_t r0, int64_t r1) {
  const Lut256 t{_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8), table};
  for (int64_t b0 = 0; b0 < nb; b0 += 64) {
    switch (std::min<int64_t>(64, nb - b0) / 16) {
      case 4: spmm_rows_avx2<8, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
      case 3: spmm_rows_avx2<6, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
      case 2: spmm_rows_avx2<4, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
      default: spmm_rows_avx2<2, L, I>(s, t, xt + b0, ldx, bias, yt + b0, ldy, r0, r1); break;
    }
  }
}

// Calls f(std::integral_constant<Lut, L>) for the structure's lookup kind. AVX2 has no
// two-register lookup: K in (16, 32] uses the gather there.
template <typename F>
inline void with_lut(Lut lut, F&& f) {
  switch (lut) {
    case Lut::Nibble16: f(std::integral_constant<Lut, Lut::Nibble16>{}); break;
    case Lut::Byte16: f(std::integral_constant<Lut, Lut::Byte16>{}); break;
    case Lut::Byte32: f(std::integral_constant<Lut, Lut::Byte32>{}); break;
    default: f(std::integral_constant<Lut, Lut::Byte256>{}); break;
  }
}
Lut lut_avx2(const Structure& s) {
  const Lut l = lut_for(s);
  return l == Lut::Byte32 ? Lut::Byte256 : l;
}
#endif  // __x86_64__

#if defined(__x86_64__)
// 8x8 float block: out[c * ldo + r] = in[r * ldi + c].
TS_AVX2 inline void transpose8x8(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ldi);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

TS_AVX2 void transpose_avx2(const float* in, int64_t ldi, int64_t rows, float* out, int64_t ldo, int64_t c0,
                            int64_t c1) {
  constexpr int64_t kTile = 64;  // 64x64 tiles keep both sides in L1
  for (int64_t ct = c0; ct < c1; ct += kTile) {
    const int64_t cte = std::min(ct + kTile, c1);
    for (int64_t rt = 0; rt < rows; rt += kTile) {
      const int64_t rte = std::min(rt + kTile, rows);
      int64_t c = ct;
      for (; c + 8 <= cte; c += 8) {
        int64_t r = rt;
        for (; r + 8 <= rte; r += 8) transpose8x8(in + r * ldi + c, ldi, out + c * ldo + r, ldo);
        for (int64_t cc = c; cc < c + 8; ++cc)
          for (int64_t rr = r; rr < rte; ++rr) out[cc * ldo + rr] = in[rr * ldi + cc];
      }
      for (; c < cte; ++c)
        for (int64_t rr = rt; rr < rte; ++rr) out[c * ldo + rr] = in[rr * ldi + c];
    }
  }
}
#endif

template <typename T>
void transpose_pad_impl(const T* in, int64_t ldi, int64_t rows, int64_t rows_pad, T* out, int64_t ldo, int64_t c0,
                        int64_t c1) {
#if defined(__x86_64__)
  if (std::is_same_v<T, float> && simd_level() != SimdLevel::Scalar) {
    transpose_avx2(reinterpret_cast<const float*>(in), ldi, rows, reinterpret_cast<float*>(out), ldo, c0, c1);
  } else
#endif
  {
    constexpr int64_t kTile = 16;
    for (int64_t cb = c0; cb < c1; cb += kTile) {
      const int64_t ce = std::min(c1, cb + kTile);
      for (int64_t rb = 0; rb < rows; rb += kTile) {
        const int64_t re = std::min(rows, rb + kTile);
        for (int64_t c = cb; c < ce; ++c)
          for (int64_t r = rb; r < re; ++r) out[c * ldo + r] = in[r * ldi + c];
      }
    }
  }
  if (rows_pad > rows)
    for (int64_t c = c0; c < c1; ++c) std::fill(out + c * ldo + rows, out + c * ldo + rows_pad, T(0));
}

}  // namespace

void transpose_pad(const float* in, int64_t ldi, int64_t rows, int64_t rows_pad, float* out, int64_t ldo, int64_t c0,
                   int64_t c1) {
  transpose_pad_impl(in, ldi, rows, rows_pad, out, ldo, c0, c1);
}
void transpose_pad(const double* in, int64_t ldi, int64_t rows, int64_t rows_pad, double* out, int64_t ldo,
                   int64_t c0, int64_t c1) {
  transpose_pad_impl(in, ldi, rows, rows_pad, out, ldo, c0, c1);
}

Check check_row_ptr(const Structure& s, int64_t nnz) {
  if (s.row_ptr[0] != 0) return {Fault::FirstNotZero, 0, s.row_ptr[0]};
  for (int64_t r = 0; r < s.rows; ++r)
    if (s.row_ptr[r + 1] < s.row_ptr[r]) return {Fault::Decreasing, r, s.row_ptr[r + 1]};
  if (s.row_ptr[s.rows] != nnz) return {Fault::LastNotNnz, s.rows, s.row_ptr[s.rows]};
  return {};
}

Check check_entries(const Structure& s, int64_t k0, int64_t k1) {
  Check c;
  with_col(s, [&](const auto* col) {
    for (int64_t k = k0; k < k1; ++k) {
      if (col[k] < 0 || col[k] >= s.cols) {
        c = {Fault::ColumnOutOfRange, k, col[k]};
        return;
      }
    }
  });
  if (c.fault != Fault::None) return c;
  // Codes: every representable value is valid when K covers the layout.
  if (s.num_clusters < (s.packed ? 16 : 256)) {
    int mx = 0;
    if (!s.packed) {
      for (int64_t k = k0; k < k1; ++k) mx = std::max<int>(mx, s.codes[k]);
    } else {
      for (int64_t k = k0; k < k1; ++k) mx = std::max(mx, code_at(s.codes, true, k));
    }
    if (mx >= s.num_clusters) {
      for (int64_t k = k0; k < k1; ++k) {
        const int v = code_at(s.codes, s.packed, k);
        if (v >= s.num_clusters) return {Fault::CodeOutOfRange, k, v};
      }
    }
  }
  return c;
}

void spmv(const Structure& s, const float* table, const float* x, const float* bias, float* y, int64_t r0,
          int64_t r1) {
  with_col(s, [&](const auto* colp) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(colp)>>;
#if defined(__x86_64__)
    const SimdLevel lv = simd_level();
    if (lv == SimdLevel::AVX512) {
      with_lut(lut_for(s), [&](auto l) { spmv_avx512<decltype(l)::value, I>(s, table, x, bias, y, r0, r1); });
      return;
    }
    if (lv == SimdLevel::AVX2) {
      with_lut(lut_avx2(s), [&](auto l) { spmv_avx2<decltype(l)::value, I>(s, table, x, bias, y, r0, r1); });
      return;
    }
#endif
    spmv_scalar<float, I>(s, table, x, bias, y, r0, r1);
  });
}

void spmv(const Structure& s, const double* table, const double* x, const double* bias, double* y, int64_t r0,
          int64_t r1) {
  with_col(s, [&](const auto* colp) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(colp)>>;
    spmv_scalar<double, I>(s, table, x, bias, y, r0, r1);
  });
}

void spmm_t(const Structure& s, const float* table, const float* xt, int64_t ldx, int64_t nb, const float* bias,
            float* yt, int64_t ldy, int64_t r0, int64_t r1) {
  with_col(s, [&](const auto* colp) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(colp)>>;
#if defined(__x86_64__)
    const SimdLevel lv = simd_level();
    if (lv == SimdLevel::AVX512) {
      with_lut(lut_for(s), [&](auto l) {
        spmm_t_avx512<decltype(l)::value, I>(s, table, xt, ldx, nb, bias, yt, ldy, r0, r1);
      });
      return;
    }
    if (lv == SimdLevel::AVX2) {
      with_lut(lut_avx2(s), [&](auto l) {
        spmm_t_avx2<decltype(l)::value, I>(s, table, xt, ldx, nb, bias, yt, ldy, r0, r1);
      });
      return;
    }
#endif
    spmm_t_scalar<float, I>(s, table, xt, ldx, nb, bias, yt, ldy, r0, r1);
  });
}

void spmm_t(const Structure& s, const double* table, const double* xt, int64_t ldx, int64_t nb, const double* bias,
            double* yt, int64_t ldy, int64_t r0, int64_t r1) {
  with_col(s, [&](const auto* colp) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(colp)>>;
    spmm_t_scalar<double, I>(s, table, xt, ldx, nb, bias, yt, ldy, r0, r1);
  });
}

void grad_codebook(const Structure& s, const float* gt, int64_t ldg, const float* xt, int64_t ldx, int64_t nb,
                   int64_t r0, int64_t r1, double* hist) {
  with_col(s, [&](const auto* colp) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(colp)>>;
    grad_codebook_scalar<float, I>(s, gt, ldg, xt, ldx, nb, r0, r1, hist);
  });
}

void grad_codebook(const Structure& s, const double* gt, int64_t ldg, const double* xt, int64_t ldx, int64_t nb,
                   int64_t r0, int64_t r1, double* hist) {
  with_col(s, [&](const auto* colp) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(colp)>>;
    grad_codebook_scalar<double, I>(s, gt, ldg, xt, ldx, nb, r0, r1, hist);
  });
}

int path_code(const Structure& s, bool batched, bool fp64) {
  const int tail = (batched ? 2 : 0) + (fp64 ? 1 : 0);
  int lookup = s.packed ? 0 : s.num_clusters <= 16 ? 1 : s.num_clusters <= 32 ? 2 : 3;
  if (fp64) return lookup * 4 + tail;  // float64 runs the scalar bodies
#if defined(__x86_64__)
  const SimdLevel lv = simd_level();
  if (lv == SimdLevel::AVX512) return 32 + lookup * 4 + tail;
  if (lv == SimdLevel::AVX2) return 16 + (lookup == 2 ? 3 : lookup) * 4 + tail;  // no two-register lookup
#endif
  return lookup * 4 + tail;
}

}  // namespace sck
}  // namespace cpu
}  // namespace torchslim
