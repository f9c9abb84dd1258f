// CPU kernels of codebook_linear: scalar reference bodies plus AVX2 / AVX-512 bodies chosen
// at run time (function target attributes; the file is compiled for the baseline ISA).
//
// Small-batch forward (codebook_gemv) decodes weights straight from the indices in
// registers and never writes W:
//  - packed 4-bit, AVX-512: the 16-entry codebook is one zmm register. 64 index bytes are
//    one load; read as 16 dwords, dword i holds the 8 nibbles of weights 8i..8i+7 and
//    vpermps reads only the low 4 bits of each dword, so vpermps(d >> 4k), k = 0..7,
//    decodes 128 weights with 8 permutes and 7 shifts, no widening. x is rearranged once
//    per call to match (leftover 32-weight steps widen 16 bytes and split even / odd).
//  - packed 4-bit, AVX2: two 8-entry halves in two ymm registers, two vpermps and a blend
//    on index bit 3 per 8 weights; x blocks of 16 as [even8 | odd8].
//  - uint8, K <= 16 / <= 32: vpermps / vpermt2ps from one / two registers.
//  - uint8, K > 32 on AVX-512 with VBMI: the 256-entry fp32 table is split into four byte
//    planes, each held in four zmm registers (16 registers in all); two merge-masked
//    vpermi2b (7 index bits; entries 0..127, then 128..255 for the bytes with bit 7 set)
//    look up 64 bytes of a plane, and byte unpacks reassemble the fp32 words; the lookups
//    run 1-2 steps ahead of the unpacks and FMAs (software pipeline). x is rearranged once
//    per call in the order the unpacks produce (zero-padded to whole 64-weight steps).
//    Without VBMI: hardware gather (3-10x slower than the byte planes on Zen 4 here).
// Several output rows and up to four batch rows share each decoded vector.
// codebook_decode (large-batch tiles) uses the same lookups and restores natural order.
#include "kernels/cpu/codebook_linear.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_features.h"

#if defined(__x86_64__)
// GCC 12 reports its own _mm512_undefined_* placeholders inside the AVX-512 headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TS_AVX2 __attribute__((target("avx2,fma")))
#define TS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define TS_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")))
#endif

namespace torchslim {
namespace cpu {

namespace {

inline int index_at(const CodebookIndices& w, const uint8_t* row, int64_t j) {
  if (w.packed) return (row[j >> 1] >> ((j & 1) * 4)) & 0x0F;
  return row[j];
}

// Scalar dot of columns [j0, in) of row `row` with x (ld 1), in the accumulation type T.
template <typename T, typename A>
inline A tail_dot(const CodebookIndices& w, const T* table, const uint8_t* row, const T* x, int64_t j0) {
  A acc = 0;
  for (int64_t j = j0; j < w.in; ++j) acc += static_cast<A>(table[index_at(w, row, j)]) * static_cast<A>(x[j]);
  return acc;
}

template <typename T>
void gemv_scalar(const CodebookIndices& w, const T* table, const T* x, int64_t batch, const T* bias, T* y,
                 int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    for (int64_t b = 0; b < batch; ++b) {
      T acc = tail_dot<T, T>(w, table, row, x + b * w.in, 0);
      y[b * w.out + o] = acc + (bias ? bias[o] : T(0));
    }
  }
}

template <typename T>
void decode_scalar(const CodebookIndices& w, const T* table, T* dst, int64_t ld_dst, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    T* d = dst + (o - o0) * ld_dst;
    if (w.packed) {
      int64_t j = 0;
      for (; j + 1 < w.in; j += 2) {
        const uint8_t v = row[j >> 1];
        d[j] = table[v & 0x0F];
        d[j + 1] = table[v >> 4];
      }
      if (j < w.in) d[j] = table[row[j >> 1] & 0x0F];
    } else {
      for (int64_t j = 0; j < w.in; ++j) d[j] = table[row[j]];
    }
  }
}

// Per-row bins in the accumulation type A (float for fp32: one row is short), flushed to
// double; two interleaved bin sets break the store-to-load chain on repeated indices.
template <typename T, typename A>
void histogram_scalar(const CodebookIndices& w, const T* dw, int64_t ld_dw, int64_t o0, int64_t o1,
                      double* hist) {
  const int K = w.num_clusters;
  std::vector<A> bins(2 * 256);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    const T* d = dw + (o - o0) * ld_dw;
    std::fill(bins.begin(), bins.begin() + 2 * 256, A(0));
    A* b0 = bins.data();
    A* b1 = bins.data() + 256;
    if (w.packed) {
      int64_t j = 0;
      for (; j + 1 < w.in; j += 2) {
        const uint8_t v = row[j >> 1];
        b0[v & 0x0F] += static_cast<A>(d[j]);
        b1[v >> 4] += static_cast<A>(d[j + 1]);
      }
      if (j < w.in) b0[row[j >> 1] & 0x0F] += static_cast<A>(d[j]);
    } else {
      int64_t j = 0;
      for (; j + 1 < w.in; j += 2) {
        b0[row[j]] += static_cast<A>(d[j]);
        b1[row[j + 1]] += static_cast<A>(d[j + 1]);
      }
      if (j < w.in) b0[row[j]] += static_cast<A>(d[j]);
    }
    for (int k = 0; k < K; ++k) hist[k] += static_cast<double>(b0[k]) + static_cast<double>(b1[k]);
  }
}

int max_index_scalar(const CodebookIndices& w, int64_t r0, int64_t r1) {
  int m = 0;
  for (int64_t o = r0; o < r1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    if (w.packed) {
      const int64_t full = w.in / 2;
      uint8_t lo = 0, hi = 0;
      for (int64_t c = 0; c < full; ++c) {
        lo = std::max<uint8_t>(lo, row[c] & 0x0F);
        hi = std::max<uint8_t>(hi, row[c] >> 4);
      }
      if (w.in & 1) lo = std::max<uint8_t>(lo, row[full] & 0x0F);
      m = std::max<int>(m, std::max(lo, hi));
    } else {
      uint8_t mx = 0;
      for (int64_t c = 0; c < w.in; ++c) mx = std::max(mx, row[c]);
      m = std::max<int>(m, mx);
    }
  }
  return m;
}

#if defined(__x86_64__)

