// CPU kernels of the masked sparse linear op (torch-free: raw pointers, sizes, strides).
//
// A masked weight W*M of shape [rows, cols] is held as CSR by rows: row_ptr[rows + 1]
// (int32), col[nnz] (int16 when cols <= 32767, else int32) and val[nnz]. The transposed
// structure (CSR of (W*M)^T, i.e. by columns) has the same form with rows and cols swapped.
//
// Batched products work on transposed activations ("batch as the vector dimension"): the
// glue stores X^T as xt[cols][ldx] with the batch contiguous, padded with zeros to nb, a
// multiple of 16, so every kernel reads whole SIMD vectors. Each kernel handles a row range
// [r0, r1) so the glue can spread rows over threads; the SIMD body (AVX-512 / AVX2 / scalar)
// is picked at run time from torchslim::cpu::simd_level().
//
// Safe reads. The glue checks a structure once and remembers it (ops/validated.h), but an
// edit that bypasses the version counter (through .numpy() or .data, or from another
// thread during a call) can change the indices afterwards. So every kernel that reads a
// structure takes nnz (the length of col / val) and the extent of the indices, and clamps
// what it reads: a row's entry range into [0, nnz] and every index into [0, extent - 1]
// (as unsigned, so a negative index becomes the last one). A tampered structure then
// gives wrong numbers, never an out-of-bounds access; a well-formed one is unaffected
// (one min per row and per index, no measurable cost). extent <= 0 reads no entry.
#pragma once
#include <cstdint>

namespace torchslim {
namespace cpu {
namespace masked {

constexpr int64_t kBatchPad = 16;  // nb, ldx, ldy and ldg are multiples of this

// What is wrong with a CSR block, if anything.
enum class CsrFault : int { None = 0, FirstNotZero, Decreasing, ColumnOutOfRange };

struct CsrCheck {
  CsrFault fault = CsrFault::None;
  int64_t where = -1;  // row (Decreasing) or entry (ColumnOutOfRange) of the first fault
};

// Checks row_ptr[0] == 0, row_ptr non-decreasing over rows + 1 entries, and every
// col[k] (k < row_ptr[rows]) in [0, extent). The caller has checked that row_ptr[rows]
// entries of col exist. One vectorised pass over the indices.
template <typename I>
CsrCheck check_csr(const int32_t* row_ptr, int64_t rows, const I* col, int64_t extent);

// Structure building from a row-major bool mask [rows, cols].
// counts[r] = number of true entries of row r, for r in [r0, r1).
void count_rows(const bool* mask, int64_t cols, int32_t* counts, int64_t r0, int64_t r1);
// out[i] = mask[i] ? w[i] : 0 for i in [i0, i1): the masked dense weight (and its
// gradient) of the dense path. U is an unsigned integer of the element's width (the
// select copies bits, so it serves every floating dtype; all-zero bits are +0.0).
template <typename U>
void masked_copy(const U* w, const bool* mask, U* out, int64_t i0, int64_t i1);
// counts[c] = number of true entries of column c, for c in [c0, c1).
void count_cols(const bool* mask, int64_t rows, int64_t cols, int32_t* counts, int64_t c0, int64_t c1);
// Column indices of rows [r0, r1) written at row_ptr[r] (row_ptr already prefix-summed).
template <typename I>
void fill_rows(const bool* mask, int64_t cols, const int32_t* row_ptr, I* col, int64_t r0, int64_t r1);
// Transposed structure: row indices of the true entries of columns [c0, c1), in increasing
// row order, written at col_ptr[c].
template <typename I>
void fill_cols(const bool* mask, int64_t rows, int64_t cols, const int32_t* col_ptr, I* row, int64_t c0, int64_t c1);

// perm[j] = position in the row structure of the j-th entry of the column structure, so
// that values_t[j] = values[perm[j]]. col_ptr: the column structure's pointers; nnz: the
// length of col and perm. Every write is bounds-checked against snapshots of the pointers:
// returns false (perm incomplete) if the structures disagree (a column holds more entries
// than col_ptr gives it, an index or pointer is out of range); the glue checks them first
// for a precise error, this keeps a concurrent edit from writing out of bounds.
template <typename I>
bool transpose_perm(const int32_t* row_ptr, const I* col, int64_t rows, const int32_t* col_ptr, int64_t cols,
                    int64_t nnz, int32_t* perm);

// val[k] = w[r * stride_r + col[k] * stride_c] for the entries of rows [r0, r1).
// (stride_r, stride_c) = (ld, 1) gathers W by rows; (1, ld) gathers W^T from the
// transposed structure. extent: the range of col (see "Safe reads").
template <typename T, typename I>
void gather(const T* w, int64_t stride_r, int64_t stride_c, const int32_t* row_ptr, const I* col, int64_t nnz,
            int64_t extent, T* val, int64_t r0, int64_t r1);

// y[r] = (bias ? bias[r] : 0) + sum_k val[k] * x[col[k]]   (batch 1; x contiguous [extent])
template <typename T, typename I>
void spmv(const T* x, const int32_t* row_ptr, const I* col, const T* val, int64_t nnz, int64_t extent,
          const T* bias, T* y, int64_t r0, int64_t r1);

// yt[r * ldy + b] = (bias ? bias[r] : 0) + sum_k val[k] * xt[col[k] * ldx + b], b < nb;
// xt has extent rows.
template <typename T, typename I>
void spmm_t(const T* xt, int64_t ldx, int64_t nb, const int32_t* row_ptr, const I* col, const T* val, int64_t nnz,
            int64_t extent, const T* bias, T* yt, int64_t ldy, int64_t r0, int64_t r1);

// Sampled dense-dense product into a dense-shaped gradient: for every row r in [r0, r1)
// dw[r * ldw + c] = 0 for c < ncols, then dw[r * ldw + col[k]] = sum_b gt[r * ldg + b] * xt[col[k] * ldx + b].
// ncols is the extent of col (and the rows of xt).
template <typename T, typename I>
void sddmm_t(const T* gt, int64_t ldg, const T* xt, int64_t ldx, int64_t nb, const int32_t* row_ptr,
             const I* col, int64_t nnz, T* dw, int64_t ldw, int64_t ncols, int64_t r0, int64_t r1);

// out[c * ldo + r] = in[r * ldi + c] for r < rows, c < cols (blocked transpose), and
// out[c * ldo + r] = 0 for rows <= r < rows_pad (zero padding of the batch).
// Dense semantics for non-finite inputs: a dense product propagates a NaN in x[b, j] to
// every output of row b, and an inf in x[b, j] to NaN wherever the weight (r, j) is a
// structural zero (0 * inf). After a sparse product y[b, r] (row stride ldy) over rows
// [b0, b1) of x [B, K] (row stride ldx), this sets those outputs to NaN. Returns whether any
// non-finite input was seen. Rows of the structure: N; entries: nnz.
template <typename T, typename I>
bool nonfinite_fixup(const T* x, int64_t ldx, int64_t K, const int32_t* row_ptr, const I* col, int64_t nnz,
                     int64_t N, T* y, int64_t ldy, int64_t b0, int64_t b1);

// Columns [c0, c1) are done by this call (threads split the columns).
template <typename T>
void transpose_pad(const T* in, int64_t ldi, int64_t rows, int64_t rows_pad, int64_t cols, T* out, int64_t ldo,
                   int64_t c0, int64_t c1);

}  // namespace masked
}  // namespace cpu
}  // namespace torchslim
