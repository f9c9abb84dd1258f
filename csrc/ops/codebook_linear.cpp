// Glue for codebook_linear: argument checks, dtype/device dispatch, registration.
//
//   codebook_linear(input, indices, codebook, bias)   = input @ codebook[indices].T + bias
//   codebook_linear_grad_input(grad, indices, codebook, in_features) = grad @ W
//   codebook_linear_grad_codebook(grad, input, indices, codebook)
//       [k] = sum of dW[o, j] over the (o, j) whose index is k, dW = grad^T @ input
//
// indices: uint8 [out, in] (K <= 256) or packed 4-bit [out, ceil(in/2)] (K <= 16), the
// packed layout being recognised by indices.size(1) != in_features. Every index in use is
// checked against K before any lookup (a scan, skipped when the layout cannot hold a value
// >= K: K = 256 unpacked, K = 16 packed); kernels look up a table padded to 256 entries.
//
// CPU strategy: small batches (gemv_max_batch) run the register-decode GEMV (codebook_gemv);
// larger batches decode a tile of rows of W to fp32 in a buffer and hand it to at::mm
// (BLAS), tile by tile, so that the whole dense W never exists at once. The gradients use
// the same tiles: grad_input accumulates grad[:, tile] @ W_tile, the codebook gradient forms
// dW_tile = grad[:, tile]^T @ input and reduces it into K bins (per-block partial
// histograms summed in a fixed order: deterministic) or, for small batches, forms each row
// of dW in L1 and bins it at once.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "kernels/cpu/codebook_linear.h"
#include "ops/registration.h"

#ifdef TORCHSLIM_WITH_CUDA
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
// CPU-only torch wheels ship c10/cuda without its generated export-macro header (the CUDA
// compile check runs against one); it only sets export macros, which a client does not need.
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/cuda/codebook_linear.h"
#endif

namespace torchslim {
namespace {

// CPU: decoded tiles of W (large-batch forward and grad_input) and of dW (codebook
// gradient) of at most 8 MiB, in a scratch buffer kept per calling thread: a fresh
// allocation of the whole fp32 W (64 MiB at 4096x4096) is served by mmap and costs its
// page faults on every call, more than the decode itself. The tiles go through BLAS one
// after another. TORCHSLIM_CODEBOOK_TILE_KB overrides the size (benchmarks).
int64_t tile_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("TORCHSLIM_CODEBOOK_TILE_KB");
    return e ? std::max<int64_t>(4, std::atoll(e)) << 10 : int64_t(8) << 20;
  }();
  return v;
}

// [rows, cols] tensor of dtype `dtype` over this thread's scratch buffer (grown on demand,
// 64-byte aligned). Valid until the next call on the same thread.
at::Tensor scratch_tile(int64_t rows, int64_t cols, at::ScalarType dtype) {
  thread_local std::vector<double> buffer;  // doubles: 8-byte aligned storage
  const size_t bytes = static_cast<size_t>(rows * cols) * at::elementSize(dtype) + 64;
  if (buffer.size() * sizeof(double) < bytes) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(bytes / sizeof(double) + 1);
  }
  auto addr = reinterpret_cast<uintptr_t>(buffer.data());
  void* aligned = reinterpret_cast<void*>((addr + 63) & ~uintptr_t(63));
  return at::from_blob(aligned, {rows, cols}, at::TensorOptions().dtype(dtype));
}
constexpr int64_t kHistBlockRows = 16;           // rows per partial histogram (fixed: deterministic)

struct Layout {
  int64_t out = 0, in = 0;
  int64_t K = 0;
  bool packed = false;
};

