// CUDA kernels of codebook_linear (torch-free; launched on the stream the caller passes).
//
//  - max-index scan (the glue calls it before any lookup when the layout can hold an index >= K);
//  - GEMV for batch <= 8: one warp per output row, the codebook (padded to 256 entries) in
//    shared memory, indices read as 32-bit words (8 packed / 4 uint8 weights) when the rows
//    are 4-byte aligned, fp32 (fp64 for double) accumulation, shuffle reduction;
//  - decode of W rows into the input dtype (the glue then runs cuBLAS on the decoded W:
//    the large-batch path, tensor cores for fp16/bf16);
//  - codebook gradient: each block bins its rows of dW (read from a buffer, or formed on
//    the fly as sum_b dy[b,o] x[b,j] for small batches) into per-warp shared-memory
//    histograms, then adds them into the K global bins with atomics; the deterministic
//    variant stages (index, dW) tiles in shared memory, thread k sums bin k over the tile
//    in a fixed order, writes its block's partial, and a second kernel adds the blocks in
//    order.
#include "kernels/cuda/codebook_linear.h"
#include "kernels/cuda/accumulate.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace torchslim {
namespace cuda {
namespace {

__device__ __forceinline__ int index_at(const CbIndices& w, const uint8_t* row, int64_t j) {
  if (w.packed) return (row[j >> 1] >> ((j & 1) * 4)) & 0x0F;
  return row[j];
}

// ------------------------------------------------------------------ index scan
__global__ void max_index_kernel(CbIndices w, int* result) {
  int m = 0;
  const int64_t cols = w.packed ? w.in / 2 : w.in;  // full bytes of a row
  const int64_t total = w.out * cols;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = t / cols, c = t - o * cols;
    const uint8_t v = w.idx[o * w.ld + c];
    m = max(m, w.packed ? max(v & 0x0F, v >> 4) : (int)v);
  }
  if (w.packed && (w.in & 1)) {  // the last (half-used) byte of each row
    for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < w.out; o += (int64_t)gridDim.x * blockDim.x)
      m = max(m, w.idx[o * w.ld + w.in / 2] & 0x0F);
  }
  for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31) == 0 && m > 0) atomicMax(result, m);
}

// ------------------------------------------------------------------ GEMV
template <typename A, int NB, typename T>
__device__ __forceinline__ void fma_batch(A (&acc)[NB], A wv, const T* x, int64_t in, int64_t j) {
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] += wv * to_acc(x[b * in + j]);
}

template <typename T, int NB>
__global__ void gemv_kernel(CbIndices w, const T* __restrict__ cb, const T* __restrict__ x,
                            const T* __restrict__ bias, T* __restrict__ y, bool words) {
  using A = typename Acc<T>::type;
  __shared__ A table[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) table[k] = k < w.num_clusters ? to_acc(cb[k]) : A(0);
  __syncthreads();
  const int warps = blockDim.x / 32, lane = threadIdx.x & 31;
  const int64_t o = (int64_t)blockIdx.x * warps + threadIdx.x / 32;
  if (o >= w.out) return;
  const uint8_t* row = w.idx + o * w.ld;
  A acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = A(0);
  const int64_t full_bytes = w.packed ? w.in / 2 : w.in;
  int64_t done = 0;  // bytes handled by the word loop
  if (words) {
    const int64_t nwords = full_bytes / 4;
    const uint32_t* rw = reinterpret_cast<const uint32_t*>(row);
    for (int64_t q = lane; q < nwords; q += 32) {
      const uint32_t v = __ldg(rw + q);
      if (w.packed) {
        const int64_t j0 = q * 8;
#pragma unroll
        for (int t = 0; t < 8; ++t) fma_batch<A, NB>(acc, table[(v >> (4 * t)) & 0x0F], x, w.in, j0 + t);
      } else {
        const int64_t j0 = q * 4;
#pragma unroll
        for (int t = 0; t < 4; ++t) fma_batch<A, NB>(acc, table[(v >> (8 * t)) & 0xFF], x, w.in, j0 + t);
      }
    }
    done = nwords * 4;
  }
  for (int64_t c = done + lane; c < full_bytes; c += 32) {
    const uint8_t v = row[c];
    if (w.packed) {
      fma_batch<A, NB>(acc, table[v & 0x0F], x, w.in, 2 * c);
      fma_batch<A, NB>(acc, table[v >> 4], x, w.in, 2 * c + 1);
    } else {
      fma_batch<A, NB>(acc, table[v], x, w.in, c);
    }
  }
  if (w.packed && (w.in & 1) && lane == 0) fma_batch<A, NB>(acc, table[row[w.in / 2] & 0x0F], x, w.in, w.in - 1);
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    A v = acc[b];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) y[b * w.out + o] = from_acc<T>(v + (bias ? to_acc(bias[o]) : A(0)));
  }
}

