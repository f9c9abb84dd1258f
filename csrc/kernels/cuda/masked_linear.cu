// CUDA kernels of the masked sparse linear op: CSR SpMM (forward and input gradient) and
// SDDMM (weight gradient at the kept positions). Torch-free; see masked_linear.h.
#include "kernels/cuda/masked_linear.h"
#include "kernels/cuda/accumulate.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace torchslim {
namespace cuda {
namespace masked {
namespace {

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

constexpr int kWarpsPerBlock = 8;

// Batch 1: one warp per row, lanes stride over the row's entries.
template <typename T, typename I>
__global__ void spmv_warp_kernel(const T* __restrict__ x, const typename Acc<T>::type* __restrict__ val,
                                 const int32_t* __restrict__ row_ptr, const I* __restrict__ col,
                                 const T* __restrict__ bias, T* __restrict__ y, int64_t N) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= N) return;
  A acc = 0;
  for (int32_t k = row_ptr[r] + lane; k < row_ptr[r + 1]; k += 32) acc += val[k] * to_acc(x[col[k]]);
  acc = warp_sum(acc);
  if (lane == 0) y[r] = from_acc<T>(acc + (bias ? to_acc(bias[r]) : A(0)));
}

// Batched: block (row r, batch tile); each thread owns one batch entry b and walks the row,
// reading xt[col[k], b] (consecutive threads, consecutive addresses). Entries of the row are
// staged through shared memory in tiles.
constexpr int kSpmmThreads = 128;
constexpr int kTile = 128;

template <typename T, typename I>
__global__ void spmm_t_kernel(const T* __restrict__ xt, int64_t B, const typename Acc<T>::type* __restrict__ val,
                              const int32_t* __restrict__ row_ptr, const I* __restrict__ col,
                              const T* __restrict__ bias, T* __restrict__ yt) {
  using A = typename Acc<T>::type;
  __shared__ A s_val[kTile];
  __shared__ int32_t s_col[kTile];
  const int64_t r = blockIdx.x;
  const int64_t b = static_cast<int64_t>(blockIdx.y) * kSpmmThreads + threadIdx.x;
  const int32_t start = row_ptr[r], end = row_ptr[r + 1];
  A acc = 0;
  for (int32_t t0 = start; t0 < end; t0 += kTile) {
    const int32_t n = min(kTile, end - t0);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kSpmmThreads) {
      s_val[i] = val[t0 + i];
      s_col[i] = static_cast<int32_t>(col[t0 + i]);
    }
    __syncthreads();
    if (b < B) {
      for (int i = 0; i < n; ++i) acc += s_val[i] * to_acc(xt[static_cast<int64_t>(s_col[i]) * B + b]);
    }
  }
  if (b < B) yt[r * B + b] = from_acc<T>(acc + (bias ? to_acc(bias[r]) : A(0)));
}

// SDDMM: block per row r, each warp takes entries of the row; lanes stride over the batch.
template <typename T, typename I>
__global__ void sddmm_t_kernel(const T* __restrict__ gt, const T* __restrict__ xt, int64_t B,
                               const int32_t* __restrict__ row_ptr, const I* __restrict__ col, T* __restrict__ dw,
                               int64_t K) {
  using A = typename Acc<T>::type;
  const int64_t r = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const T* g = gt + r * B;
  for (int32_t k = row_ptr[r] + warp; k < row_ptr[r + 1]; k += kWarpsPerBlock) {
    const int64_t c = static_cast<int64_t>(col[k]);
    const T* x = xt + c * B;
    A acc = 0;
    for (int64_t b = lane; b < B; b += 32) acc += to_acc(g[b]) * to_acc(x[b]);
    acc = warp_sum(acc);
    if (lane == 0) dw[r * K + c] = from_acc<T>(acc);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("masked_linear CUDA ") + what + " launch failed: " + cudaGetErrorString(err));
  }
}

template <typename T, typename I>
void launch_spmm(const void* xt, int64_t B, const void* values, const int32_t* row_ptr, const void* col_idx,
                 const void* bias, void* yt, int64_t N, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (N == 0 || B == 0) return;
  if (B == 1) {
    const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
    spmv_warp_kernel<T, I><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(xt), static_cast<const A*>(values), row_ptr, static_cast<const I*>(col_idx),
        static_cast<const T*>(bias), static_cast<T*>(yt), N);
    check_launch("spmv");
    return;
  }
  if (N > 2147483647LL || (B + kSpmmThreads - 1) / kSpmmThreads > 65535) {
    throw std::runtime_error("masked_linear CUDA: batch or out_features too large for one launch");
  }
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((B + kSpmmThreads - 1) / kSpmmThreads));
  spmm_t_kernel<T, I><<<grid, kSpmmThreads, 0, stream>>>(static_cast<const T*>(xt), B, static_cast<const A*>(values),
                                                       row_ptr, static_cast<const I*>(col_idx),
                                                       static_cast<const T*>(bias), static_cast<T*>(yt));
  check_launch("spmm");
}

template <typename T, typename I>
void launch_sddmm(const void* gt, const void* xt, int64_t B, int64_t N, int64_t K, const int32_t* row_ptr,
                  const void* col_idx, void* dw, cudaStream_t stream) {
  if (N == 0 || B == 0) return;
  if (N > 2147483647LL) throw std::runtime_error("masked_linear CUDA: out_features too large for one launch");
  sddmm_t_kernel<T, I><<<static_cast<unsigned>(N), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(gt), static_cast<const T*>(xt), B, row_ptr, static_cast<const I*>(col_idx),
      static_cast<T*>(dw), K);
  check_launch("sddmm");
}

template <template <typename, typename> class F, typename... Args>
void dispatch(DType dtype, bool idx16, Args... args) {
  switch (dtype) {
    case DType::F32: idx16 ? F<float, int16_t>::run(args...) : F<float, int32_t>::run(args...); break;
    case DType::F64: idx16 ? F<double, int16_t>::run(args...) : F<double, int32_t>::run(args...); break;
    case DType::F16: idx16 ? F<__half, int16_t>::run(args...) : F<__half, int32_t>::run(args...); break;
    case DType::BF16:
      idx16 ? F<__nv_bfloat16, int16_t>::run(args...) : F<__nv_bfloat16, int32_t>::run(args...);
      break;
  }
}

template <typename T, typename I>
struct SpmmOp {
  template <typename... Args>
  static void run(Args... args) { launch_spmm<T, I>(args...); }
};

template <typename T, typename I>
struct SddmmOp {
  template <typename... Args>
  static void run(Args... args) { launch_sddmm<T, I>(args...); }
};

}  // namespace

void spmm_t(DType dtype, const void* xt, int64_t B, const void* values, const int32_t* row_ptr, const void* col_idx,
            bool idx16, const void* bias, void* yt, int64_t N, void* stream) {
  dispatch<SpmmOp>(dtype, idx16, xt, B, values, row_ptr, col_idx, bias, yt, N, static_cast<cudaStream_t>(stream));
}

void sddmm_t(DType dtype, const void* gt, const void* xt, int64_t B, int64_t N, int64_t K, const int32_t* row_ptr,
             const void* col_idx, bool idx16, void* dw, void* stream) {
  dispatch<SddmmOp>(dtype, idx16, gt, xt, B, N, K, row_ptr, col_idx, dw, static_cast<cudaStream_t>(stream));
}

}  // namespace masked
}  // namespace cuda
}  // namespace torchslim