// ---------------------------------------------------------------- AVX2 bodies
// Compiled with AVX2 enabled: GCC vectorises the simple loops of the scalar template.
TS_AVX2 int max_index_avx2(const CodebookIndices& w, int64_t r0, int64_t r1) {
  int m = 0;
  for (int64_t o = r0; o < r1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    if (w.packed) {
      // the high nibbles' maximum is the bytes' maximum >> 4; two single-maximum loops
      // vectorise (one loop carrying both maxima did not: ~50x slower)
      const int64_t full = w.in / 2;
      uint8_t lo = 0, mx = 0;
      for (int64_t c = 0; c < full; ++c) mx = row[c] > mx ? row[c] : mx;
      for (int64_t c = 0; c < full; ++c) {
        const uint8_t v = static_cast<uint8_t>(row[c] & 0x0F);
        lo = v > lo ? v : lo;
      }
      if (w.in & 1) lo = std::max<uint8_t>(lo, row[full] & 0x0F);
      m = std::max<int>(m, std::max<int>(lo, mx >> 4));
    } else {
      uint8_t mx = 0;
      for (int64_t c = 0; c < w.in; ++c) mx = row[c] > mx ? row[c] : mx;
      m = std::max<int>(m, mx);
    }
  }
  return m;
}

TS_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// Decoders: W weights per step from BYTES index bytes, as W/8 ymm vectors in the order
// the prepared x uses.
struct Avx2Packed16 {  // K <= 16, packed: 8 bytes -> [even8 | odd8]
  static constexpr int W = 16, BYTES = 8, NV = 2;
  __m256 c0, c1;
  TS_AVX2 explicit Avx2Packed16(const float* t) : c0(_mm256_loadu_ps(t)), c1(_mm256_loadu_ps(t + 8)) {}
  TS_AVX2 inline __m256 look(__m256i d) const {
    const __m256 a = _mm256_permutevar8x32_ps(c0, d);
    const __m256 b = _mm256_permutevar8x32_ps(c1, d);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(d, 28)));
  }
  TS_AVX2 inline void decode(const uint8_t* p, __m256* v) const {
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    v[0] = look(d);
    v[1] = look(_mm256_srli_epi32(d, 4));
  }
};
struct Avx2Byte16 {  // K <= 16, uint8
  static constexpr int W = 8, BYTES = 8, NV = 1;
  Avx2Packed16 p;
  TS_AVX2 explicit Avx2Byte16(const float* t) : p(t) {}
  TS_AVX2 inline void decode(const uint8_t* q, __m256* v) const {
    v[0] = p.look(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
  }
};
struct Avx2Gather {  // uint8, any K
  static constexpr int W = 8, BYTES = 8, NV = 1;
  const float* t;
  TS_AVX2 explicit Avx2Gather(const float* tab) : t(tab) {}
  TS_AVX2 inline void decode(const uint8_t* q, __m256* v) const {
    v[0] = _mm256_i32gather_ps(t, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))), 4);
  }
};

// R output rows x NB batch rows over `steps` full steps; sums[r * NB + b].
template <class D, int R, int NB>
TS_AVX2 void avx2_rows(const D& dec, const uint8_t* idx, int64_t ld, int64_t steps, const float* xs, int64_t xld,
                       float* sums) {
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m256 xv[NB][D::NV];
    for (int b = 0; b < NB; ++b)
      for (int v = 0; v < D::NV; ++v) xv[b][v] = _mm256_loadu_ps(xs + b * xld + s * D::W + v * 8);
    for (int r = 0; r < R; ++r) {
      __m256 wv[D::NV];
      dec.decode(idx + r * ld + s * D::BYTES, wv);
      for (int b = 0; b < NB; ++b)
        for (int v = 0; v < D::NV; ++v) acc[r][b] = _mm256_fmadd_ps(wv[v], xv[b][v], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) sums[r * NB + b] = hsum256(acc[r][b]);
}

#endif  // __x86_64__

// Drives a row kernel: batch in groups of up to 4, rows in groups of R, scalar tail columns.
// ROWS(nb, r_count, o, b0, sums) computes the vector part for rows o.. and batch b0..
template <class RowsFn>
inline void drive_gemv(const CodebookIndices& w, const float* table, const float* x, int64_t batch,
                       const float* bias, float* y, int64_t o0, int64_t o1, int64_t vec_cols, int R,
                       RowsFn&& rows) {
  float sums[8 * 4];
  // Rows outer, batch groups inner: the R index rows stay in L1 across the batch groups.
  for (int64_t o = o0; o < o1; o += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, o1 - o));
    for (int64_t b0 = 0; b0 < batch; b0 += 4) {
      const int nb = static_cast<int>(std::min<int64_t>(4, batch - b0));
      rows(nb, nr, o, b0, sums);
      for (int r = 0; r < nr; ++r) {
        const uint8_t* row = w.idx + (o + r) * w.ld;
        for (int b = 0; b < nb; ++b) {
          float v = sums[r * nb + b];
          if (vec_cols < w.in) v += tail_dot<float, float>(w, table, row, x + (b0 + b) * w.in, vec_cols);
          if (bias) v += bias[o + r];
          y[(b0 + b) * w.out + o + r] = v;
        }
      }
    }
  }
}

#if defined(__x86_64__)
template <class D, int R>
TS_AVX2 void avx2_dispatch_nb(const D& dec, int nb, int nr, const uint8_t* idx, int64_t ld, int64_t steps,
                              const float* xs, int64_t xld, float* sums) {
  // Remainder rows (nr < R) run one row at a time.
  if (nr == R) {
    switch (nb) {
      case 1: avx2_rows<D, R, 1>(dec, idx, ld, steps, xs, xld, sums); return;
      case 2: avx2_rows<D, R, 2>(dec, idx, ld, steps, xs, xld, sums); return;
      case 3: avx2_rows<D, R, 3>(dec, idx, ld, steps, xs, xld, sums); return;
      default: avx2_rows<D, R, 4>(dec, idx, ld, steps, xs, xld, sums); return;
    }
  }
  for (int r = 0; r < nr; ++r) {
    switch (nb) {
      case 1: avx2_rows<D, 1, 1>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
      case 2: avx2_rows<D, 1, 2>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
      case 3: avx2_rows<D, 1, 3>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
      default: avx2_rows<D, 1, 4>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
    }
  }
}

