// CUDA launchers of sparse_codebook_linear (torch-free: raw pointers, sizes, a stream).
// Each returns the launch status (cudaGetLastError after the launches); the glue checks it.
// Layout: kernels/cpu/sparse_codebook_linear.h (CSR by rows, a codebook index per kept
// weight, packed 4-bit or one byte each), here in device memory.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace torchslim {
namespace cuda {

enum class SckDType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

struct SckStructure {
  const int32_t* row_ptr = nullptr;  // [rows + 1]
  const void* col = nullptr;         // int16_t or int32_t [nnz]
  bool col32 = false;
  const uint8_t* codes = nullptr;    // packed 4-bit or one byte per entry
  bool packed = false;
  int64_t rows = 0;
  int64_t cols = 0;                  // in_features (row length of x)
  int64_t nnz = 0;                   // kept weights (row_ptr[rows])
};

// y[b, r] = bias[r] + sum_k codebook[code(k)] * x[b, col[k]]: one warp per row, a tile of
// batch rows per warp, the codebook (K <= 256 entries) in shared memory, fp32 (fp64 for
// double) accumulation. x [batch, cols], y [batch, rows] contiguous, of dtype dt (as are
// codebook and bias; bias may be null).
cudaError_t sck_spmm(const SckStructure& s, const void* codebook, int num_clusters, const void* x, int64_t batch,
                     const void* bias, void* y, SckDType dt, cudaStream_t stream);

// Blocks of the deterministic binning (rows of `partial`).
int64_t sck_grad_partial_blocks(int64_t nnz);

// hist[c] = sum over entries k with code c of sum_b dy[b, row(k)] * x[b, col[k]].
// dy [batch, rows], x [batch, cols] of dtype dt; dw [nnz], partial [blocks, K] and hist [K]
// in the accumulation type (double for F64, float otherwise). Deterministic: the per-entry
// values are binned per block of entries in entry order, the blocks summed in order.
cudaError_t sck_grad_codebook(const SckStructure& s, int num_clusters, const void* dy, const void* x, int64_t batch,
                              SckDType dt, void* dw, void* partial, void* hist, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchslim
