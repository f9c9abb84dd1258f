// Fused distillation loss, CUDA kernel (torch-free). See kd_loss.h for the contract.
//
// Pass 1 (one read of both rows): every thread keeps an online state per input - running
// max, sum of exponentials, plus the KL cross term and Zs - Zt (see kernels/cpu/kd_loss.cpp
// for why the difference is summed directly) - merged across the warp with shuffles and
// across warps in shared memory. Pass 2 recomputes the exponentials (cheap on the GPU; the
// row is usually still in L2) and writes the gradient once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/kd_loss.h"
#include "kernels/cuda/accumulate.cuh"

namespace torchslim {
namespace cuda {
namespace {

__device__ __forceinline__ float fexp2(float x) { return exp2f(x); }
__device__ __forceinline__ double fexp2(double x) { return exp2(x); }
__device__ __forceinline__ float flog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double flog1p(double x) { return log1p(x); }

// NaN-ignoring max (fmax returns the other operand when one is NaN).
__device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double vmax(double a, double b) { return fmax(a, b); }

template <class A>
struct State {
  A ms, mt;  // running maxima (-inf when nothing finite seen)
  A zs, zt;  // sums of exp((x - shift) / T)
  A w;       // sum of e_t * ((t - shift_t) - (s - shift_s))
  A dz;      // sum of (e_s - e_t)
};

template <class A> __device__ __forceinline__ A shift_of(A m) { return m == -INFINITY ? A(0) : m; }

// Re-expresses the state relative to the maxima (ms_new, mt_new) >= the current ones.
template <class A>
__device__ __forceinline__ void rescale(State<A>& st, A ms_new, A mt_new, A kk) {
  const A so = shift_of(st.ms), sn = shift_of(ms_new);
  const A to = shift_of(st.mt), tn = shift_of(mt_new);
  const A fs = (st.zs == A(0) || so == sn) ? (st.zs == A(0) ? A(0) : A(1)) : fexp2((so - sn) * kk);
  const A ft = (st.zt == A(0) || to == tn) ? (st.zt == A(0) ? A(0) : A(1)) : fexp2((to - tn) * kk);
  st.w = ft == A(0) ? A(0) : ft * (st.w + ((to - tn) - (so - sn)) * st.zt);
  st.dz = fs * st.dz + (fs - ft) * st.zt;
  st.zs *= fs;
  st.zt *= ft;
  st.ms = ms_new;
  st.mt = mt_new;
}

template <class A>
__device__ __forceinline__ void merge(State<A>& a, State<A> b, A kk) {
  const A ms = vmax(a.ms, b.ms), mt = vmax(a.mt, b.mt);
  rescale(a, ms, mt, kk);
  rescale(b, ms, mt, kk);
  a.zs += b.zs;
  a.zt += b.zt;
  a.w += b.w;
  a.dz += b.dz;
}

template <class A>
__device__ __forceinline__ void accumulate(State<A>& st, A s, A t, A kk) {
  const A ds = s - shift_of(st.ms), dt = t - shift_of(st.mt);
  const A es = fexp2(ds * kk), et = fexp2(dt * kk);
  st.zs += es;
  st.zt += et;
  st.dz += es - et;
  if (et > A(0)) st.w += et * (dt - ds);  // 0 * log 0 = 0
}

template <class A>
__device__ __forceinline__ State<A> shfl_xor(const State<A>& st, int lane_mask) {
  State<A> o;
  o.ms = __shfl_xor_sync(0xffffffffu, st.ms, lane_mask);
  o.mt = __shfl_xor_sync(0xffffffffu, st.mt, lane_mask);
  o.zs = __shfl_xor_sync(0xffffffffu, st.zs, lane_mask);
  o.zt = __shfl_xor_sync(0xffffffffu, st.zt, lane_mask);
  o.w = __shfl_xor_sync(0xffffffffu, st.w, lane_mask);
  o.dz = __shfl_xor_sync(0xffffffffu, st.dz, lane_mask);
  return o;
}

template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// THREADS_PER_ROW == 32: a warp per row (blockDim.x / 32 rows per block);
// otherwise THREADS_PER_ROW == blockDim.x: a block per row.
template <class T, int VEC, int THREADS_PER_ROW>
__global__ void __launch_bounds__(THREADS_PER_ROW == 32 ? 256 : THREADS_PER_ROW) kd_loss_kernel(const T* __restrict__ S, const T* __restrict__ Tt, int64_t rows, int64_t C,
                               int64_t s_stride, int64_t t_stride, const typename Acc<T>::type* __restrict__ row_weight,
                               typename Acc<T>::type T_, typename Acc<T>::type kk, const float* __restrict__ grad_scale,
                               T* __restrict__ G, typename Acc<T>::type* __restrict__ row_loss) {
  using A = typename Acc<T>::type;
  constexpr int kWarps = THREADS_PER_ROW / 32;
  __shared__ State<A> warp_states[kWarps > 0 ? kWarps : 1];

  const int lane_in_row = threadIdx.x % THREADS_PER_ROW;
  const int64_t row = THREADS_PER_ROW == 32
                          ? int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32
                          : int64_t(blockIdx.x);
  if (row >= rows) return;  // whole warps (warp per row) or whole blocks (block per row) leave together

  const T* s = S + row * s_stride;
  const T* t = Tt + row * t_stride;
  const A wr = row_weight ? row_weight[row] : A(1);
  if (wr == A(0)) {
    if (G) for (int64_t i = lane_in_row; i < C; i += THREADS_PER_ROW) G[row * C + i] = T(0.0f);
    if (lane_in_row == 0) row_loss[row] = A(0);
    return;
  }

  // ---- pass 1: online max / sum-exp / cross terms, one read of both rows
  State<A> st{A(-INFINITY), A(-INFINITY), A(0), A(0), A(0), A(0)};
  const int64_t nvec = C / VEC;
  const Pack<T, VEC>* sv = reinterpret_cast<const Pack<T, VEC>*>(s);
  const Pack<T, VEC>* tv = reinterpret_cast<const Pack<T, VEC>*>(t);
  for (int64_t j = lane_in_row; j < nvec; j += THREADS_PER_ROW) {
    const Pack<T, VEC> ps = sv[j], pt = tv[j];
    A xs[VEC], xt[VEC];
    A cms = st.ms, cmt = st.mt;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      xs[k] = to_acc(ps.v[k]);
      xt[k] = to_acc(pt.v[k]);
      cms = vmax(cms, xs[k]);
      cmt = vmax(cmt, xt[k]);
    }
    if (cms != st.ms || cmt != st.mt) rescale(st, cms, cmt, kk);
#pragma unroll
    for (int k = 0; k < VEC; ++k) accumulate(st, xs[k], xt[k], kk);
  }
  for (int64_t i = nvec * VEC + lane_in_row; i < C; i += THREADS_PER_ROW) {
    const A xs = to_acc(s[i]), xt = to_acc(t[i]);
    const A cms = vmax(st.ms, xs), cmt = vmax(st.mt, xt);
    if (cms != st.ms || cmt != st.mt) rescale(st, cms, cmt, kk);
    accumulate(st, xs, xt, kk);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) merge(st, shfl_xor(st, off), kk);
  if constexpr (THREADS_PER_ROW > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_states[warp] = st;
    __syncthreads();
    st = warp_states[0];
    for (int k = 1; k < kWarps; ++k) merge(st, warp_states[k], kk);
  }