template <class D>
TS_AVX2 void avx2_gemv(const D& dec, const CodebookIndices& w, const float* table, const float* x,
                       const float* xs, int64_t xld, int64_t batch, const float* bias, float* y, int64_t o0,
                       int64_t o1) {
  const int64_t steps = w.in / D::W;
  drive_gemv(w, table, x, batch, bias, y, o0, o1, steps * D::W, 4,
             [&](int nb, int nr, int64_t o, int64_t b0, float* sums) {
               avx2_dispatch_nb<D, 4>(dec, nb, nr, w.idx + o * w.ld, w.ld, steps, xs + b0 * xld, xld, sums);
             });
}

// ---------------------------------------------------------------- AVX-512 bodies
struct Avx512Byte16 {  // uint8, K <= 16
  static constexpr int W = 16, BYTES = 16, NV = 1;
  __m512 c;
  TS_AVX512 explicit Avx512Byte16(const float* t) : c(_mm512_loadu_ps(t)) {}
  TS_AVX512 inline void decode(const uint8_t* p, __m512* v) const {
    v[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), c);
  }
};
struct Avx512Byte32 {  // uint8, K <= 32
  static constexpr int W = 16, BYTES = 16, NV = 1;
  __m512 c0, c1;
  TS_AVX512 explicit Avx512Byte32(const float* t) : c0(_mm512_loadu_ps(t)), c1(_mm512_loadu_ps(t + 16)) {}
  TS_AVX512 inline void decode(const uint8_t* p, __m512* v) const {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v[0] = _mm512_permutex2var_ps(c0, d, c1);
  }
};
struct Avx512Gather {  // uint8, any K
  static constexpr int W = 16, BYTES = 16, NV = 1;
  const float* t;
  TS_AVX512 explicit Avx512Gather(const float* tab) : t(tab) {}
  TS_AVX512 inline void decode(const uint8_t* p, __m512* v) const {
    v[0] = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), t, 4);
  }
};

template <class D, int R, int NB>
TS_AVX512 void avx512_rows(const D& dec, const uint8_t* idx, int64_t ld, int64_t steps, const float* xs,
                           int64_t xld, float* sums) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512 xv[NB][D::NV];
    for (int b = 0; b < NB; ++b)
      for (int v = 0; v < D::NV; ++v) xv[b][v] = _mm512_loadu_ps(xs + b * xld + s * D::W + v * 16);
    for (int r = 0; r < R; ++r) {
      __m512 wv[D::NV];
      dec.decode(idx + r * ld + s * D::BYTES, wv);
      for (int b = 0; b < NB; ++b)
        for (int v = 0; v < D::NV; ++v) acc[r][b] = _mm512_fmadd_ps(wv[v], xv[b][v], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) sums[r * NB + b] = _mm512_reduce_add_ps(acc[r][b]);
}

template <class D, int R>
TS_AVX512 void avx512_dispatch_nb(const D& dec, int nb, int nr, const uint8_t* idx, int64_t ld, int64_t steps,
                                  const float* xs, int64_t xld, float* sums) {
  if (nr == R) {
    switch (nb) {
      case 1: avx512_rows<D, R, 1>(dec, idx, ld, steps, xs, xld, sums); return;
      case 2: avx512_rows<D, R, 2>(dec, idx, ld, steps, xs, xld, sums); return;
      case 3: avx512_rows<D, R, 3>(dec, idx, ld, steps, xs, xld, sums); return;
      default: avx512_rows<D, R, 4>(dec, idx, ld, steps, xs, xld, sums); return;
    }
  }
  for (int r = 0; r < nr; ++r) {
    switch (nb) {
      case 1: avx512_rows<D, 1, 1>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
      case 2: avx512_rows<D, 1, 2>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
      case 3: avx512_rows<D, 1, 3>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
      default: avx512_rows<D, 1, 4>(dec, idx + r * ld, ld, steps, xs, xld, sums + r * nb); break;
    }
  }
}

template <class D>
TS_AVX512 void avx512_gemv(const D& dec, const CodebookIndices& w, const float* table, const float* x,
                           const float* xs, int64_t xld, int64_t batch, const float* bias, float* y, int64_t o0,
                           int64_t o1) {
  const int64_t steps = w.in / D::W;
  drive_gemv(w, table, x, batch, bias, y, o0, o1, steps * D::W, 4,
             [&](int nb, int nr, int64_t o, int64_t b0, float* sums) {
               avx512_dispatch_nb<D, 4>(dec, nb, nr, w.idx + o * w.ld, w.ld, steps, xs + b0 * xld, xld, sums);
             });
}

// ---------------------------------------------------------------- AVX-512 VBMI (K > 32)
// Byte-plane lookup from a 256-entry table held in 16 zmm registers: plane q (byte q of
// every fp32 entry) is 4 registers; vpermi2b looks up 64 indices in entries 0..127 and
// 128..255 (7 index bits, merge-masked on bit 7, see vbmi_planes); byte / word unpacks
// rebuild the fp32 words. Within each 128-bit lane l the unpacks yield, in vector f_q, the elements
// 16 l + 4 q + t (t = 0..3), so x is rearranged once per call to that order.
// TORCHSLIM_CODEBOOK_GATHER=1 forces the gather path (benchmarks compare the two).
bool gather_forced() {
  static const bool v = std::getenv("TORCHSLIM_CODEBOOK_GATHER") != nullptr;
  return v;
}

bool has_vbmi() {
  if (gather_forced()) return false;
  static const bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") != 0;
  }();
  return v;
}

struct VbmiTable {
  __m512i p[4][4];
};

TS_AVX512VBMI void vbmi_load_table(const float* table, VbmiTable& t) {
  alignas(64) uint8_t planes[4][256];
  for (int k = 0; k < 256; ++k) {
    uint32_t bits;
    std::memcpy(&bits, table + k, 4);
    for (int q = 0; q < 4; ++q) planes[q][k] = static_cast<uint8_t>(bits >> (8 * q));
  }
  for (int q = 0; q < 4; ++q)
    for (int r = 0; r < 4; ++r) t.p[q][r] = _mm512_load_si512(planes[q] + 64 * r);
}