// CPU: batches up to this size run the register-decode GEMV, larger ones decode + BLAS.
// The crossover depends on the decode cost: one permute per 16 weights for 4-bit / K <= 32,
// the byte-plane lookup (several times that) for K > 32. TORCHSLIM_CODEBOOK_GEMV_MAX_BATCH
// overrides it (read once; for benchmarks).
int64_t gemv_max_batch(const Layout& L, bool fp64) {
  static const int64_t env = [] {
    const char* e = std::getenv("TORCHSLIM_CODEBOOK_GEMV_MAX_BATCH");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(-1);
  }();
  if (env >= 0) return env;
  if (fp64) return 8;
  if (L.packed || L.K <= 32) return 32;
  // Byte-plane decode: past batch 8 it only pays while the dense W would not sit in cache.
  return L.out * L.in * 4 > (int64_t(16) << 20) ? 16 : 8;
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks indices and codebook against in_features (and the index range); returns the layout.
Layout check_weights(const at::Tensor& indices, const at::Tensor& codebook, int64_t in_features,
                     const at::Device& device, at::ScalarType dtype) {
  Layout L;
  TORCH_CHECK(indices.scalar_type() == at::kByte, "codebook_linear: indices must be uint8 (torch.uint8), got ",
              indices.scalar_type());
  TORCH_CHECK(indices.dim() == 2, "codebook_linear: indices must be 2-D [out_features, in_features] or packed "
              "[out_features, ceil(in_features/2)], got shape ", indices.sizes());
  TORCH_CHECK(codebook.dim() == 1, "codebook_linear: codebook must be 1-D [num_clusters], got shape ",
              codebook.sizes());
  TORCH_CHECK(codebook.numel() > 0, "codebook_linear: codebook is empty (num_clusters must be >= 1)");
  TORCH_CHECK(is_float_dtype(codebook.scalar_type()),
              "codebook_linear: codebook must be floating point (float32, float64, float16, bfloat16), got ",
              codebook.scalar_type());
  TORCH_CHECK(codebook.scalar_type() == dtype, "codebook_linear: codebook dtype ", codebook.scalar_type(),
              " differs from input dtype ", dtype);
  TORCH_CHECK(indices.device() == device, "codebook_linear: indices on ", indices.device(),
              " but input on ", device);
  TORCH_CHECK(codebook.device() == device, "codebook_linear: codebook on ", codebook.device(),
              " but input on ", device);
  L.out = indices.size(0);
  L.in = in_features;
  L.K = codebook.numel();
  const int64_t cols = indices.size(1);
  if (cols == in_features) {
    L.packed = false;
    TORCH_CHECK(L.K <= 256, "codebook_linear: codebook has ", L.K,
                " entries but uint8 indices address at most 256");
  } else if (cols == (in_features + 1) / 2) {
    L.packed = true;
    TORCH_CHECK(L.K <= 16, "codebook_linear: indices have the packed 4-bit shape [", L.out, ", ", cols,
                "] for in_features=", in_features, ", which addresses at most 16 codebook entries, but codebook has ",
                L.K);
  } else {
    TORCH_CHECK(false, "codebook_linear: indices must have ", in_features, " columns (uint8) or ",
                (in_features + 1) / 2, " (packed 4-bit) for in_features=", in_features, ", got shape ",
                indices.sizes());
  }
  return L;
}

// The kernels' view of the (checked) index tensor, on whichever device it lives.
CodebookIndices indices_view(const Layout& L, const at::Tensor& idx) {
  CodebookIndices w;
  w.idx = idx.data_ptr<uint8_t>();
  w.ld = idx.stride(0);
  w.out = L.out;
  w.in = L.in;
  w.packed = L.packed;
  w.num_clusters = static_cast<int>(L.K);
  return w;
}

void check_max_index(const Layout& L, int max_index) {
  TORCH_CHECK(max_index < L.K, "codebook_linear: indices contain the value ", max_index,
              " but codebook has only ", L.K, " entries (valid indices are 0..", L.K - 1, ")");
}

// Index-range scan (before any lookup). Skipped when every representable value is < K.
void check_index_range_cpu(const Layout& L, const at::Tensor& idx) {
  const int64_t limit = L.packed ? 16 : 256;
  if (L.K >= limit || L.out == 0 || L.in == 0) return;
  const cpu::CodebookIndices w = indices_view(L, idx);
  int max_index = 0;
  std::atomic<int> shared_max{0};
  at::parallel_for(0, L.out, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(L.in, 1)),
                   [&](int64_t r0, int64_t r1) {
                     const int m = cpu::codebook_max_index(w, r0, r1);
                     int cur = shared_max.load();
                     while (m > cur && !shared_max.compare_exchange_weak(cur, m)) {
                     }
                   });
  max_index = shared_max.load();
  check_max_index(L, max_index);
}

template <typename T>
std::vector<T> padded_table(const at::Tensor& codebook) {
  std::vector<T> table(256, T(0));
  const at::Tensor cb = codebook.contiguous();
  const T* p = cb.data_ptr<T>();
  std::copy(p, p + cb.numel(), table.begin());
  return table;
}

at::Tensor bias_or_undefined(const std::optional<at::Tensor>& bias, const Layout& L, const at::Device& device,
                             at::ScalarType dtype) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == L.out, "codebook_linear: bias must have shape [", L.out,
              "] (out_features), got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == dtype, "codebook_linear: bias dtype ", b.scalar_type(), " differs from input dtype ",
              dtype);
  TORCH_CHECK(b.device() == device, "codebook_linear: bias on ", b.device(), " but input on ", device);
  return b;
}

void check_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() >= 1, "codebook_linear: ", name, " must have at least 1 dimension, got a scalar");
  TORCH_CHECK(is_float_dtype(input.scalar_type()), "codebook_linear: ", name,
              " must be floating point (float32, float64, float16, bfloat16), got ", input.scalar_type());
}

// Argument checks of the two gradient ops, shared by their CPU and CUDA implementations.
Layout check_grad_input_args(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& codebook,
                             int64_t in_features) {
  check_input(grad, "grad_output");
  TORCH_CHECK(in_features >= 0, "codebook_linear: in_features must be >= 0, got ", in_features);
  const Layout L = check_weights(indices, codebook, in_features, grad.device(), grad.scalar_type());
  TORCH_CHECK(grad.size(-1) == L.out, "codebook_linear: grad_output last dimension must be ", L.out, ", got ",
              grad.size(-1));
  return L;
}

Layout check_grad_codebook_args(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& indices,
                                const at::Tensor& codebook) {
  check_input(grad, "grad_output");
  check_input(input, "input");
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "codebook_linear: grad_output dtype ", grad.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(grad.device() == input.device(), "codebook_linear: grad_output on ", grad.device(),
              " but input on ", input.device());
  const Layout L = check_weights(indices, codebook, input.size(-1), input.device(), input.scalar_type());
  TORCH_CHECK(grad.size(-1) == L.out, "codebook_linear: grad_output last dimension must be ", L.out, ", got ",
              grad.size(-1));
  return L;
}

std::vector<int64_t> out_shape(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.back() = last;
  return s;
}

int64_t tile_rows(const Layout& L, int64_t bytes = tile_bytes()) {
  return std::max<int64_t>(16, std::min<int64_t>(L.out, bytes / (4 * std::max<int64_t>(L.in, 1))));
}

// Decode rows [o0, o1) of W into tile (contiguous [o1-o0, in]) with threads.
template <typename T>
void decode_tile(const cpu::CodebookIndices& w, const T* table, at::Tensor& tile, int64_t o0, int64_t o1) {
  T* dst = tile.data_ptr<T>();
  const int64_t ld = w.in;
  at::parallel_for(o0, o1, std::max<int64_t>(1, 4096 / std::max<int64_t>(w.in, 1)),
                   [&](int64_t a, int64_t b) { cpu::codebook_decode(w, table, dst + (a - o0) * ld, ld, a, b); });
}

