// CUDA kernels of the masked sparse linear op: CSR SpMM (forward and input gradient) and
// SDDMM (weight gradient at the kept positions). Torch-free; see masked_linear.h.
#include "kernels/cuda/masked_linear.h"
#include "kernels/cuda/accumulate.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

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

// The clamps of "Safe reads" (masked_linear.h): entry ranges into [0, nnz], indices into
// [0, last]. extent <= 0 leaves no entry to read.
struct Bounds {
  int32_t nnz;
  uint32_t last;
};

Bounds make_bounds(int64_t nnz, int64_t extent) {
  if (extent <= 0) return Bounds{0, 0};
  const int64_t n = nnz < 0 ? 0 : (nnz > 2147483647LL ? 2147483647LL : nnz);
  const int64_t e = extent > (int64_t(1) << 32) ? (int64_t(1) << 32) : extent;
  return Bounds{static_cast<int32_t>(n), static_cast<uint32_t>(e - 1)};
}

__device__ __forceinline__ void row_range(const int32_t* row_ptr, int64_t r, Bounds bd, int32_t& k0, int32_t& k1) {
  k0 = min(max(row_ptr[r], 0), bd.nnz);
  k1 = min(max(row_ptr[r + 1], k0), bd.nnz);
}

template <typename I>
__device__ __forceinline__ int64_t at(I c, Bounds bd) {
  return min(static_cast<uint32_t>(static_cast<typename std::make_unsigned<I>::type>(c)), bd.last);
}

// Batch 1: one warp per row, lanes stride over the row's entries.
template <typename T, typename I>
__global__ void spmv_warp_kernel(const T* __restrict__ x, const typename Acc<T>::type* __restrict__ val,
                                 const int32_t* __restrict__ row_ptr, const I* __restrict__ col, Bounds bd,
                                 const T* __restrict__ bias, T* __restrict__ y, int64_t N) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= N) return;
  A acc = 0;
  int32_t k0, k1;
  row_range(row_ptr, r, bd, k0, k1);
  for (int32_t k = k0 + lane; k < k1; k += 32) acc += val[k] * to_acc(x[at(col[k], bd)]);
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
                              const int32_t* __restrict__ row_ptr, const I* __restrict__ col, Bounds bd,
                              const T* __restrict__ bias, T* __restrict__ yt) {
  using A = typename Acc<T>::type;
  __shared__ A s_val[kTile];
  __shared__ int32_t s_col[kTile];
  const int64_t r = blockIdx.x;
  const int64_t b = static_cast<int64_t>(blockIdx.y) * kSpmmThreads + threadIdx.x;
  int32_t start, end;  // read once per thread, clamped: every thread loops the same range
  row_range(row_ptr, r, bd, start, end);
  A acc = 0;
  for (int32_t t0 = start; t0 < end; t0 += kTile) {
    const int32_t n = min(kTile, end - t0);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kSpmmThreads) {
      s_val[i] = val[t0 + i];
      s_col[i] = static_cast<int32_t>(at(col[t0 + i], bd));
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
                               const int32_t* __restrict__ row_ptr, const I* __restrict__ col, Bounds bd,
                               T* __restrict__ dw, int64_t K) {
  using A = typename Acc<T>::type;
  const int64_t r = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const T* g = gt + r * B;
  int32_t k0, k1;
  row_range(row_ptr, r, bd, k0, k1);
  for (int32_t k = k0 + warp; k < k1; k += kWarpsPerBlock) {
    const int64_t c = at(col[k], bd);
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
                 int64_t nnz, int64_t K, const void* bias, void* yt, int64_t N, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (N == 0 || B == 0) return;
  const Bounds bd = make_bounds(nnz, K);
  if (B == 1) {
    const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
    spmv_warp_kernel<T, I><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(xt), static_cast<const A*>(values), row_ptr, static_cast<const I*>(col_idx), bd,
        static_cast<const T*>(bias), static_cast<T*>(yt), N);
    check_launch("spmv");
    return;
  }
  if (N > 2147483647LL || (B + kSpmmThreads - 1) / kSpmmThreads > 65535) {
    throw std::runtime_error("masked_linear CUDA: batch or out_features too large for one launch");
  }
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((B + kSpmmThreads - 1) / kSpmmThreads));
  spmm_t_kernel<T, I><<<grid, kSpmmThreads, 0, stream>>>(static_cast<const T*>(xt), B, static_cast<const A*>(values),
                                                       row_ptr, static_cast<const I*>(col_idx), bd,
                                                       static_cast<const T*>(bias), static_cast<T*>(yt));
  check_launch("spmm");
}

template <typename T, typename I>
void launch_sddmm(const void* gt, const void* xt, int64_t B, int64_t N, int64_t K, const int32_t* row_ptr,
                  const void* col_idx, int64_t nnz, void* dw, cudaStream_t stream) {
  if (N == 0 || B == 0) return;
  const Bounds bd = make_bounds(nnz, K);
  if (N > 2147483647LL) throw std::runtime_error("masked_linear CUDA: out_features too large for one launch");
  sddmm_t_kernel<T, I><<<static_cast<unsigned>(N), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(gt), static_cast<const T*>(xt), B, row_ptr, static_cast<const I*>(col_idx), bd,
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
            bool idx16, int64_t nnz, int64_t K, const void* bias, void* yt, int64_t N, void* stream) {
  dispatch<SpmmOp>(dtype, idx16, xt, B, values, row_ptr, col_idx, nnz, K, bias, yt, N,
                   static_cast<cudaStream_t>(stream));
}

void sddmm_t(DType dtype, const void* gt, const void* xt, int64_t B, int64_t N, int64_t K, const int32_t* row_ptr,
             const void* col_idx, bool idx16, int64_t nnz, void* dw, void* stream) {
  dispatch<SddmmOp>(dtype, idx16, gt, xt, B, N, K, row_ptr, col_idx, nnz, dw, static_cast<cudaStream_t>(stream));
}

}  // namespace masked
}  // namespace cuda
}  // namespace torchslim