// Byte planes of 64 weights: pl[q] byte i = byte q of table[v[i]]. Two merge-masked
// vpermi2b per plane, no blend: the first looks up the bytes whose index has bit 7 clear in
// entries 0..127 and keeps the index bytes elsewhere, the second looks those kept indices up
// in entries 128..255 (vpermi2b reads 7 index bits). In a straight-line asm mix this runs
// 12.1 cycles per 64 weights against 13.8 with two vpermt2b + a blend per plane.
TS_AVX512VBMI inline void vbmi_planes(const VbmiTable& t, __m512i v, __m512i pl[4]) {
  const __mmask64 hi = _mm512_movepi8_mask(v);
  const __mmask64 lo = _knot_mask64(hi);
  for (int q = 0; q < 4; ++q) {
    const __m512i a = _mm512_mask2_permutex2var_epi8(t.p[q][0], v, lo, t.p[q][1]);
    pl[q] = _mm512_mask2_permutex2var_epi8(t.p[q][2], a, hi, t.p[q][3]);
  }
}

// The two halves of vbmi_planes as separate pipeline stages (see vbmi_rows).
TS_AVX512VBMI inline void vbmi_lookup_lo(const VbmiTable& t, __m512i v, __mmask64 hi, __m512i a[4]) {
  const __mmask64 lo = _knot_mask64(hi);
  for (int q = 0; q < 4; ++q) a[q] = _mm512_mask2_permutex2var_epi8(t.p[q][0], v, lo, t.p[q][1]);
}
TS_AVX512VBMI inline void vbmi_lookup_hi(const VbmiTable& t, const __m512i a[4], __mmask64 hi, __m512i pl[4]) {
  for (int q = 0; q < 4; ++q) pl[q] = _mm512_mask2_permutex2var_epi8(t.p[q][2], a[q], hi, t.p[q][3]);
}

// The fp32 words of the 4 planes, in the unpack order: f[q] lane l holds weights 16 l + 4 q + t.
TS_AVX512VBMI inline void vbmi_words(const __m512i pl[4], __m512 f[4]) {
  const __m512i a_lo = _mm512_unpacklo_epi8(pl[0], pl[1]);
  const __m512i a_hi = _mm512_unpackhi_epi8(pl[0], pl[1]);
  const __m512i b_lo = _mm512_unpacklo_epi8(pl[2], pl[3]);
  const __m512i b_hi = _mm512_unpackhi_epi8(pl[2], pl[3]);
  f[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(a_lo, b_lo));
  f[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(a_lo, b_lo));
  f[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(a_hi, b_hi));
  f[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(a_hi, b_hi));
}

// vbmi_rows for in % 64 != 0: rows one at a time, one step of look-ahead, the partial last
// step of each row (peeled out of the inner loop) loads its index bytes with a mask (no read
// past the row; masked-off lanes read index 0) and masks its FMAs, so those lanes add nothing
// whatever table[0] holds; xs is zero-padded to whole steps. (The 3-stage stream of
// vbmi_rows ran 7-16% slower than this on 1000-wide rows: the partial step every 16 steps.)
template <int NB, bool TAIL>
TS_AVX512VBMI void vbmi_rows_1ahead(const VbmiTable& tab, const uint8_t* idx, int64_t ld, int nr, int64_t in,
                             const float* xs, int64_t xld, float* sums, __m512i& vmax) {
  const int64_t steps = (in + 63) / 64;
  const int tail = static_cast<int>(in - (steps - 1) * 64);  // weights in the last step, 1..64
  if (in <= 0 || nr <= 0) {
    for (int i = 0; i < nr * NB; ++i) sums[i] = 0.0f;
    return;
  }
  const __mmask64 kload = tail == 64 ? ~__mmask64(0) : (__mmask64(1) << tail) - 1;
  __mmask16 kf[4];  // f[q] lane 4 l + t holds weight 16 l + 4 q + t
  for (int q = 0; q < 4; ++q) {
    unsigned m = 0;
    for (int l = 0; l < 4; ++l)
      for (int t = 0; t < 4; ++t)
        if (16 * l + 4 * q + t < tail) m |= 1u << (4 * l + t);
    kf[q] = static_cast<__mmask16>(m);
  }
  const VbmiTable t = tab;
  __m512 acc[NB][2];
  for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
  // index bytes of step s of a row: the last step masked
  // index bytes of step st of a row (the last step masked), into the running maximum
  __m512i mx = vmax;
  auto planes = [&](const uint8_t* row, int64_t st, __m512i* out) TS_AVX512VBMI {
    const __m512i v = TAIL && st + 1 == steps ? _mm512_maskz_loadu_epi8(kload, row + st * 64)
                                              : _mm512_loadu_si512(row + st * 64);
    mx = _mm512_max_epu8(mx, v);
    vbmi_planes(t, v, out);
  };
  __m512i pl[4], nx[4];
  planes(idx, 0, pl);
  for (int r = 0; r < nr; ++r) {
    const uint8_t* row = idx + r * ld;
    const float* xr = xs;
    // full steps; the next step's lookups are issued before this step's unpacks and FMAs
    auto full_step = [&](int64_t st, bool next_is_last) TS_AVX512VBMI {
      _mm_prefetch(reinterpret_cast<const char*>(row + ld + st * 64), _MM_HINT_T0);  // next row
      const uint8_t* p = row + (st + 1) * 64;
      const __m512i v = TAIL && next_is_last ? _mm512_maskz_loadu_epi8(kload, p) : _mm512_loadu_si512(p);
      mx = _mm512_max_epu8(mx, v);
      vbmi_planes(t, v, nx);
      __m512 f[4];
      vbmi_words(pl, f);
      for (int b = 0; b < NB; ++b)
        for (int q = 0; q < 4; ++q)
          acc[b][q & 1] = _mm512_fmadd_ps(f[q], _mm512_loadu_ps(xr + b * xld + 16 * q), acc[b][q & 1]);
      for (int q = 0; q < 4; ++q) pl[q] = nx[q];
      xr += 64;
    };
    int64_t s = 0;
    for (; s + 2 < steps; ++s) full_step(s, false);
    if (s + 1 < steps) full_step(s, true);
    // last step of the row (masked FMAs); the next row's first lookups first
    if (r + 1 < nr) planes(row + ld, 0, nx);
    __m512 f[4];
    vbmi_words(pl, f);
    for (int b = 0; b < NB; ++b) {
      for (int q = 0; q < 4; ++q) {
        const __m512 xv = _mm512_loadu_ps(xr + b * xld + 16 * q);
        acc[b][q & 1] = TAIL ? _mm512_mask3_fmadd_ps(f[q], xv, acc[b][q & 1], kf[q]) : _mm512_fmadd_ps(f[q], xv, acc[b][q & 1]);
      }
      sums[r * NB + b] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
      acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    }
    for (int q = 0; q < 4; ++q) pl[q] = nx[q];
  }
  vmax = mx;
}