// ------------------------------------------------------------------ CPU forward
// max_seen: for a GEMV that reports it (cpu::codebook_gemv_reports_max_index), the largest
// index read, else left at -1.
template <typename T>
void forward_cpu_impl(const Layout& L, const at::Tensor& x2, const at::Tensor& idx, const at::Tensor& codebook,
                      const at::Tensor& bias, at::Tensor& y2, int* max_seen = nullptr) {
  if (max_seen) *max_seen = -1;
  const int64_t B = x2.size(0);
  const std::vector<T> table = padded_table<T>(codebook);
  const cpu::CodebookIndices w = indices_view(L, idx);
  const T* bptr = bias.defined() ? bias.data_ptr<T>() : nullptr;
  if (B <= gemv_max_batch(L, std::is_same_v<T, double>)) {
    const T* x = x2.data_ptr<T>();
    T* y = y2.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(4, (1 << 15) / std::max<int64_t>(L.in * B, 1));
    if constexpr (std::is_same_v<T, float>) {
      std::vector<float> prep(static_cast<size_t>(cpu::codebook_gemv_prepared_size(w, B)));
      cpu::codebook_gemv_prepare(w, x, B, prep.data());
      const bool report = max_seen != nullptr && cpu::codebook_gemv_reports_max_index(w);
      std::atomic<int> shared_max{0};
      at::parallel_for(0, L.out, grain, [&](int64_t o0, int64_t o1) {
        int m = 0;
        cpu::codebook_gemv(w, table.data(), x, prep.data(), B, bptr, y, o0, o1, report ? &m : nullptr);
        int cur = shared_max.load();
        while (m > cur && !shared_max.compare_exchange_weak(cur, m)) {
        }
      });
      if (report) *max_seen = shared_max.load();
    } else {
      at::parallel_for(0, L.out, grain, [&](int64_t o0, int64_t o1) {
        cpu::codebook_gemv(w, table.data(), x, B, bptr, y, o0, o1);
      });
    }
    return;
  }
  const int64_t T_rows = tile_rows(L);
  at::Tensor tile = scratch_tile(std::min(T_rows, L.out), L.in, x2.scalar_type());
  for (int64_t o0 = 0; o0 < L.out; o0 += T_rows) {
    const int64_t o1 = std::min(L.out, o0 + T_rows);
    at::Tensor t = tile.narrow(0, 0, o1 - o0);
    decode_tile<T>(w, table.data(), t, o0, o1);
    at::Tensor ys = y2.narrow(1, o0, o1 - o0);
    if (bias.defined())
      at::addmm_out(ys, bias.narrow(0, o0, o1 - o0), x2, t.t());
    else
      at::mm_out(ys, x2, t.t());
  }
}

// Low-precision CPU inputs compute in fp32 (fp32 accumulation) and round the result once.
at::ScalarType cpu_compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor codebook_linear_cpu(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& codebook,
                               const std::optional<at::Tensor>& bias_opt) {
  check_input(input, "input");
  const Layout L = check_weights(indices, codebook, input.size(-1), input.device(), input.scalar_type());
  const at::Tensor bias = bias_or_undefined(bias_opt, L, input.device(), input.scalar_type());
  const at::Tensor idx = indices.contiguous();
  const at::ScalarType ct = cpu_compute_type(input.scalar_type());
  at::Tensor x2 = input.reshape({-1, L.in}).to(ct).contiguous();
  const int64_t B = x2.size(0);
  // The 8-bit byte-plane GEMV reads every index through a vector register anyway and reports
  // the largest: its range check comes right after it (the zero-padded table keeps every
  // lookup in bounds, and the result is not returned on failure), saving a pass over the
  // indices (~0.3 ms at 4096 x 4096, a quarter of the GEMV). Every other path scans first.
  const bool check_after = ct == at::kFloat && B > 0 && L.out > 0 && L.in > 0 && L.K < 256 &&
                           B <= gemv_max_batch(L, false) && cpu::codebook_gemv_reports_max_index(indices_view(L, idx));
  if (!check_after) check_index_range_cpu(L, idx);
  at::Tensor y2 = at::empty({B, L.out}, x2.options());
  if (B > 0 && L.out > 0) {
    if (L.in == 0) {
      if (bias.defined()) y2.copy_(bias.to(ct).unsqueeze(0).expand({B, L.out}));
      else y2.zero_();
    } else {
      const at::Tensor cb = codebook.to(ct);
      const at::Tensor b = bias.defined() ? bias.to(ct).contiguous() : at::Tensor();
      if (ct == at::kDouble) {
        forward_cpu_impl<double>(L, x2, idx, cb, b, y2);
      } else {
        int max_seen = -1;
        forward_cpu_impl<float>(L, x2, idx, cb, b, y2, check_after ? &max_seen : nullptr);
        if (check_after) {
          TORCH_INTERNAL_ASSERT(max_seen >= 0, "codebook_linear: the GEMV did not report the index range");
          check_max_index(L, max_seen);
        }
      }
    }
  }
  return y2.to(input.scalar_type()).reshape(out_shape(input, L.out));
}