template <typename T>
cudaError_t launch_gemv(const CbIndices& w, const void* cb, const void* x, int64_t batch, const void* bias, void* y,
                        cudaStream_t stream) {
  const int threads = 256, warps = threads / 32;
  const unsigned blocks = static_cast<unsigned>((w.out + warps - 1) / warps);
  const bool words = (w.ld % 4 == 0) && (reinterpret_cast<uintptr_t>(w.idx) % 4 == 0);
  const T* c = static_cast<const T*>(cb);
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  for (int64_t b0 = 0; b0 < batch; b0 += 8) {
    const int nb = static_cast<int>(batch - b0 < 8 ? batch - b0 : 8);
    const T* xb = xp + b0 * w.in;
    T* yb = yp + b0 * w.out;
    switch (nb) {
      case 1: gemv_kernel<T, 1><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
      case 2: gemv_kernel<T, 2><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
      case 3: gemv_kernel<T, 3><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
      case 4: gemv_kernel<T, 4><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
      case 5: gemv_kernel<T, 5><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
      case 6: gemv_kernel<T, 6><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
      case 7: gemv_kernel<T, 7><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
      default: gemv_kernel<T, 8><<<blocks, threads, 0, stream>>>(w, c, xb, bp, yb, words); break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------ decode
template <typename T>
__global__ void decode_kernel(CbIndices w, const T* __restrict__ cb, T* __restrict__ dst, int64_t ld_dst, int64_t o0,
                              int64_t o1) {
  __shared__ T table[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) table[k] = k < w.num_clusters ? cb[k] : cb[0];
  __syncthreads();
  const int64_t total = (o1 - o0) * w.in;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / w.in, j = t - r * w.in;
    dst[r * ld_dst + j] = table[index_at(w, w.idx + (o0 + r) * w.ld, j)];
  }
}

// ------------------------------------------------------------------ codebook gradient
constexpr int kGradThreads = 256;
constexpr int kGradWarps = kGradThreads / 32;
constexpr int64_t kGradElemsPerBlock = 16384;

int64_t rows_per_block(const CbIndices& w) {
  const int64_t r = kGradElemsPerBlock / (w.in > 0 ? w.in : 1);
  return r > 0 ? r : 1;
}

template <typename T, typename A>
__device__ __forceinline__ A dw_at(const T* dw, int64_t ld_dw, const T* dy, const T* x, int64_t batch, int64_t out,
                                   int64_t in, int64_t o, int64_t j) {
  if (dw) return to_acc(dw[o * ld_dw + j]);
  A s = A(0);
  for (int64_t b = 0; b < batch; ++b) s += to_acc(dy[b * out + o]) * to_acc(x[b * in + j]);
  return s;
}

// Fast variant: per-warp shared bins, shared atomics, then global atomics.
template <typename T>
__global__ void grad_codebook_atomic_kernel(CbIndices w, const T* __restrict__ dw, int64_t ld_dw,
                                            const T* __restrict__ dy, const T* __restrict__ x, int64_t batch,
                                            typename Acc<T>::type* __restrict__ hist, int64_t rpb) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* bins = reinterpret_cast<A*>(smem_raw);  // kGradWarps x K
  const int K = w.num_clusters;
  for (int k = threadIdx.x; k < kGradWarps * K; k += blockDim.x) bins[k] = A(0);
  __syncthreads();
  A* my = bins + (threadIdx.x / 32) * K;
  const int64_t o0 = blockIdx.x * rpb;
  const int64_t o1 = o0 + rpb < w.out ? o0 + rpb : w.out;
  const int64_t total = (o1 - o0) * w.in;
  for (int64_t t = threadIdx.x; t < total; t += blockDim.x) {
    const int64_t o = o0 + t / w.in, j = t % w.in;
    const A v = dw_at<T, A>(dw, ld_dw, dy, x, batch, w.out, w.in, o, j);
    atomicAdd(my + index_at(w, w.idx + o * w.ld, j), v);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    A s = A(0);
    for (int q = 0; q < kGradWarps; ++q) s += bins[q * K + k];
    atomicAdd(hist + k, s);
  }
}

// Deterministic variant: tiles of (index, dW) in shared memory; thread k owns bin k and
// walks each tile in order; the block writes its K partial sums.
constexpr int kDetTile = 1024;
template <typename T>
__global__ void grad_codebook_det_kernel(CbIndices w, const T* __restrict__ dw, int64_t ld_dw,
                                         const T* __restrict__ dy, const T* __restrict__ x, int64_t batch,
                                         typename Acc<T>::type* __restrict__ partial, int64_t rpb) {
  using A = typename Acc<T>::type;
  __shared__ A vals[kDetTile];
  __shared__ uint8_t keys[kDetTile];
  const int K = w.num_clusters;
  const int64_t o0 = blockIdx.x * rpb;
  const int64_t o1 = o0 + rpb < w.out ? o0 + rpb : w.out;
  const int64_t total = (o1 - o0) * w.in;
  A acc = A(0);  // bin threadIdx.x
  for (int64_t base = 0; base < total; base += kDetTile) {
    const int n = static_cast<int>(total - base < kDetTile ? total - base : kDetTile);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int64_t t = base + i;
      const int64_t o = o0 + t / w.in, j = t % w.in;
      vals[i] = dw_at<T, A>(dw, ld_dw, dy, x, batch, w.out, w.in, o, j);
      keys[i] = static_cast<uint8_t>(index_at(w, w.idx + o * w.ld, j));
    }
    __syncthreads();
    if (threadIdx.x < K) {
      for (int i = 0; i < n; ++i)
        if (keys[i] == threadIdx.x) acc += vals[i];
    }
  }
  if (threadIdx.x < K) partial[blockIdx.x * (int64_t)K + threadIdx.x] = acc;
}