// Rows [0, nr) of idx (ld apart, `in` weights each) against NB batch rows:
// sums[r * NB + b]. The (row, step) positions run as one stream through a 3-stage software
// pipeline: while step g is unpacked and multiplied, the entries-128..255 lookups of step
// g + 1 and the entries-0..127 lookups of step g + 2 are issued, so the two dependent
// vpermi2b per plane (latency ~5 cycles each; on Zen 4 they share a pipe with the FMAs)
// overlap earlier steps' work instead of waiting on the out-of-order window; a row end costs
// no refill. Measured per 64 weights (single thread, indices in L2): 14.5 cycles with one
// step of look-ahead, 13.75 with two. The 16 table registers are loaded once per call.
// Whole steps only (in % 64 == 0; vbmi_rows_1ahead takes the others). vmax collects the
// maximum of every index byte read.
template <int NB>
TS_AVX512VBMI void vbmi_rows(const VbmiTable& tab, const uint8_t* idx, int64_t ld, int nr, int64_t in,
                             const float* xs, int64_t xld, float* sums, __m512i& vmax) {
  const int64_t steps = in / 64;
  if (steps <= 0 || nr <= 0) {
    for (int i = 0; i < nr * NB; ++i) sums[i] = 0.0f;
    return;
  }
  const VbmiTable t = tab;
  __m512 acc[NB][2];
  for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
  __m512i mx = vmax;
  // stage A position (row ra, step sa)
  int ra = 0;
  int64_t sa = 0;
  auto load_a = [&]() TS_AVX512VBMI {
    const uint8_t* p = idx + ra * ld + sa * 64;
    _mm_prefetch(reinterpret_cast<const char*>(p + ld), _MM_HINT_T0);  // next row
    const __m512i v = _mm512_loadu_si512(p);
    if (++sa == steps) {
      sa = 0;
      ++ra;
    }
    mx = _mm512_max_epu8(mx, v);
    return v;
  };
  const int64_t total = nr * steps;
  __m512i pl[4], a[4];
  __mmask64 hi_b;  // bit-7 mask of the position in a[] (stage B)
  {
    const __m512i v = load_a();
    hi_b = _mm512_movepi8_mask(v);
    vbmi_lookup_lo(t, v, hi_b, a);
    vbmi_lookup_hi(t, a, hi_b, pl);
  }
  if (total > 1) {
    const __m512i v = load_a();
    hi_b = _mm512_movepi8_mask(v);
    vbmi_lookup_lo(t, v, hi_b, a);
  }
  int r = 0;  // stage C position (r, s)
  int64_t s = 0;
  for (int64_t g = 0; g < total; ++g) {
    __m512i nx[4];
    if (g + 1 < total) vbmi_lookup_hi(t, a, hi_b, nx);  // stage B: position g + 1
    if (g + 2 < total) {                                 // stage A: position g + 2
      const __m512i v = load_a();
      hi_b = _mm512_movepi8_mask(v);
      vbmi_lookup_lo(t, v, hi_b, a);
    }
    __m512 f[4];
    vbmi_words(pl, f);
    const float* xr = xs + s * 64;
    if (s + 1 < steps) {
      for (int b = 0; b < NB; ++b)
        for (int q = 0; q < 4; ++q)
          acc[b][q & 1] = _mm512_fmadd_ps(f[q], _mm512_loadu_ps(xr + b * xld + 16 * q), acc[b][q & 1]);
      ++s;
    } else {  // last step of row r, then reduce
      for (int b = 0; b < NB; ++b) {
        for (int q = 0; q < 4; ++q)
          acc[b][q & 1] = _mm512_fmadd_ps(f[q], _mm512_loadu_ps(xr + b * xld + 16 * q), acc[b][q & 1]);
        sums[r * NB + b] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
        acc[b][0] = acc[b][1] = _mm512_setzero_ps();
      }
      ++r;
      s = 0;
    }
    for (int q = 0; q < 4; ++q) pl[q] = nx[q];
  }
  vmax = mx;
}

TS_AVX512VBMI void vbmi_gemv(const CodebookIndices& w, const float* table, const float* x, const float* xs,
                             int64_t batch, const float* bias, float* y, int64_t o0, int64_t o1, int* max_index) {
  VbmiTable t;
  vbmi_load_table(table, t);
  const int64_t xld = (w.in + 63) / 64 * 64;
  __m512i vmax = _mm512_setzero_si512();
  // every column is covered by the vector steps (the last one masked): no scalar tail
  drive_gemv(w, table, x, batch, bias, y, o0, o1, w.in, 8, [&](int nb, int nr, int64_t o, int64_t b0, float* sums) {
    const uint8_t* rows = w.idx + o * w.ld;
    const float* xb = xs + b0 * xld;
    if (w.in % 64 == 0) {
      switch (nb) {
        case 1: vbmi_rows<1>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
        case 2: vbmi_rows<2>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
        case 3: vbmi_rows<3>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
        default: vbmi_rows<4>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
      }
    } else {
      switch (nb) {
        case 1: vbmi_rows_1ahead<1, true>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
        case 2: vbmi_rows_1ahead<2, true>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
        case 3: vbmi_rows_1ahead<3, true>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
        default: vbmi_rows_1ahead<4, true>(t, rows, w.ld, nr, w.in, xb, xld, sums, vmax); break;
      }
    }
  });
  if (max_index) {
    alignas(64) uint8_t b[64];
    _mm512_store_si512(b, vmax);
    int m = 0;
    for (int i = 0; i < 64; ++i) m = std::max<int>(m, b[i]);
    *max_index = m;
  }
}