// ------------------------------------------------------------------ CPU backward
template <typename T>
void grad_input_cpu_impl(const Layout& L, const at::Tensor& g2, const at::Tensor& idx, const at::Tensor& codebook,
                         at::Tensor& dx) {
  const std::vector<T> table = padded_table<T>(codebook);
  const cpu::CodebookIndices w = indices_view(L, idx);
  const int64_t T_rows = tile_rows(L);
  at::Tensor tile = scratch_tile(std::min(T_rows, L.out), L.in, g2.scalar_type());
  for (int64_t o0 = 0; o0 < L.out; o0 += T_rows) {
    const int64_t o1 = std::min(L.out, o0 + T_rows);
    at::Tensor t = tile.narrow(0, 0, o1 - o0);
    decode_tile<T>(w, table.data(), t, o0, o1);
    const at::Tensor gs = g2.narrow(1, o0, o1 - o0);
    if (o0 == 0)
      at::mm_out(dx, gs, t);
    else
      dx.addmm_(gs, t);
  }
}

at::Tensor codebook_linear_grad_input_cpu(const at::Tensor& grad, const at::Tensor& indices,
                                          const at::Tensor& codebook, int64_t in_features) {
  const Layout L = check_grad_input_args(grad, indices, codebook, in_features);
  const at::Tensor idx = indices.contiguous();
  check_index_range_cpu(L, idx);
  const at::ScalarType ct = cpu_compute_type(grad.scalar_type());
  const at::Tensor g2 = grad.reshape({-1, L.out}).to(ct).contiguous();
  at::Tensor dx = at::zeros({g2.size(0), L.in}, g2.options());
  if (g2.size(0) > 0 && L.out > 0 && L.in > 0) {
    const at::Tensor cb = codebook.to(ct);
    if (ct == at::kDouble)
      grad_input_cpu_impl<double>(L, g2, idx, cb, dx);
    else
      grad_input_cpu_impl<float>(L, g2, idx, cb, dx);
  }
  return dx.to(grad.scalar_type()).reshape(out_shape(grad, L.in));
}

template <typename T>
void grad_codebook_cpu_impl(const Layout& L, const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& idx,
                            std::vector<double>& hist) {
  const cpu::CodebookIndices w = indices_view(L, idx);
  const int64_t B = g2.size(0);
  const int64_t K = L.K;
  const int64_t nblocks = (L.out + kHistBlockRows - 1) / kHistBlockRows;
  std::vector<double> partial(static_cast<size_t>(nblocks * K), 0.0);
  if constexpr (std::is_same_v<T, float>) {
    if (B <= 8) {
      const float* dy = g2.data_ptr<float>();
      const float* x = x2.data_ptr<float>();
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t o0 = blk * kHistBlockRows, o1 = std::min(L.out, o0 + kHistBlockRows);
          cpu::codebook_grad_fused(w, dy, x, B, o0, o1, partial.data() + blk * K);
        }
      });
      for (int64_t blk = 0; blk < nblocks; ++blk)
        for (int64_t k = 0; k < K; ++k) hist[k] += partial[blk * K + k];
      return;
    }
  }
  const int64_t T_rows = (tile_rows(L) + kHistBlockRows - 1) / kHistBlockRows * kHistBlockRows;
  at::Tensor tile = scratch_tile(std::min(T_rows, L.out), L.in, g2.scalar_type());
  for (int64_t o0 = 0; o0 < L.out; o0 += T_rows) {
    const int64_t o1 = std::min(L.out, o0 + T_rows);
    at::Tensor t = tile.narrow(0, 0, o1 - o0);
    at::mm_out(t, g2.narrow(1, o0, o1 - o0).t(), x2);  // dW rows [o0, o1)
    const T* dw = t.data_ptr<T>();
    const int64_t blk0 = o0 / kHistBlockRows, blk1 = (o1 + kHistBlockRows - 1) / kHistBlockRows;
    at::parallel_for(blk0, blk1, 1, [&](int64_t a, int64_t b) {
      for (int64_t blk = a; blk < b; ++blk) {
        const int64_t r0 = blk * kHistBlockRows, r1 = std::min(o1, r0 + kHistBlockRows);
        cpu::codebook_histogram(w, dw + (r0 - o0) * L.in, L.in, r0, r1, partial.data() + blk * K);
      }
    });
  }
  for (int64_t blk = 0; blk < nblocks; ++blk)
    for (int64_t k = 0; k < K; ++k) hist[k] += partial[blk * K + k];
}