template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ partial, int64_t blocks, int K, A* __restrict__ hist) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  A s = A(0);
  for (int64_t b = 0; b < blocks; ++b) s += partial[b * K + k];
  hist[k] += s;
}

template <typename T>
cudaError_t launch_grad_codebook(const CbIndices& w, const void* dw, int64_t ld_dw, const void* dy, const void* x,
                                 int64_t batch, void* hist, void* partial, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t rpb = rows_per_block(w);
  const int64_t blocks = (w.out + rpb - 1) / rpb;
  if (blocks == 0) return cudaSuccess;
  const T* dwp = static_cast<const T*>(dw);
  const T* dyp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  A* h = static_cast<A*>(hist);
  if (partial == nullptr) {
    const size_t smem = sizeof(A) * kGradWarps * w.num_clusters;
    grad_codebook_atomic_kernel<T><<<static_cast<unsigned>(blocks), kGradThreads, smem, stream>>>(
        w, dwp, ld_dw, dyp, xp, batch, h, rpb);
    return cudaGetLastError();
  }
  A* p = static_cast<A*>(partial);
  grad_codebook_det_kernel<T><<<static_cast<unsigned>(blocks), kGradThreads, 0, stream>>>(w, dwp, ld_dw, dyp, xp,
                                                                                        batch, p, rpb);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sum_partials_kernel<A><<<1, 256, 0, stream>>>(p, blocks, w.num_clusters, h);
  return cudaGetLastError();
}

}  // namespace

