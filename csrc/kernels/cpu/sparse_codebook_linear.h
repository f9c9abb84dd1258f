// CPU kernels of sparse_codebook_linear (torch-free: raw pointers and sizes).
//
// A pruned + weight-shared weight W [rows, cols] is held as CSR by rows, with a codebook
// index per kept weight instead of a value (EIE's layout):
//   row_ptr[rows + 1]  int32, row_ptr[0] = 0, non-decreasing, row_ptr[rows] = nnz
//   col[nnz]           int16 (cols <= 32767) or int32 absolute column indices
//   codes              packed 4-bit (K <= 16): entry k in byte k >> 1, low nibble when k is
//                      even, high nibble when odd (the whole layer's kept weights in CSR
//                      order, so a row may start in the middle of a byte); or one byte per
//                      entry (K <= 256)
// W[r, col[k]] = table[code(k)] for k in [row_ptr[r], row_ptr[r + 1]). `table` always has
// 256 entries (the codebook padded with zeros, so no code can read outside it); the caller
// has checked every code against K before any kernel runs.
//
// Safe reads (as the masked kernels, masked_linear.h). The glue checks a structure once and
// remembers it, but an edit that bypasses the version counter (.numpy(), .data) can change
// it afterwards. So the kernels trust only nnz (the length of col, from the tensor's size)
// and cols: a row's entry range is clamped into [0, nnz], every column into [0, cols - 1]
// (as unsigned, so a negative one becomes the last), and a code that indexes something of
// num_clusters entries (the codebook gradient) into [0, num_clusters - 1]. A tampered
// structure gives wrong numbers, never an out-of-bounds read or write. cols <= 0 reads no
// entry.
//
// The transposed structure (CSR of W^T, by columns, used for the input gradient) has the
// same form with byte codes.
#pragma once
#include <cstdint>

namespace torchslim {
namespace cpu {
namespace sck {

struct Structure {
  const int32_t* row_ptr = nullptr;
  const void* col = nullptr;  // int16_t or int32_t
  bool col32 = false;
  const uint8_t* codes = nullptr;
  bool packed = false;
  int64_t rows = 0;
  int64_t cols = 0;  // range of col
  int num_clusters = 0;
  int64_t nnz = 0;  // entries of col (and of codes, two per byte when packed): the read bound
};

constexpr int64_t kBatchPad = 16;  // batched kernels: nb and the leading dimensions are multiples of this

// What is wrong with a structure, if anything (checked once per structure by the glue).
enum class Fault : int { None = 0, FirstNotZero, Decreasing, LastNotNnz, ColumnOutOfRange, CodeOutOfRange };
struct Check {
  Fault fault = Fault::None;
  int64_t where = -1;  // row (Decreasing) or entry (ColumnOutOfRange, CodeOutOfRange)
  int64_t value = 0;   // the offending value
};
// row_ptr: starts at 0, non-decreasing over rows + 1 entries, ends at nnz.
Check check_row_ptr(const Structure& s, int64_t nnz);
// Every column (in [0, cols)) and code (< num_clusters) of the entries [k0, k1); the glue
// splits the entries over threads.
Check check_entries(const Structure& s, int64_t k0, int64_t k1);

// y[r] = bias[r] + sum_k table[code(k)] * x[col[k]], rows [r0, r1) (batch 1, x contiguous).
void spmv(const Structure& s, const float* table, const float* x, const float* bias, float* y, int64_t r0,
          int64_t r1);
void spmv(const Structure& s, const double* table, const double* x, const double* bias, double* y, int64_t r0,
          int64_t r1);

// Batched, batch as the vector dimension: xt is X^T [cols][ldx] (the batch contiguous,
// zero-padded to nb, a multiple of kBatchPad); yt[r * ldy + b] = bias[r] + sum_k
// table[code(k)] * xt[col[k] * ldx + b] for b < nb, rows [r0, r1).
void spmm_t(const Structure& s, const float* table, const float* xt, int64_t ldx, int64_t nb, const float* bias,
            float* yt, int64_t ldy, int64_t r0, int64_t r1);
void spmm_t(const Structure& s, const double* table, const double* xt, int64_t ldx, int64_t nb, const double* bias,
            double* yt, int64_t ldy, int64_t r0, int64_t r1);

// Codebook gradient of rows [r0, r1): hist[c] += sum over entries k of those rows with
// code c of sum_b gt[r * ldg + b] * xt[col[k] * ldx + b] (b < nb). Each entry's dot is
// formed in T, the sums in double, in entry order: one call per fixed block of rows gives
// the same bits whatever the thread count. hist has num_clusters entries.
void grad_codebook(const Structure& s, const float* gt, int64_t ldg, const float* xt, int64_t ldx, int64_t nb,
                   int64_t r0, int64_t r1, double* hist);
void grad_codebook(const Structure& s, const double* gt, int64_t ldg, const double* xt, int64_t ldx, int64_t nb,
                   int64_t r0, int64_t r1, double* hist);

// out[c * ldo + r] = in[r * ldi + c] for r < rows, c in [c0, c1), and 0 for rows <= r <
// rows_pad (the batch padding of X^T); blocked so both sides move whole cache lines.
void transpose_pad(const float* in, int64_t ldi, int64_t rows, int64_t rows_pad, float* out, int64_t ldo, int64_t c0,
                   int64_t c1);
void transpose_pad(const double* in, int64_t ldi, int64_t rows, int64_t rows_pad, double* out, int64_t ldo,
                   int64_t c0, int64_t c1);

// The body spmv or spmm_t (batched) takes for this structure on this CPU, as
// isa * 16 + lookup * 4 + batched * 2 + fp64: isa 0 scalar, 1 AVX2, 2 AVX-512; lookup
// 0 packed nibbles (16 entries in registers), 1 bytes / 16 entries, 2 bytes / 32 entries
// (two registers), 3 bytes / table gather.
int path_code(const Structure& s, bool batched, bool fp64);

}  // namespace sck
}  // namespace cpu
}  // namespace torchslim