at::Tensor codebook_linear_grad_codebook_cpu(const at::Tensor& grad, const at::Tensor& input,
                                             const at::Tensor& indices, const at::Tensor& codebook) {
  const Layout L = check_grad_codebook_args(grad, input, indices, codebook);
  const at::ScalarType ct = cpu_compute_type(grad.scalar_type());
  const at::Tensor g2 = grad.reshape({-1, L.out}).to(ct).contiguous();
  const at::Tensor x2 = input.reshape({-1, L.in}).to(ct).contiguous();
  TORCH_CHECK(g2.size(0) == x2.size(0), "codebook_linear: grad_output has ", g2.size(0),
              " rows but input has ", x2.size(0));
  const at::Tensor idx = indices.contiguous();
  check_index_range_cpu(L, idx);
  std::vector<double> hist(static_cast<size_t>(L.K), 0.0);
  if (g2.size(0) > 0 && L.out > 0 && L.in > 0) {
    if (ct == at::kDouble)
      grad_codebook_cpu_impl<double>(L, g2, x2, idx, hist);
    else
      grad_codebook_cpu_impl<float>(L, g2, x2, idx, hist);
  }
  at::Tensor out = at::empty({L.K}, codebook.options().dtype(at::kDouble));
  std::copy(hist.begin(), hist.end(), out.data_ptr<double>());
  return out.to(codebook.scalar_type());
}

#ifdef TORCHSLIM_WITH_CUDA
// ------------------------------------------------------------------ CUDA
#define TS_CUDA_CHECK(expr)                                                                 \
  do {                                                                                      \
    const cudaError_t ts_err_ = (expr);                                                     \
    TORCH_CHECK(ts_err_ == cudaSuccess, "codebook_linear: CUDA launch failed: ", cudaGetErrorString(ts_err_)); \
  } while (0)

cuda::CbDType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::CbDType::F32;
    case at::kDouble: return cuda::CbDType::F64;
    case at::kHalf: return cuda::CbDType::F16;
    case at::kBFloat16: return cuda::CbDType::BF16;
    default: TORCH_CHECK(false, "codebook_linear: unsupported dtype ", t);
  }
  return cuda::CbDType::F32;
}

// Scan on the device; one synchronisation, only when the layout can hold a value >= K.
void check_index_range_cuda(const Layout& L, const at::Tensor& idx) {
  const int64_t limit = L.packed ? 16 : 256;
  if (L.K >= limit || L.out == 0 || L.in == 0) return;
  at::Tensor m = at::zeros({1}, idx.options().dtype(at::kInt));
  TS_CUDA_CHECK(cuda::codebook_max_index(indices_view(L, idx), m.data_ptr<int>(), c10::cuda::getCurrentCUDAStream()));
  const int max_index = m.item<int>();
  TORCH_CHECK(max_index < L.K, "codebook_linear: indices contain the value ", max_index,
              " but codebook has only ", L.K, " entries (valid indices are 0..", L.K - 1, ")");
}

constexpr int64_t kCudaGemvMaxBatch = 8;      // GPU: larger batches go to decode + cuBLAS
constexpr int64_t kCudaTileElems = 64 << 20;   // GPU: decoded W / dW tile (elements)