cudaError_t codebook_max_index(const CbIndices& w, int* max_index, cudaStream_t stream) {
  const int64_t bytes = w.out * (w.packed ? (w.in + 1) / 2 : w.in);
  int64_t blocks = (bytes + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  if (blocks < 1) blocks = 1;
  max_index_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(w, max_index);
  return cudaGetLastError();
}

cudaError_t codebook_gemv(const CbIndices& w, const void* codebook, const void* x, int64_t batch, const void* bias,
                          void* y, CbDType dt, cudaStream_t stream) {
  if (w.out == 0 || batch == 0) return cudaSuccess;
  switch (dt) {
    case CbDType::F32: return launch_gemv<float>(w, codebook, x, batch, bias, y, stream);
    case CbDType::F64: return launch_gemv<double>(w, codebook, x, batch, bias, y, stream);
    case CbDType::F16: return launch_gemv<__half>(w, codebook, x, batch, bias, y, stream);
    case CbDType::BF16: return launch_gemv<__nv_bfloat16>(w, codebook, x, batch, bias, y, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t codebook_decode(const CbIndices& w, const void* codebook, void* dst, int64_t ld_dst, int64_t o0,
                            int64_t o1, CbDType dt, cudaStream_t stream) {
  const int64_t total = (o1 - o0) * w.in;
  if (total <= 0) return cudaSuccess;
  int64_t blocks = (total + 255) / 256;
  if (blocks > 65535) blocks = 65535;
  const unsigned g = static_cast<unsigned>(blocks);
  switch (dt) {
    case CbDType::F32:
      decode_kernel<float><<<g, 256, 0, stream>>>(w, static_cast<const float*>(codebook), static_cast<float*>(dst),
                                                  ld_dst, o0, o1);
      break;
    case CbDType::F64:
      decode_kernel<double><<<g, 256, 0, stream>>>(w, static_cast<const double*>(codebook),
                                                   static_cast<double*>(dst), ld_dst, o0, o1);
      break;
    case CbDType::F16:
      decode_kernel<__half><<<g, 256, 0, stream>>>(w, static_cast<const __half*>(codebook),
                                                   static_cast<__half*>(dst), ld_dst, o0, o1);
      break;
    case CbDType::BF16:
      decode_kernel<__nv_bfloat16><<<g, 256, 0, stream>>>(w, static_cast<const __nv_bfloat16*>(codebook),
                                                          static_cast<__nv_bfloat16*>(dst), ld_dst, o0, o1);
      break;
  }
  return cudaGetLastError();
}

int64_t codebook_grad_partial_blocks(const CbIndices& w) {
  const int64_t rpb = rows_per_block(w);
  const int64_t blocks = (w.out + rpb - 1) / rpb;
  return blocks > 0 ? blocks : 1;
}

cudaError_t codebook_grad_codebook(const CbIndices& w, const void* dw, int64_t ld_dw, const void* dy, const void* x,
                                   int64_t batch, CbDType dt, void* hist, void* partial, cudaStream_t stream) {
  if (w.out == 0 || w.in == 0) return cudaSuccess;
  switch (dt) {
    case CbDType::F32: return launch_grad_codebook<float>(w, dw, ld_dw, dy, x, batch, hist, partial, stream);
    case CbDType::F64: return launch_grad_codebook<double>(w, dw, ld_dw, dy, x, batch, hist, partial, stream);
    case CbDType::F16: return launch_grad_codebook<__half>(w, dw, ld_dw, dy, x, batch, hist, partial, stream);
    case CbDType::BF16:
      return launch_grad_codebook<__nv_bfloat16>(w, dw, ld_dw, dy, x, batch, hist, partial, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace torchslim
