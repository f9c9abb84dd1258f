// CUDA launchers of the masked sparse linear op (torch-free; compiled by nvcc, called from
// csrc/ops/masked_linear.cpp under TORCHSLIM_WITH_CUDA). All pointers are device pointers,
// all tensors contiguous; every launch goes to `stream` and is checked.
//
// Structure: CSR by rows, row_ptr int32 [rows + 1], col_idx int16 (idx16) or int32 [nnz].
// values are float32 for float32/float16/bfloat16 data and float64 for float64 data, and
// every kernel accumulates in that type.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace torchslim {
namespace cuda {
namespace masked {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// y [B, N] = x [B, K] @ S^T + bias   (S: [N, K] CSR; bias nullable, dtype of x)
void spmm(DType dtype, const void* x, int64_t B, int64_t K, const void* values, const int32_t* row_ptr,
          const void* col_idx, bool idx16, const void* bias, void* y, int64_t N, cudaStream_t stream);

// dw [N, K] (zero-initialised by the caller): dw[r, c] = sum_b g[b, r] * x[b, c] at the
// entries (r, c) of S.   g [B, N], x [B, K], dw in the dtype of x.
void sddmm(DType dtype, const void* g, const void* x, int64_t B, int64_t K, int64_t N, const int32_t* row_ptr,
           const void* col_idx, bool idx16, void* dw, cudaStream_t stream);

}  // namespace masked
}  // namespace cuda
}  // namespace torchslim