int64_t cuda_tile_rows(const Layout& L) {
  return std::max<int64_t>(1, std::min<int64_t>(L.out, kCudaTileElems / std::max<int64_t>(L.in, 1)));
}

at::Tensor codebook_linear_cuda(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& codebook,
                                const std::optional<at::Tensor>& bias_opt) {
  check_input(input, "input");
  const Layout L = check_weights(indices, codebook, input.size(-1), input.device(), input.scalar_type());
  const at::Tensor bias = bias_or_undefined(bias_opt, L, input.device(), input.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor idx = indices.contiguous();
  check_index_range_cuda(L, idx);
  const at::Tensor x2 = input.reshape({-1, L.in}).contiguous();
  const at::Tensor cb = codebook.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : at::Tensor();
  const int64_t B = x2.size(0);
  at::Tensor y2 = at::empty({B, L.out}, x2.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (B > 0 && L.out > 0) {
    if (L.in == 0) {
      if (b.defined()) y2.copy_(b.unsqueeze(0).expand({B, L.out}));
      else y2.zero_();
    } else if (B <= kCudaGemvMaxBatch) {
      TS_CUDA_CHECK(cuda::codebook_gemv(indices_view(L, idx), cb.data_ptr(), x2.data_ptr(), B, b.defined() ? b.data_ptr() : nullptr,
                          y2.data_ptr(), cuda_dtype(x2.scalar_type()), stream));
    } else {
      // Decode W to the input dtype, tile by tile (the whole W when it has at most
      // kCudaTileElems elements), and run cuBLAS on it (tensor cores for fp16/bf16).
      const int64_t rows = cuda_tile_rows(L);
      at::Tensor wd = at::empty({std::min(rows, L.out), L.in}, x2.options());
      for (int64_t o0 = 0; o0 < L.out; o0 += rows) {
        const int64_t o1 = std::min(L.out, o0 + rows);
        at::Tensor t = wd.narrow(0, 0, o1 - o0);
        TS_CUDA_CHECK(cuda::codebook_decode(indices_view(L, idx), cb.data_ptr(), t.data_ptr(), L.in, o0, o1,
                                            cuda_dtype(x2.scalar_type()), stream));
        at::Tensor ys = y2.narrow(1, o0, o1 - o0);
        if (b.defined()) at::addmm_out(ys, b.narrow(0, o0, o1 - o0), x2, t.t());
        else at::mm_out(ys, x2, t.t());
      }
    }
  }
  return y2.reshape(out_shape(input, L.out));
}

at::Tensor codebook_linear_grad_input_cuda(const at::Tensor& grad, const at::Tensor& indices,
                                           const at::Tensor& codebook, int64_t in_features) {
  const Layout L = check_grad_input_args(grad, indices, codebook, in_features);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor idx = indices.contiguous();
  check_index_range_cuda(L, idx);
  const at::Tensor g2 = grad.reshape({-1, L.out}).contiguous();
  at::Tensor dx = at::zeros({g2.size(0), L.in}, g2.options());
  if (g2.size(0) > 0 && L.out > 0 && L.in > 0) {
    const at::Tensor cb = codebook.contiguous();
    const int64_t rows = cuda_tile_rows(L);
    at::Tensor wd = at::empty({std::min(rows, L.out), L.in}, g2.options());
    for (int64_t o0 = 0; o0 < L.out; o0 += rows) {
      const int64_t o1 = std::min(L.out, o0 + rows);
      at::Tensor t = wd.narrow(0, 0, o1 - o0);
      TS_CUDA_CHECK(cuda::codebook_decode(indices_view(L, idx), cb.data_ptr(), t.data_ptr(), L.in, o0, o1,
                                          cuda_dtype(g2.scalar_type()), c10::cuda::getCurrentCUDAStream()));
      dx.addmm_(g2.narrow(1, o0, o1 - o0), t);
    }
  }
  return dx.reshape(out_shape(grad, L.in));
}

at::Tensor codebook_linear_grad_codebook_cuda(const at::Tensor& grad, const at::Tensor& input,
                                              const at::Tensor& indices, const at::Tensor& codebook) {
  const Layout L = check_grad_codebook_args(grad, input, indices, codebook);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor g2 = grad.reshape({-1, L.out}).contiguous();
  const at::Tensor x2 = input.reshape({-1, L.in}).contiguous();
  TORCH_CHECK(g2.size(0) == x2.size(0), "codebook_linear: grad_output has ", g2.size(0),
              " rows but input has ", x2.size(0));
  const at::Tensor idx = indices.contiguous();
  check_index_range_cuda(L, idx);
  const at::ScalarType acc_t = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor hist = at::zeros({L.K}, codebook.options().dtype(acc_t));
  const int64_t B = g2.size(0);
  if (B > 0 && L.out > 0 && L.in > 0) {
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (B <= kCudaGemvMaxBatch) {
      // dW formed on the fly inside the binning kernel.
      const cuda::CbIndices w = indices_view(L, idx);
      at::Tensor partial =
          deterministic ? at::empty({cuda::codebook_grad_partial_blocks(w), L.K}, hist.options()) : at::Tensor();
      TS_CUDA_CHECK(cuda::codebook_grad_codebook(w, nullptr, 0, g2.data_ptr(), x2.data_ptr(), B,
                                                 cuda_dtype(g2.scalar_type()), hist.data_ptr(),
                                                 deterministic ? partial.data_ptr() : nullptr, stream));
    } else {
      // dW tile by tile from cuBLAS (never the whole dW unless it is small), each tile binned
      // by the fused K-bin reduction.
      const int64_t rows = cuda_tile_rows(L);
      at::Tensor dw = at::empty({std::min(rows, L.out), L.in}, g2.options());
      for (int64_t o0 = 0; o0 < L.out; o0 += rows) {
        const int64_t o1 = std::min(L.out, o0 + rows);
        at::Tensor t = dw.narrow(0, 0, o1 - o0);
        at::mm_out(t, g2.narrow(1, o0, o1 - o0).t(), x2);
        cuda::CbIndices w = indices_view(L, idx);
        w.idx += o0 * w.ld;
        w.out = o1 - o0;
        at::Tensor partial =
            deterministic ? at::empty({cuda::codebook_grad_partial_blocks(w), L.K}, hist.options()) : at::Tensor();
        TS_CUDA_CHECK(cuda::codebook_grad_codebook(w, t.data_ptr(), L.in, nullptr, nullptr, B,
                                                   cuda_dtype(g2.scalar_type()), hist.data_ptr(),
                                                   deterministic ? partial.data_ptr() : nullptr, stream));
      }
    }
  }
  return hist.to(codebook.scalar_type());
}
#endif  // TORCHSLIM_WITH_CUDA

}  // namespace

void define_codebook_linear_ops(torch::Library& m) {
  m.def("codebook_linear(Tensor input, Tensor indices, Tensor codebook, Tensor? bias=None) -> Tensor");
  m.def("codebook_linear_grad_input(Tensor grad_output, Tensor indices, Tensor codebook, SymInt in_features) -> Tensor");
  m.def("codebook_linear_grad_codebook(Tensor grad_output, Tensor input, Tensor indices, Tensor codebook) -> Tensor");
}

}  // namespace torchslim

TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  using namespace torchslim;
  m.impl("codebook_linear", &codebook_linear_cpu);
  m.impl("codebook_linear_grad_input", &codebook_linear_grad_input_cpu);
  m.impl("codebook_linear_grad_codebook", &codebook_linear_grad_codebook_cpu);
}

#ifdef TORCHSLIM_WITH_CUDA
TORCH_LIBRARY_IMPL(torchslim, CUDA, m) {
  using namespace torchslim;
  m.impl("codebook_linear", &codebook_linear_cuda);
  m.impl("codebook_linear_grad_input", &codebook_linear_grad_input_cuda);
  m.impl("codebook_linear_grad_codebook", &codebook_linear_grad_codebook_cuda);
}
#endif
