// CUDA kernels of sparse_codebook_linear (torch-free; launched on the stream the caller passes).
//
//  - spmm: one warp per output row; lanes stride over the row's kept weights (coalesced reads
//    of columns and codes), look the code up in the shared-memory codebook and accumulate
//    up to NB batch rows at once; shuffle reduction, lane 0 writes. Batch tiles over grid.y.
//  - codebook gradient, deterministic: (1) per kept weight dw[k] = sum_b dy[b, r] x[b, col[k]]
//    (one warp per row); (2) per block of kChunk entries, thread c sums the dw of the entries
//    with code c in entry order (codes and dw staged in shared memory, read as broadcasts);
//    (3) thread c adds the blocks' partials in block order.
#include "kernels/cuda/sparse_codebook_linear.h"
#include "kernels/cuda/accumulate.cuh"

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace torchslim {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = 2048;  // entries per binning block

__device__ __forceinline__ int code_at(const uint8_t* codes, bool packed, int64_t k) {
  return packed ? (codes[k >> 1] >> ((k & 1) * 4)) & 0x0F : codes[k];
}

// Safe reads (as the masked kernels): the structure was checked once, but an edit that
// bypasses the version counter can change it later. A row's entry range is clamped into
// [0, nnz] and every column into [0, cols - 1] (as unsigned: a negative one becomes the
// last); codes index a 256-entry table. A tampered structure gives wrong numbers, never an
// out-of-bounds access.
__device__ __forceinline__ void row_range(const SckStructure& s, int64_t r, int64_t& k0, int64_t& k1) {
  const int64_t a = s.row_ptr[r], b = s.row_ptr[r + 1];
  k0 = a < 0 ? 0 : (a > s.nnz ? s.nnz : a);
  k1 = b < k0 ? k0 : (b > s.nnz ? s.nnz : b);
}
template <typename I>
__device__ __forceinline__ int64_t col_at(const SckStructure& s, I c) {
  const uint64_t u = static_cast<std::make_unsigned_t<I>>(c);
  const uint64_t last = static_cast<uint64_t>(s.cols - 1);
  return static_cast<int64_t>(u < last ? u : last);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename I, int NB>
__global__ void spmm_kernel(SckStructure s, const T* __restrict__ cb, int K, const T* __restrict__ x, int64_t batch,
                            const T* __restrict__ bias, T* __restrict__ y) {
  using A = typename Acc<T>::type;
  __shared__ A table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = i < K ? to_acc(cb[i]) : A(0);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= s.rows) return;
  const I* col = static_cast<const I*>(s.col);
  int64_t k0, k1;
  row_range(s, r, k0, k1);
  if (s.cols <= 0) k1 = k0;  // no column to read
  for (int64_t b0 = static_cast<int64_t>(blockIdx.y) * NB; b0 < batch; b0 += static_cast<int64_t>(gridDim.y) * NB) {
    const int nb = batch - b0 < NB ? static_cast<int>(batch - b0) : NB;
    A acc[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[b] = A(0);
    for (int64_t k = k0 + lane; k < k1; k += 32) {
      const A w = table[code_at(s.codes, s.packed, k)];
      const int64_t j = col_at(s, col[k]);
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b < nb) acc[b] += w * to_acc(x[(b0 + b) * s.cols + j]);
    }
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const A v = warp_sum(acc[b]);
      if (lane == 0 && b < nb) y[(b0 + b) * s.rows + r] = from_acc<T>(v + (bias ? to_acc(bias[r]) : A(0)));
    }
  }
}

template <typename T, typename I>
__global__ void entry_grad_kernel(SckStructure s, const T* __restrict__ dy, const T* __restrict__ x, int64_t batch,
                                  typename Acc<T>::type* __restrict__ dw) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= s.rows) return;
  const I* col = static_cast<const I*>(s.col);
  int64_t k0, k1;
  row_range(s, r, k0, k1);
  if (s.cols <= 0) return;  // no kept weight can exist
  for (int64_t k = k0 + lane; k < k1; k += 32) {
    const int64_t j = col_at(s, col[k]);
    A d = A(0);
    for (int64_t b = 0; b < batch; ++b) d += to_acc(dy[b * s.rows + r]) * to_acc(x[b * s.cols + j]);
    dw[k] = d;
  }
}

template <typename A>
__global__ void bin_kernel(const uint8_t* __restrict__ codes, bool packed, const A* __restrict__ dw, int64_t nnz,
                           int K, A* __restrict__ partial) {
  __shared__ A v[kChunk];
  __shared__ unsigned char c[kChunk];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int n = nnz - base < kChunk ? static_cast<int>(nnz - base) : kChunk;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    v[i] = dw[base + i];
    c[i] = static_cast<unsigned char>(code_at(codes, packed, base + i));
  }
  __syncthreads();
  for (int code = threadIdx.x; code < K; code += blockDim.x) {
    A sum = A(0);
    for (int i = 0; i < n; ++i)
      if (c[i] == code) sum += v[i];
    partial[static_cast<int64_t>(blockIdx.x) * K + code] = sum;
  }
}

