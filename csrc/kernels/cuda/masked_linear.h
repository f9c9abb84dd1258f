// CUDA launchers of the masked sparse linear op (torch-free; compiled by nvcc, called from
// csrc/ops/masked_linear.cpp under TORCHSLIM_WITH_CUDA). All pointers are device pointers,
// all arrays contiguous; every launch goes to `stream` (a cudaStream_t passed as void*, so
// that callers need no CUDA header) and is checked (a failed launch
// throws std::runtime_error).
//
// Structure: CSR by rows, row_ptr int32 [rows + 1], col_idx int16 (idx16) or int32 [nnz].
// values are float32 for float32/float16/bfloat16 data and float64 for float64 data, and
// every kernel accumulates in that type. Activations are passed transposed (batch
// contiguous, as the CPU kernels take them) so that threads of a warp read consecutive
// batch entries of one input feature.
//
// Safe reads, as on the CPU (kernels/cpu/masked_linear.h): every kernel clamps a row's
// entry range into [0, nnz] and every index into [0, extent - 1] (as unsigned), so an
// index edited behind the glue's once-per-structure check gives wrong numbers, never an
// out-of-bounds access.
#pragma once
#include <cstdint>

namespace torchslim {
namespace cuda {
namespace masked {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// yt [N, B] = (S xt) + bias, xt [K, B]: yt[r, b] = bias[r] + sum_k values[k] * xt[col[k], b].
// bias nullable, in the data dtype. B == 1 uses one warp per row. nnz: length of col_idx
// and values; K: the extent of col_idx.
void spmm_t(DType dtype, const void* xt, int64_t B, const void* values, const int32_t* row_ptr, const void* col_idx,
            bool idx16, int64_t nnz, int64_t K, const void* bias, void* yt, int64_t N, void* stream);

// dw [N, K] (zero-initialised by the caller, data dtype): at the entries (r, c) of S,
// dw[r, c] = sum_b gt[r, b] * xt[c, b].   gt [N, B], xt [K, B]; nnz: length of col_idx.
void sddmm_t(DType dtype, const void* gt, const void* xt, int64_t B, int64_t N, int64_t K, const int32_t* row_ptr,
             const void* col_idx, bool idx16, int64_t nnz, void* dw, void* stream);

}  // namespace masked
}  // namespace cuda
}  // namespace torchslim
