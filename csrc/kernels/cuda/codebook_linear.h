// CUDA launchers of codebook_linear (torch-free: raw pointers, sizes, a stream). Each
// returns the launch status (cudaGetLastError after the launch); the glue checks it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/codebook_indices.h"

namespace torchslim {
namespace cuda {

enum class CbDType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// The CPU side's index view (kernels/codebook_indices.h), pointing at device memory.
using CbIndices = torchslim::CodebookIndices;

// *max_index = largest index in use (device int, zero-initialised by the caller).
cudaError_t codebook_max_index(const CbIndices& w, int* max_index, cudaStream_t stream);

// Small-batch forward, batch <= 8: y[b, o] = sum_j x[b, j] * codebook[idx(o, j)] + bias[o];
// one warp per output row, the codebook in shared memory. x [batch, in], y [batch, out]
// contiguous; bias may be null; every pointer of the dtype `dt`.
cudaError_t codebook_gemv(const CbIndices& w, const void* codebook, const void* x, int64_t batch,
                          const void* bias, void* y, CbDType dt, cudaStream_t stream);

// Decode rows [o0, o1) of W into dst (row o at dst + (o - o0) * ld_dst elements), dtype dt.
cudaError_t codebook_decode(const CbIndices& w, const void* codebook, void* dst, int64_t ld_dst, int64_t o0,
                            int64_t o1, CbDType dt, cudaStream_t stream);

// Number of row blocks the codebook-gradient kernel uses (size of the deterministic
// partial buffer: blocks x num_clusters accumulators).
int64_t codebook_grad_partial_blocks(const CbIndices& w);

// Codebook gradient hist[k] = sum of dW[o, j] over (o, j) with index k.
// dW comes from dw (ld_dw) when dw is non-null, else is formed on the fly as
// sum_b dy[b, o] * x[b, j] (small batch; dy [batch, out], x [batch, in]).
// hist: num_clusters accumulators (double for F64, float otherwise), zeroed by the caller.
// Per-block shared-memory histograms; partial == null: blocks add into hist with atomics;
// partial non-null (blocks x num_clusters accumulators): deterministic, each block writes
// its bins (summed in a fixed order) and a second kernel adds the blocks in order.
cudaError_t codebook_grad_codebook(const CbIndices& w, const void* dw, int64_t ld_dw, const void* dy,
                                   const void* x, int64_t batch, CbDType dt, void* hist, void* partial,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace torchslim