// Packed 4-bit, AVX-512, 128 weights per step without any index widening: 64 index bytes
// are one zmm; as 16 dwords, dword i holds the nibbles of weights 8i .. 8i+7, and vpermps
// reads only the low 4 bits of each dword, so vpermps(d >> 4k) decodes the 16 weights
// 8i + k. x is rearranged once per call so that step s, k holds x[128 s + 8 i + k].
// Leftover 32-weight steps use the widen + even/odd decode.
template <int R, int NB>
TS_AVX512 void p128_rows(__m512 c, const uint8_t* idx, int64_t ld, int64_t n128, int64_t n32, const float* xs,
                         int64_t xld, float* sums) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n128; ++s) {
    __m512i d[R];
    for (int r = 0; r < R; ++r) {
      // R concurrent index streams: prefetch the same line of the next block of R rows (one
      // block of work ahead), so a layer streamed from DRAM keeps its misses in flight.
      _mm_prefetch(reinterpret_cast<const char*>(idx + (r + R) * ld + s * 64), _MM_HINT_T0);
      d[r] = _mm512_loadu_si512(idx + r * ld + s * 64);
    }
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      __m512 xk[NB];
      for (int b = 0; b < NB; ++b) xk[b] = _mm512_loadu_ps(xs + b * xld + s * 128 + 16 * k);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = _mm512_permutexvar_ps(d[r], c);
        d[r] = _mm512_srli_epi32(d[r], 4);
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wv, xk[b], acc[r][b]);
      }
    }
  }
  for (int64_t s = n128 * 4; s < n32; ++s) {
    for (int r = 0; r < R; ++r) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + r * ld + s * 16)));
      const __m512 ev = _mm512_permutexvar_ps(q, c);
      const __m512 od = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), c);
      for (int b = 0; b < NB; ++b) {
        acc[r][b] = _mm512_fmadd_ps(ev, _mm512_loadu_ps(xs + b * xld + s * 32), acc[r][b]);
        acc[r][b] = _mm512_fmadd_ps(od, _mm512_loadu_ps(xs + b * xld + s * 32 + 16), acc[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) sums[r * NB + b] = _mm512_reduce_add_ps(acc[r][b]);
}

template <int R>
TS_AVX512 void p128_dispatch(__m512 c, int nb, int nr, const uint8_t* idx, int64_t ld, int64_t n128, int64_t n32,
                             const float* xs, int64_t xld, float* sums) {
  if (nr == R) {
    switch (nb) {
      case 1: p128_rows<R, 1>(c, idx, ld, n128, n32, xs, xld, sums); return;
      case 2: p128_rows<R, 2>(c, idx, ld, n128, n32, xs, xld, sums); return;
      case 3: p128_rows<R, 3>(c, idx, ld, n128, n32, xs, xld, sums); return;
      default: p128_rows<R, 4>(c, idx, ld, n128, n32, xs, xld, sums); return;
    }
  }
  for (int r = 0; r < nr; ++r) {
    switch (nb) {
      case 1: p128_rows<1, 1>(c, idx + r * ld, ld, n128, n32, xs, xld, sums + r * nb); break;
      case 2: p128_rows<1, 2>(c, idx + r * ld, ld, n128, n32, xs, xld, sums + r * nb); break;
      case 3: p128_rows<1, 3>(c, idx + r * ld, ld, n128, n32, xs, xld, sums + r * nb); break;
      default: p128_rows<1, 4>(c, idx + r * ld, ld, n128, n32, xs, xld, sums + r * nb); break;
    }
  }
}

TS_AVX512 void p128_gemv(const CodebookIndices& w, const float* table, const float* x, const float* xs,
                         int64_t batch, const float* bias, float* y, int64_t o0, int64_t o1) {
  const __m512 c = _mm512_loadu_ps(table);
  const int64_t n128 = w.in / 128, n32 = w.in / 32, xld = n32 * 32;
  const int R = batch == 1 ? 8 : 4;
  drive_gemv(w, table, x, batch, bias, y, o0, o1, xld, R, [&](int nb, int nr, int64_t o, int64_t b0, float* sums) {
    const uint8_t* idx = w.idx + o * w.ld;
    if (R == 8)
      p128_dispatch<8>(c, nb, nr, idx, w.ld, n128, n32, xs + b0 * xld, xld, sums);
    else if (R == 2)
      p128_dispatch<2>(c, nb, nr, idx, w.ld, n128, n32, xs + b0 * xld, xld, sums);
    else
      p128_dispatch<4>(c, nb, nr, idx, w.ld, n128, n32, xs + b0 * xld, xld, sums);
  });
}

// Byte-plane decode of rows of W into natural order: the 4 unpacked vectors hold, per
// 128-bit lane l, elements 16 l + 4 q + t; a 4x4 transpose of 128-bit lanes restores order.
TS_AVX512VBMI void decode_vbmi(const CodebookIndices& w, const float* table, float* dst, int64_t ld_dst,
                               int64_t o0, int64_t o1) {
  VbmiTable t;
  vbmi_load_table(table, t);
  const int64_t steps = w.in / 64;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    float* d = dst + (o - o0) * ld_dst;
    for (int64_t s = 0; s < steps; ++s) {
      __m512i pl[4];
      vbmi_planes(t, _mm512_loadu_si512(row + s * 64), pl);
      const __m512i a_lo = _mm512_unpacklo_epi8(pl[0], pl[1]);
      const __m512i a_hi = _mm512_unpackhi_epi8(pl[0], pl[1]);
      const __m512i b_lo = _mm512_unpacklo_epi8(pl[2], pl[3]);
      const __m512i b_hi = _mm512_unpackhi_epi8(pl[2], pl[3]);
      const __m512 f0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(a_lo, b_lo));
      const __m512 f1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(a_lo, b_lo));
      const __m512 f2 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(a_hi, b_hi));
      const __m512 f3 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(a_hi, b_hi));
      const __m512 t0 = _mm512_shuffle_f32x4(f0, f1, 0x44);
      const __m512 t1 = _mm512_shuffle_f32x4(f2, f3, 0x44);
      const __m512 t2 = _mm512_shuffle_f32x4(f0, f1, 0xEE);
      const __m512 t3 = _mm512_shuffle_f32x4(f2, f3, 0xEE);
      _mm512_storeu_ps(d + s * 64, _mm512_shuffle_f32x4(t0, t1, 0x88));
      _mm512_storeu_ps(d + s * 64 + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
      _mm512_storeu_ps(d + s * 64 + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
      _mm512_storeu_ps(d + s * 64 + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
    }
    for (int64_t j = steps * 64; j < w.in; ++j) d[j] = table[row[j]];
  }
}

// Largest index, 64 index bytes per vpmaxub (4 independent maxima; the row end by a masked,
// zero-filling load, which cannot raise the maximum). Packed rows: both nibbles of the
// in / 2 full bytes, then the low nibble of the last byte of an odd row.
TS_AVX512 int max_index_avx512(const CodebookIndices& w, int64_t r0, int64_t r1) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t nbytes = w.packed ? w.in / 2 : w.in;
  __m512i m[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  int extra = 0;
  auto fold = [&](__m512i v, int a) TS_AVX512 {
    if (w.packed)
      m[a] = _mm512_max_epu8(m[a], _mm512_max_epu8(_mm512_and_si512(v, low4),
                                                   _mm512_and_si512(_mm512_srli_epi16(v, 4), low4)));
    else
      m[a] = _mm512_max_epu8(m[a], v);
  };
  for (int64_t o = r0; o < r1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    int64_t c = 0;
    for (; c + 256 <= nbytes; c += 256)
      for (int a = 0; a < 4; ++a) fold(_mm512_loadu_si512(row + c + 64 * a), a);
    for (; c + 64 <= nbytes; c += 64) fold(_mm512_loadu_si512(row + c), 0);
    if (c < nbytes) fold(_mm512_maskz_loadu_epi8((__mmask64(1) << (nbytes - c)) - 1, row + c), 1);
    if (w.packed && (w.in & 1)) extra = std::max(extra, row[nbytes] & 0x0F);
  }
  const __m512i v = _mm512_max_epu8(_mm512_max_epu8(m[0], m[1]), _mm512_max_epu8(m[2], m[3]));
  alignas(64) uint8_t b[64];
  _mm512_store_si512(b, v);
  int r = extra;
  for (int i = 0; i < 64; ++i) r = std::max<int>(r, b[i]);
  return r;
}

TS_AVX512 void decode_packed_avx512(const CodebookIndices& w, const float* table, float* dst, int64_t ld_dst,
                                    int64_t o0, int64_t o1) {
  const __m512 c = _mm512_loadu_ps(table);
  const __m512i lo_perm = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_perm = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const int64_t steps = w.in / 32;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    float* d = dst + (o - o0) * ld_dst;
    for (int64_t s = 0; s < steps; ++s) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + s * 16)));
      const __m512 ev = _mm512_permutexvar_ps(q, c);
      const __m512 od = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), c);
      _mm512_storeu_ps(d + s * 32, _mm512_permutex2var_ps(ev, lo_perm, od));
      _mm512_storeu_ps(d + s * 32 + 16, _mm512_permutex2var_ps(ev, hi_perm, od));
    }
    for (int64_t j = steps * 32; j < w.in; ++j) d[j] = table[index_at(w, row, j)];
  }
}

TS_AVX512 void decode_bytes_avx512(const CodebookIndices& w, const float* table, float* dst, int64_t ld_dst,
                                   int64_t o0, int64_t o1) {
  const int64_t steps = w.in / 16;
  const bool small = w.num_clusters <= 16;
  const __m512 c = _mm512_loadu_ps(table);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = w.idx + o * w.ld;
    float* d = dst + (o - o0) * ld_dst;
    for (int64_t s = 0; s < steps; ++s) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + s * 16)));
      _mm512_storeu_ps(d + s * 16, small ? _mm512_permutexvar_ps(q, c) : _mm512_i32gather_ps(q, table, 4));
    }
    for (int64_t j = steps * 16; j < w.in; ++j) d[j] = table[row[j]];
  }
}
#endif  // __x86_64__

}  // namespace

int codebook_max_index(const CodebookIndices& w, int64_t r0, int64_t r1) {
#if defined(__x86_64__)
  if (simd_level() == SimdLevel::AVX512) return max_index_avx512(w, r0, r1);
  if (simd_level() >= SimdLevel::AVX2) return max_index_avx2(w, r0, r1);
#endif
  return max_index_scalar(w, r0, r1);
}

// Prepared x: packed layouts need x split into even/odd halves per decode step; the VBMI
// byte-plane path needs the unpack order of each 64-wide step.
enum class Prep { None, EvenOdd32, EvenOdd16, Vbmi64 };
static Prep prep_kind(const CodebookIndices& w) {
#if defined(__x86_64__)
  const SimdLevel lv = simd_level();
  if (w.packed && lv == SimdLevel::AVX512) return Prep::EvenOdd32;
  if (w.packed && lv == SimdLevel::AVX2) return Prep::EvenOdd16;
  if (!w.packed && lv == SimdLevel::AVX512 && w.num_clusters > 32 && has_vbmi()) return Prep::Vbmi64;
#endif
  (void)w;
  return Prep::None;
}
static int packed_step(const CodebookIndices& w) {
  switch (prep_kind(w)) {
    case Prep::EvenOdd32: return 32;
    case Prep::EvenOdd16: return 16;
    case Prep::Vbmi64: return 64;
    default: return 0;
  }
}

int64_t codebook_gemv_prepared_size(const CodebookIndices& w, int64_t batch) {
  const int step = packed_step(w);
  if (step == 0) return 0;
  if (prep_kind(w) == Prep::Vbmi64) return batch * ((w.in + step - 1) / step) * step;  // zero-padded last step
  return batch * (w.in / step) * step;
}

void codebook_gemv_prepare(const CodebookIndices& w, const float* x, int64_t batch, float* prepared) {
  const int step = packed_step(w);
  if (step == 0) return;
  const int half = step / 2;
  const int64_t steps = w.in / step;
  const int64_t xld = steps * step;
  if (prep_kind(w) == Prep::EvenOdd32) {
    const int64_t n128 = w.in / 128;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xr = x + b * w.in;
      float* p = prepared + b * xld;
      for (int64_t s = 0; s < n128; ++s)
        for (int k = 0; k < 8; ++k)
          for (int i = 0; i < 16; ++i) p[s * 128 + 16 * k + i] = xr[s * 128 + 8 * i + k];
      for (int64_t s = n128 * 4; s < steps; ++s)
        for (int t = 0; t < 16; ++t) {
          p[s * 32 + t] = xr[s * 32 + 2 * t];
          p[s * 32 + 16 + t] = xr[s * 32 + 2 * t + 1];
        }
    }
    return;
  }
  if (prep_kind(w) == Prep::Vbmi64) {
    // step s, vector q, lane 4 l + t holds x[64 s + 16 l + 4 q + t]; zeros past in
    const int64_t vsteps = (w.in + 63) / 64, vld = vsteps * 64;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t s = 0; s < vsteps; ++s)
        for (int q = 0; q < 4; ++q)
          for (int l = 0; l < 4; ++l)
            for (int t = 0; t < 4; ++t) {
              const int64_t j = s * 64 + 16 * l + 4 * q + t;
              prepared[b * vld + s * 64 + q * 16 + l * 4 + t] = j < w.in ? x[b * w.in + j] : 0.0f;
            }
    return;
  }
  for (int64_t b = 0; b < batch; ++b) {
    const float* xr = x + b * w.in;
    float* p = prepared + b * xld;
    for (int64_t s = 0; s < steps; ++s)
      for (int t = 0; t < half; ++t) {
        p[s * step + t] = xr[s * step + 2 * t];
        p[s * step + half + t] = xr[s * step + 2 * t + 1];
      }
  }
}