  const A Zs = st.zs, Zt = st.zt;
  if (lane_in_row == 0) {
    A kl = st.w * (kk / A(1.4426950408889634)) / Zt + flog1p(st.dz / Zt);
    if (kl < A(0)) kl = A(0);
    row_loss[row] = wr * T_ * T_ * kl;
  }
  if (G == nullptr) return;

  // ---- pass 2: the gradient, written once
  const A g = wr * T_ * A(*grad_scale);
  const A cs = g / Zs, ct = g / Zt;
  const bool same = cs == ct;
  const A sh_s = shift_of(st.ms), sh_t = shift_of(st.mt);
  T* grow = G + row * C;
  Pack<T, VEC>* gv = reinterpret_cast<Pack<T, VEC>*>(grow);
  for (int64_t j = lane_in_row; j < nvec; j += THREADS_PER_ROW) {
    const Pack<T, VEC> ps = sv[j], pt = tv[j];
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A es = fexp2((to_acc(ps.v[k]) - sh_s) * kk), et = fexp2((to_acc(pt.v[k]) - sh_t) * kk);
      const A v = same ? cs * (es - et) : cs * es - ct * et;
      out.v[k] = from_acc<T>(v);
    }
    gv[j] = out;
  }
  for (int64_t i = nvec * VEC + lane_in_row; i < C; i += THREADS_PER_ROW) {
    const A es = fexp2((to_acc(s[i]) - sh_s) * kk), et = fexp2((to_acc(t[i]) - sh_t) * kk);
    const A v = same ? cs * (es - et) : cs * es - ct * et;
    grow[i] = from_acc<T>(v);
  }
}

template <class T, int VEC>
void launch_typed(const KdLossCudaParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const T* s = static_cast<const T*>(p.student);
  const T* t = static_cast<const T*>(p.teacher);
  T* g = static_cast<T*>(p.grad);
  const A* w = static_cast<const A*>(p.row_weight);
  A* loss = static_cast<A*>(p.row_loss);
  const A T_ = A(p.temperature);
  const A kk = A(1.4426950408889634 / p.temperature);
  if (p.classes <= 2048) {
    constexpr int kThreads = 256;
    const int64_t rows_per_block = kThreads / 32;
    const unsigned blocks = unsigned((p.rows + rows_per_block - 1) / rows_per_block);
    kd_loss_kernel<T, VEC, 32><<<blocks, kThreads, 0, stream>>>(s, t, p.rows, p.classes, p.student_row_stride,
                                                                 p.teacher_row_stride, w, T_, kk, p.grad_scale, g, loss);
  } else if (p.classes <= 16384) {
    kd_loss_kernel<T, VEC, 256><<<unsigned(p.rows), 256, 0, stream>>>(s, t, p.rows, p.classes, p.student_row_stride,
                                                                      p.teacher_row_stride, w, T_, kk, p.grad_scale, g,
                                                                      loss);
  } else {
    kd_loss_kernel<T, VEC, 1024><<<unsigned(p.rows), 1024, 0, stream>>>(s, t, p.rows, p.classes, p.student_row_stride,
                                                                        p.teacher_row_stride, w, T_, kk, p.grad_scale,
                                                                        g, loss);
  }
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) == 0; }

template <class T>
void launch_dispatch_vec(const KdLossCudaParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = p.classes % kVec == 0 && p.student_row_stride % kVec == 0 && p.teacher_row_stride % kVec == 0 &&
                      aligned(p.student, 16) && aligned(p.teacher, 16) && (p.grad == nullptr || aligned(p.grad, 16));
  if (vec_ok) launch_typed<T, kVec>(p, stream);
  else launch_typed<T, 1>(p, stream);
}

}  // namespace

const char* kd_loss_launch(const KdLossCudaParams& p, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (p.rows <= 0 || p.classes <= 0) return nullptr;
  switch (p.dtype) {
    case 0: launch_dispatch_vec<float>(p, stream); break;
    case 1: launch_dispatch_vec<double>(p, stream); break;
    case 2: launch_dispatch_vec<__half>(p, stream); break;
    case 3: launch_dispatch_vec<__nv_bfloat16>(p, stream); break;
    default: return "kd_loss_launch: unknown dtype code";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace torchslim