template <typename A>
__global__ void sum_blocks_kernel(const A* __restrict__ partial, int64_t blocks, int K, A* __restrict__ hist) {
  const int code = blockIdx.x * blockDim.x + threadIdx.x;
  if (code >= K) return;
  A sum = A(0);
  for (int64_t b = 0; b < blocks; ++b) sum += partial[b * K + code];
  hist[code] = sum;
}

dim3 row_grid(int64_t rows, int64_t batch_tiles) {
  const int64_t gx = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t gy = batch_tiles < 65535 ? batch_tiles : 65535;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy > 0 ? gy : 1));
}

template <typename T, typename I>
cudaError_t launch_spmm(const SckStructure& s, const void* codebook, int K, const void* x, int64_t batch,
                        const void* bias, void* y, cudaStream_t stream) {
  const T* cb = static_cast<const T*>(codebook);
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  if (batch <= 1) {
    spmm_kernel<T, I, 1><<<row_grid(s.rows, batch), 32 * kWarpsPerBlock, 0, stream>>>(s, cb, K, xp, batch, bp, yp);
  } else if (batch <= 4) {
    spmm_kernel<T, I, 4><<<row_grid(s.rows, 1), 32 * kWarpsPerBlock, 0, stream>>>(s, cb, K, xp, batch, bp, yp);
  } else {
    spmm_kernel<T, I, 8><<<row_grid(s.rows, (batch + 7) / 8), 32 * kWarpsPerBlock, 0, stream>>>(s, cb, K, xp, batch,
                                                                                                   bp, yp);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t spmm_typed(const SckStructure& s, const void* codebook, int K, const void* x, int64_t batch,
                       const void* bias, void* y, cudaStream_t stream) {
  if (s.col32) return launch_spmm<T, int32_t>(s, codebook, K, x, batch, bias, y, stream);
  return launch_spmm<T, int16_t>(s, codebook, K, x, batch, bias, y, stream);
}

template <typename A>
cudaError_t bin_typed(const SckStructure& s, int K, int64_t nnz, void* dw, void* partial, void* hist,
                      cudaStream_t stream) {
  const int64_t blocks = (nnz + kChunk - 1) / kChunk;
  bin_kernel<A><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(s.codes, s.packed, static_cast<const A*>(dw), nnz,
                                                                    K, static_cast<A*>(partial));
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  sum_blocks_kernel<A><<<1, 256, 0, stream>>>(static_cast<const A*>(partial), blocks, K, static_cast<A*>(hist));
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_typed(const SckStructure& s, int K, const void* dy, const void* x, int64_t batch, void* dw,
                       void* partial, void* hist, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 g = row_grid(s.rows, 1);
  if (s.col32)
    entry_grad_kernel<T, int32_t><<<g, 32 * kWarpsPerBlock, 0, stream>>>(s, static_cast<const T*>(dy),
                                                                         static_cast<const T*>(x), batch,
                                                                         static_cast<A*>(dw));
  else
    entry_grad_kernel<T, int16_t><<<g, 32 * kWarpsPerBlock, 0, stream>>>(s, static_cast<const T*>(dy),
                                                                         static_cast<const T*>(x), batch,
                                                                         static_cast<A*>(dw));
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return bin_typed<A>(s, K, s.nnz, dw, partial, hist, stream);
}

}  // namespace

cudaError_t sck_spmm(const SckStructure& s, const void* codebook, int num_clusters, const void* x, int64_t batch,
                     const void* bias, void* y, SckDType dt, cudaStream_t stream) {
  if (s.rows == 0 || batch == 0) return cudaSuccess;
  switch (dt) {
    case SckDType::F32: return spmm_typed<float>(s, codebook, num_clusters, x, batch, bias, y, stream);
    case SckDType::F64: return spmm_typed<double>(s, codebook, num_clusters, x, batch, bias, y, stream);
    case SckDType::F16: return spmm_typed<__half>(s, codebook, num_clusters, x, batch, bias, y, stream);
    case SckDType::BF16: return spmm_typed<__nv_bfloat16>(s, codebook, num_clusters, x, batch, bias, y, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t sck_grad_partial_blocks(int64_t nnz) { return (nnz + kChunk - 1) / kChunk; }

cudaError_t sck_grad_codebook(const SckStructure& s, int num_clusters, const void* dy, const void* x, int64_t batch,
                              SckDType dt, void* dw, void* partial, void* hist, cudaStream_t stream) {
  cudaError_t e = cudaErrorInvalidValue;
  switch (dt) {
    case SckDType::F32: e = grad_typed<float>(s, num_clusters, dy, x, batch, dw, partial, hist, stream); break;
    case SckDType::F64: e = grad_typed<double>(s, num_clusters, dy, x, batch, dw, partial, hist, stream); break;
    case SckDType::F16: e = grad_typed<__half>(s, num_clusters, dy, x, batch, dw, partial, hist, stream); break;
    case SckDType::BF16: e = grad_typed<__nv_bfloat16>(s, num_clusters, dy, x, batch, dw, partial, hist, stream); break;
  }
  return e;
}

}  // namespace cuda
}  // namespace torchslim