const char* codebook_gemv_path(const CodebookIndices& w) {
#if defined(__x86_64__)
  const SimdLevel lv = simd_level();
  if (lv == SimdLevel::AVX512) {
    if (w.packed) return "avx512-permute16-packed128";
    if (w.num_clusters <= 16) return "avx512-permute16";
    if (w.num_clusters <= 32) return "avx512-permute32";
    if (has_vbmi()) return "avx512vbmi-byteplanes";
    return "avx512-gather";
  }
  if (lv == SimdLevel::AVX2) {
    if (w.packed) return "avx2-permute2x8-packed";
    if (w.num_clusters <= 16) return "avx2-permute2x8";
    return "avx2-gather";
  }
#endif
  (void)w;
  return "scalar";
}

bool codebook_gemv_reports_max_index(const CodebookIndices& w) {
#if defined(__x86_64__)
  // the byte-plane path reads every index of its rows once through a vector register
  return !w.packed && simd_level() == SimdLevel::AVX512 && w.num_clusters > 32 && has_vbmi();
#else
  (void)w;
  return false;
#endif
}

void codebook_gemv(const CodebookIndices& w, const float* table, const float* x, const float* prepared,
                   int64_t batch, const float* bias, float* y, int64_t o0, int64_t o1, int* max_index) {
  if (max_index) *max_index = 0;
#if defined(__x86_64__)
  const SimdLevel lv = simd_level();
  if (lv == SimdLevel::AVX512) {
    if (w.packed) {
      p128_gemv(w, table, x, prepared, batch, bias, y, o0, o1);
    } else if (w.num_clusters <= 16) {
      avx512_gemv(Avx512Byte16(table), w, table, x, x, w.in, batch, bias, y, o0, o1);
    } else if (w.num_clusters <= 32) {
      avx512_gemv(Avx512Byte32(table), w, table, x, x, w.in, batch, bias, y, o0, o1);
    } else if (has_vbmi()) {
      vbmi_gemv(w, table, x, prepared, batch, bias, y, o0, o1, max_index);
    } else {
      avx512_gemv(Avx512Gather(table), w, table, x, x, w.in, batch, bias, y, o0, o1);
    }
    return;
  }
  if (lv == SimdLevel::AVX2) {
    if (w.packed) {
      avx2_gemv(Avx2Packed16(table), w, table, x, prepared, (w.in / 16) * 16, batch, bias, y, o0, o1);
    } else if (w.num_clusters <= 16) {
      avx2_gemv(Avx2Byte16(table), w, table, x, x, w.in, batch, bias, y, o0, o1);
    } else {
      avx2_gemv(Avx2Gather(table), w, table, x, x, w.in, batch, bias, y, o0, o1);
    }
    return;
  }
#endif
  (void)prepared;
  gemv_scalar<float>(w, table, x, batch, bias, y, o0, o1);
}

void codebook_gemv(const CodebookIndices& w, const double* table, const double* x, int64_t batch,
                   const double* bias, double* y, int64_t o0, int64_t o1) {
  gemv_scalar<double>(w, table, x, batch, bias, y, o0, o1);
}

void codebook_decode(const CodebookIndices& w, const float* table, float* dst, int64_t ld_dst, int64_t o0,
                     int64_t o1) {
#if defined(__x86_64__)
  if (simd_level() == SimdLevel::AVX512) {
    if (w.packed)
      decode_packed_avx512(w, table, dst, ld_dst, o0, o1);
    else if (w.num_clusters > 16 && has_vbmi())
      decode_vbmi(w, table, dst, ld_dst, o0, o1);
    else
      decode_bytes_avx512(w, table, dst, ld_dst, o0, o1);
    return;
  }
#endif
  decode_scalar<float>(w, table, dst, ld_dst, o0, o1);
}

void codebook_decode(const CodebookIndices& w, const double* table, double* dst, int64_t ld_dst, int64_t o0,
                     int64_t o1) {
  decode_scalar<double>(w, table, dst, ld_dst, o0, o1);
}

void codebook_histogram(const CodebookIndices& w, const float* dw, int64_t ld_dw, int64_t o0, int64_t o1,
                        double* hist) {
  histogram_scalar<float, float>(w, dw, ld_dw, o0, o1, hist);
}

void codebook_histogram(const CodebookIndices& w, const double* dw, int64_t ld_dw, int64_t o0, int64_t o1,
                        double* hist) {
  histogram_scalar<double, double>(w, dw, ld_dw, o0, o1, hist);
}

void codebook_grad_fused(const CodebookIndices& w, const float* dy, const float* x, int64_t batch, int64_t o0,
                         int64_t o1, double* hist) {
  // One row of dW at a time in a small buffer (L1), then the histogram of that row.
  std::vector<float> row(static_cast<size_t>(std::max<int64_t>(w.in, 1)));
  for (int64_t o = o0; o < o1; ++o) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t b = 0; b < batch; ++b) {
      const float g = dy[b * w.out + o];
      const float* xr = x + b * w.in;
      for (int64_t j = 0; j < w.in; ++j) row[j] += g * xr[j];
    }
    CodebookIndices one = w;
    one.idx = w.idx + o * w.ld;
    histogram_scalar<float, float>(one, row.data(), 0, 0, 1, hist);
  }
}

}  // namespace cpu
}  // namespace torchslim
