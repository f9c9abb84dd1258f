// CPU kernels of codebook_linear (torch-free: raw pointers, sizes, strides).
//
// W[o, j] = table[idx(o, j)] where idx is uint8 [out, in] ("unpacked") or two 4-bit
// indices a byte [out, ceil(in/2)] ("packed": element j in the low nibble of byte j/2
// when j is even, the high nibble when odd). `table` always holds 256 entries: the
// codebook padded with zeros, so that no index value can read outside it; the caller has
// checked beforehand that every index in use is below the codebook size K.
#pragma once
#include <cstdint>

#include "kernels/codebook_indices.h"

namespace torchslim {
namespace cpu {

using torchslim::CodebookIndices;

// Largest index used by rows [r0, r1) (the padding nibble of an odd packed row is ignored).
int codebook_max_index(const CodebookIndices& w, int64_t r0, int64_t r1);

// Small-batch forward that decodes straight from the indices.
// Call codebook_gemv_prepare once per call (it rearranges x for the SIMD decode; size from
// codebook_gemv_prepared_size, in elements), then codebook_gemv on disjoint row ranges from
// several threads. x is [batch, in] row-major (ld = in); y is [batch, out] (ld = out);
// bias may be null.
int64_t codebook_gemv_prepared_size(const CodebookIndices& w, int64_t batch);
void codebook_gemv_prepare(const CodebookIndices& w, const float* x, int64_t batch, float* prepared);
// max_index (optional): when codebook_gemv_reports_max_index(w), the largest index of rows
// [o0, o1) is written there (the lookups read every index anyway; the caller may skip its
// own range scan and check afterwards: the padded table keeps every lookup in bounds).
void codebook_gemv(const CodebookIndices& w, const float* table, const float* x, const float* prepared,
                   int64_t batch, const float* bias, float* y, int64_t o0, int64_t o1, int* max_index = nullptr);
bool codebook_gemv_reports_max_index(const CodebookIndices& w);
void codebook_gemv(const CodebookIndices& w, const double* table, const double* x, int64_t batch,
                   const double* bias, double* y, int64_t o0, int64_t o1);

// Decode rows [o0, o1) of W into dst (row o at dst + (o - o0) * ld_dst).
void codebook_decode(const CodebookIndices& w, const float* table, float* dst, int64_t ld_dst, int64_t o0,
                     int64_t o1);
void codebook_decode(const CodebookIndices& w, const double* table, double* dst, int64_t ld_dst, int64_t o0,
                     int64_t o1);

// hist[k] += sum of dw[o, j] over the (o, j) of rows [o0, o1) whose index is k
// (dw row o at dw + (o - o0) * ld_dw). hist has num_clusters entries.
void codebook_histogram(const CodebookIndices& w, const float* dw, int64_t ld_dw, int64_t o0, int64_t o1,
                        double* hist);
void codebook_histogram(const CodebookIndices& w, const double* dw, int64_t ld_dw, int64_t o0, int64_t o1,
                        double* hist);

// Fused small-batch codebook gradient: hist[k] += sum over (o, j) with index k of
// sum_b dy[b, o] * x[b, j], rows [o0, o1), without forming dW. dy is [batch, out], x is
// [batch, in].
void codebook_grad_fused(const CodebookIndices& w, const float* dy, const float* x, int64_t batch, int64_t o0,
                         int64_t o1, double* hist);

// Name of the decode path codebook_gemv takes for this layout on this CPU (for benchmarks).
const char* codebook_gemv_path(const CodebookIndices& w);

}  // namespace cpu
}  // namespace torchslim
