// Glue for sparse_codebook_linear: argument checks, allocation, dtype/device dispatch and
// registration. The only file of the op that touches at::Tensor.
//
//   sparse_codebook_linear(input, row_ptr, col_idx, codes, codebook, bias)   y = x W^T + b
//   sparse_codebook_linear_grad_input(grad_output, row_ptr, col_idx, codes, codebook, in_features)
//       = grad_output @ W, from the transposed structure (built once per structure, cached)
//   sparse_codebook_linear_grad_codebook(grad_output, input, row_ptr, col_idx, codes, codebook)
//       [c] = sum over kept (r, j) with code c of dW[r, j], dW = grad_output^T input
//   _sparse_codebook_transpose(row_ptr, col_idx, codes, in_features) -> (t_row_ptr, t_row_idx, t_codes)
//   _sparse_codebook_linear_path(num_clusters, packed, batch, fp64) -> code of the CPU body
//       (sck::path_code; torchslim.ops.sparse_codebook_linear.cpu_path names it)
//
// W [out, in]: W[r, col_idx[k]] = codebook[code(k)] for k in [row_ptr[r], row_ptr[r + 1]),
// zero elsewhere (layout: kernels/cpu/sparse_codebook_linear.h). codes are packed 4-bit
// (codes.numel() == ceil(nnz / 2), K <= 16) or one byte each (codes.numel() == nnz, K <= 256).
//
// Checks: shapes, dtypes, devices and contiguity on every call; every index (row_ptr
// start / order / end, col_idx < in_features, code < K) once per structure: a structure
// that passed is remembered (validated.h) until it is written to or freed, so a cached
// layer costs no pass over its indices per call, and an edited one is checked again before
// any kernel reads it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels/cpu/sparse_codebook_linear.h"
#include "ops/grain.h"
#include "ops/registration.h"
#include "ops/validated.h"

#ifdef TORCHSLIM_WITH_CUDA
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
// CPU-only torch wheels ship c10/cuda without its generated export-macro header (the CUDA
// compile check runs against one); it only sets export macros, which a client does not need.
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/sparse_codebook_linear.h"
#endif

namespace torchslim {
namespace {

using at::Tensor;
namespace sck = torchslim::cpu::sck;

constexpr const char* kOp = "sparse_codebook_linear";
// CPU batches below this run the batch-1 kernel per row (no transpose, no padding to 16).
constexpr int64_t kSpmvMaxBatch = 4;
// Rows per partial histogram of the codebook gradient (fixed: deterministic across thread counts).
constexpr int64_t kHistBlockRows = 16;

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}
// Computation and accumulation dtype: float64 for float64, float32 for every other dtype.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Layout {
  int64_t out = 0, in = 0, nnz = 0, K = 0;
  bool packed = false;
  bool col32 = false;
};

void check_tensor_arg(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " is undefined");
}

// Per-call checks of the structure and codebook (no pass over the indices).
Layout check_layout(const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes, const Tensor& codebook,
                    int64_t in_features, const at::Device& device, at::ScalarType dtype) {
  Layout L;
  TORCH_CHECK(in_features >= 0, kOp, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt, kOp, ": row_ptr must be int32 (torch.int32), got ",
              row_ptr.scalar_type());
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, kOp,
              ": row_ptr must be 1-D [out_features + 1], got shape ", row_ptr.sizes());
  TORCH_CHECK(col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt, kOp,
              ": col_idx must be int16 (in_features <= 32767) or int32, got ", col_idx.scalar_type());
  TORCH_CHECK(col_idx.dim() == 1, kOp, ": col_idx must be 1-D [nnz], got shape ", col_idx.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kByte, kOp, ": codes must be uint8 (torch.uint8), got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 1, kOp, ": codes must be 1-D, got shape ", codes.sizes());
  TORCH_CHECK(codebook.dim() == 1, kOp, ": codebook must be 1-D [num_clusters], got shape ", codebook.sizes());
  TORCH_CHECK(is_floating(codebook.scalar_type()), kOp,
              ": codebook must be floating point (float32, float64, bfloat16 or float16), got ",
              codebook.scalar_type());
  TORCH_CHECK(codebook.scalar_type() == dtype, kOp, ": codebook dtype ", codebook.scalar_type(),
              " differs from input dtype ", dtype);
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&row_ptr, "row_ptr"}, {&col_idx, "col_idx"},
                                {&codes, "codes"}, {&codebook, "codebook"}}) {
    TORCH_CHECK(t->device() == device, kOp, ": ", name, " is on ", t->device(), " but input is on ", device);
  }
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&row_ptr, "row_ptr"}, {&col_idx, "col_idx"},
                                {&codes, "codes"}}) {
    TORCH_CHECK(t->is_contiguous(), kOp, ": ", name, " must be contiguous (it is read in place; a structure is "
                "built once), got strides ", t->strides());
  }
  L.out = row_ptr.numel() - 1;
  L.in = in_features;
  L.nnz = col_idx.numel();
  L.K = codebook.numel();
  L.col32 = col_idx.scalar_type() == at::kInt;
  TORCH_CHECK(L.nnz <= std::numeric_limits<int32_t>::max(), kOp, ": at most 2^31 - 1 kept weights (int32 row_ptr), got ",
              L.nnz);
  TORCH_CHECK(L.K >= 1, kOp, ": codebook is empty (num_clusters must be >= 1)");
  const int64_t n = codes.numel();
  if (n == L.nnz) {
    L.packed = false;
    TORCH_CHECK(L.K <= 256, kOp, ": codebook has ", L.K, " entries but uint8 codes address at most 256");
  } else if (n == (L.nnz + 1) / 2) {
    L.packed = true;
    TORCH_CHECK(L.K <= 16, kOp, ": codes have the packed 4-bit length ", n, " for nnz = ", L.nnz,
                ", which addresses at most 16 codebook entries, but codebook has ", L.K);
  } else {
    TORCH_CHECK(false, kOp, ": codes must have nnz = ", L.nnz, " entries (uint8) or ceil(nnz / 2) = ",
                (L.nnz + 1) / 2, " (packed 4-bit), got ", n);
  }
  return L;
}

sck::Structure structure_view(const Layout& L, const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes) {
  sck::Structure s;
  s.row_ptr = row_ptr.data_ptr<int32_t>();
  s.col = col_idx.const_data_ptr();
  s.col32 = L.col32;
  s.codes = codes.data_ptr<uint8_t>();
  s.packed = L.packed;
  s.rows = L.out;
  s.cols = L.in;
  s.num_clusters = static_cast<int>(L.K);
  s.nnz = L.nnz;  // from col_idx's size: the kernels' read bound (row_ptr may have been edited since the check)
  return s;
}

int64_t check_tag(const Layout& L) { return -(1 + L.in * 512 + L.K); }  // negative: apart from the masked tags

void fail(const sck::Check& c, const Layout& L) {
  switch (c.fault) {
    case sck::Fault::FirstNotZero: TORCH_CHECK(false, kOp, ": row_ptr must start at 0, got ", c.value);
    case sck::Fault::Decreasing:
      TORCH_CHECK(false, kOp, ": row_ptr must be non-decreasing, but it decreases after row ", c.where, " (to ",
                  c.value, ")");
    case sck::Fault::LastNotNnz:
      TORCH_CHECK(false, kOp, ": row_ptr must end at nnz = col_idx.numel() = ", L.nnz, ", got ", c.value);
    case sck::Fault::ColumnOutOfRange:
      TORCH_CHECK(false, kOp, ": col_idx entry ", c.where, " is ", c.value, ", outside [0, in_features = ", L.in, ")");
    case sck::Fault::CodeOutOfRange:
      TORCH_CHECK(false, kOp, ": codes entry ", c.where, " is ", c.value, " but codebook has only ", L.K,
                  " entries (valid codes are 0..", L.K - 1, ")");
    default: return;
  }
}

// Every index of the structure, once per structure (see the header comment).
void check_indices(const Layout& L, const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes) {
  if (known_valid({&row_ptr, &col_idx, &codes}, check_tag(L))) return;
  if (row_ptr.device().is_cpu()) {
    const sck::Structure s = structure_view(L, row_ptr, col_idx, codes);
    fail(sck::check_row_ptr(s, L.nnz), L);
    // Entries in fixed chunks over threads; the first fault (lowest chunk) is reported.
    constexpr int64_t kChunk = 1 << 16;
    const int64_t nchunks = (L.nnz + kChunk - 1) / kChunk;
    std::vector<sck::Check> found(static_cast<size_t>(nchunks));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) found[c] = sck::check_entries(s, c * kChunk, std::min(L.nnz, (c + 1) * kChunk));
    });
    for (const sck::Check& c : found) fail(c, L);
  } else {
    // Device structures: a few reductions, synchronising once per structure.
    const Tensor rp = row_ptr.to(at::kLong);
    const int64_t first = rp[0].item<int64_t>();
    TORCH_CHECK(first == 0, kOp, ": row_ptr must start at 0, got ", first);
    TORCH_CHECK(L.out == 0 || (rp.diff() >= 0).all().item<bool>(), kOp, ": row_ptr must be non-decreasing");
    const int64_t last = rp[L.out].item<int64_t>();
    TORCH_CHECK(last == L.nnz, kOp, ": row_ptr must end at nnz = col_idx.numel() = ", L.nnz, ", got ", last);
    if (L.nnz > 0) {
      const auto [lo, hi] = at::aminmax(col_idx);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < L.in, kOp, ": col_idx entries must be in [0, ",
                  "in_features = ", L.in, "), got [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
      const int64_t mx = L.packed ? at::maximum(codes.bitwise_and(0x0F), codes.bitwise_right_shift(4)).max().item<int64_t>()
                                  : codes.max().item<int64_t>();
      // The padding nibble of an odd packed length is 0 by construction; a stray one is
      // reported too (it can never be read).
      TORCH_CHECK(mx < L.K, kOp, ": codes contain the value ", mx, " but codebook has only ", L.K,
                  " entries (valid codes are 0..", L.K - 1, ")");
    }
  }
  remember_valid({&row_ptr, &col_idx, &codes}, check_tag(L));
}

Tensor bias_or_undefined(const std::optional<Tensor>& bias, const Layout& L, const at::Device& device,
                         at::ScalarType dtype) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  const Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == L.out, kOp, ": bias must have shape [", L.out, "] (out_features), got ",
              b.sizes());
  TORCH_CHECK(b.scalar_type() == dtype, kOp, ": bias dtype ", b.scalar_type(), " differs from input dtype ", dtype);
  TORCH_CHECK(b.device() == device, kOp, ": bias is on ", b.device(), " but input is on ", device);
  return b;
}

void check_input(const Tensor& t, const char* name) {
  check_tensor_arg(t, name);
  TORCH_CHECK(t.dim() >= 1, kOp, ": ", name, " must have at least 1 dimension [..., features], got a 0-D tensor");
  TORCH_CHECK(is_floating(t.scalar_type()), kOp, ": ", name,
              " must be floating point (float32, float64, bfloat16 or float16), got ", t.scalar_type());
}

// t as [rows, t.size(-1)] (reshape({-1, 0}) is ambiguous for zero features).
Tensor as_2d(const Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)});
}

std::vector<int64_t> out_shape(const Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.back() = last;
  return s;
}

// ---------------------------------------------------------------- transposed structure
// CSR of W^T (rows = in_features, columns = out row indices, byte codes), entries of each
// column in increasing row order. Built with tensor ops (any device); deterministic.
std::tuple<Tensor, Tensor, Tensor> build_transpose(const Layout& L, const Tensor& row_ptr, const Tensor& col_idx,
                                                   const Tensor& codes) {
  const auto lopt = row_ptr.options().dtype(at::kLong);
  // Indices clamped as the kernels do (the structure may have been edited behind the version
  // counter since its check): every entry gets a row in [0, out) and a column in [0, in), so
  // the scatter below writes nnz entries inside the outputs whatever row_ptr / col_idx hold.
  Tensor rows = at::zeros({L.nnz}, lopt);
  if (L.out > 0 && L.nnz > 0) {
    const Tensor ends = std::get<0>(row_ptr.narrow(0, 1, L.out).to(at::kLong).clamp(0, L.nnz).cummax(0));
    rows = at::searchsorted(ends, at::arange(L.nnz, lopt), /*out_int32=*/false, /*right=*/true).clamp_max(L.out - 1);
  }
  Tensor cols = col_idx.to(at::kLong);
  if (L.in > 0) cols = at::where(cols.lt(0), L.in - 1, cols.clamp_max(L.in - 1));  // negative -> last, as unsigned
  const Tensor perm = std::get<1>(at::sort(cols, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::ScalarType it = L.out <= 32767 ? at::kShort : at::kInt;
  Tensor t_rows = rows.index_select(0, perm).to(it).contiguous();
  Tensor bytes = codes;
  if (L.packed) bytes = at::stack({codes.bitwise_and(0x0F), codes.bitwise_right_shift(4)}, 1).reshape({-1}).narrow(0, 0, L.nnz);
  Tensor t_codes = bytes.index_select(0, perm).contiguous();
  const Tensor counts_c = L.nnz > 0 ? at::bincount(cols, {}, L.in) : at::zeros({L.in}, lopt);
  Tensor t_row_ptr = at::cat({at::zeros({1}, lopt), counts_c.cumsum(0)}).to(at::kInt).contiguous();
  return {t_row_ptr, t_rows, t_codes};
}

// A small memo of transposed structures keyed on the structure tensors' identity, version
// and data pointer (the pattern of validated.h), so backward passes over a cached layer
// transpose it once. Inference tensors have no version counter and are never cached.
class TransposeCache {
 public:
  std::optional<std::tuple<Tensor, Tensor, Tensor>> find(const Tensor& a, const Tensor& b, const Tensor& c,
                                                         int64_t in) {
    if (!cacheable(a) || !cacheable(b) || !cacheable(c)) return std::nullopt;
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries_) {
      if (e.used && e.in == in && same(e.seen[0], a) && same(e.seen[1], b) && same(e.seen[2], c)) return e.value;
    }
    return std::nullopt;
  }
  void put(const Tensor& a, const Tensor& b, const Tensor& c, int64_t in, std::tuple<Tensor, Tensor, Tensor> v) {
    if (!cacheable(a) || !cacheable(b) || !cacheable(c)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    // Reuse an entry whose structure is gone first (frees its transposed copy), else round-robin.
    size_t slot = next_;
    for (size_t i = 0; i < kEntries; ++i) {
      const Entry& e = entries_[i];
      if (!e.used || e.seen[0].impl->expired() || e.seen[1].impl->expired() || e.seen[2].impl->expired()) {
        slot = i;
        break;
      }
    }
    if (slot == next_) next_ = (next_ + 1) % kEntries;
    Entry& e = entries_[slot];
    const Tensor* ts[3] = {&a, &b, &c};
    for (int i = 0; i < 3; ++i) {
      e.seen[i].impl.emplace(ts[i]->getIntrusivePtr());
      e.seen[i].version = ts[i]->_version();
      e.seen[i].data = ts[i]->const_data_ptr();
    }
    e.in = in;
    e.value = std::move(v);
    e.used = true;
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Seen {
    std::optional<WeakImpl> impl;
    int64_t version = 0;
    const void* data = nullptr;
  };
  struct Entry {
    std::array<Seen, 3> seen;
    int64_t in = -1;
    std::tuple<Tensor, Tensor, Tensor> value;
    bool used = false;
  };
  static constexpr size_t kEntries = 16;
  static bool cacheable(const Tensor& t) { return t.defined() && !t.is_inference(); }
  static bool same(const Seen& s, const Tensor& t) {
    return s.impl.has_value() && !s.impl->expired() && s.impl->_unsafe_get_target() == t.unsafeGetTensorImpl() &&
           s.version == t._version() && s.data == t.const_data_ptr();
  }
  std::mutex mutex_;
  std::array<Entry, kEntries> entries_;
  size_t next_ = 0;
};

TransposeCache& transpose_cache() {
  static TransposeCache* cache = new TransposeCache();  // never destroyed: tensors may outlive static teardown
  return *cache;
}

std::tuple<Tensor, Tensor, Tensor> transposed(const Layout& L, const Tensor& row_ptr, const Tensor& col_idx,
                                              const Tensor& codes) {
  if (auto hit = transpose_cache().find(row_ptr, col_idx, codes, L.in)) return *hit;
  auto t = build_transpose(L, row_ptr, col_idx, codes);
  transpose_cache().put(row_ptr, col_idx, codes, L.in, t);
  return t;
}

// The layout of the transposed structure (rows = in, byte codes, range = out).
Layout transposed_layout(const Layout& L, const Tensor& t_col) {
  Layout T = L;
  T.out = L.in;
  T.in = L.out;
  T.packed = false;
  T.col32 = t_col.scalar_type() == at::kInt;
  return T;
}

// ---------------------------------------------------------------- CPU
template <typename T>
std::array<T, 256> padded_table(const Tensor& codebook) {
  std::array<T, 256> table{};
  const Tensor cb = codebook.contiguous();
  const T* p = cb.data_ptr<T>();
  std::copy(p, p + cb.numel(), table.begin());
  return table;
}

// y2 [B, rows] (acc dtype) = x2 [B, cols] (acc dtype, contiguous) @ S^T + b, S the structure.
template <typename T>
void forward_cpu_impl(const Layout& L, const sck::Structure& s, const Tensor& codebook, const Tensor& x2,
                      const Tensor& b, Tensor& y2) {
  const int64_t B = x2.size(0);
  const std::array<T, 256> table = padded_table<T>(codebook);
  const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
  const T* xp = x2.data_ptr<T>();
  T* yp = y2.data_ptr<T>();
  if (B < kSpmvMaxBatch) {
    for (int64_t i = 0; i < B; ++i) {
      at::parallel_for(0, L.out, grain_rows(L.nnz, L.out, 1), [&](int64_t r0, int64_t r1) {
        sck::spmv(s, table.data(), xp + i * L.in, bp, yp + i * L.out, r0, r1);
      });
    }
    return;
  }
  // Batch as the vector dimension: X^T [in, nbp] zero-padded, Y^T [out, nbp], blocked transposes.
  const int64_t nbp = round_up(B, sck::kBatchPad);
  Tensor xt = at::empty({L.in, nbp}, x2.options());
  Tensor yt = at::empty({L.out, nbp}, x2.options());
  T* xtp = xt.data_ptr<T>();
  T* ytp = yt.data_ptr<T>();
  const int64_t tgrain = std::max<int64_t>(16, kGrainWork / nbp);
  at::parallel_for(0, L.in, tgrain, [&](int64_t c0, int64_t c1) { sck::transpose_pad(xp, L.in, B, nbp, xtp, nbp, c0, c1); });
  at::parallel_for(0, L.out, grain_rows(L.nnz, L.out, nbp), [&](int64_t r0, int64_t r1) {
    sck::spmm_t(s, table.data(), xtp, nbp, nbp, bp, ytp, nbp, r0, r1);
  });
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(L.out, 1)),
                   [&](int64_t b0, int64_t b1) { sck::transpose_pad(ytp, nbp, L.out, L.out, yp, L.out, b0, b1); });
}

// out [B, L.out] in `dtype` from x2 [B, L.in] through the (checked) structure.
Tensor apply_cpu(const Layout& L, const sck::Structure& s, const Tensor& codebook, const Tensor& x2d,
                 const Tensor& bias, at::ScalarType dtype) {
  const at::ScalarType ct = acc_type(dtype);
  const Tensor x2 = x2d.scalar_type() == ct ? x2d.contiguous() : x2d.to(ct).contiguous();
  const int64_t B = x2.size(0);
  Tensor y2 = at::empty({B, L.out}, x2.options());
  if (B == 0 || L.out == 0) return y2.to(dtype);
  const Tensor b = !bias.defined() ? Tensor() : bias.scalar_type() == ct ? bias.contiguous() : bias.to(ct).contiguous();
  if (L.nnz == 0) {
    if (b.defined()) y2.copy_(b.unsqueeze(0).expand({B, L.out}));
    else y2.zero_();
    return y2.to(dtype);
  }
  const Tensor cb = codebook.scalar_type() == ct ? codebook : codebook.to(ct);
  if (ct == at::kDouble) forward_cpu_impl<double>(L, s, cb, x2, b, y2);
  else forward_cpu_impl<float>(L, s, cb, x2, b, y2);
  return dtype == ct ? y2 : y2.to(dtype);
}

Tensor sparse_codebook_linear_cpu(const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx,
                                  const Tensor& codes, const Tensor& codebook, const std::optional<Tensor>& bias_opt) {
  check_input(input, "input");
  const Layout L = check_layout(row_ptr, col_idx, codes, codebook, input.size(-1), input.device(), input.scalar_type());
  const Tensor bias = bias_or_undefined(bias_opt, L, input.device(), input.scalar_type());
  check_indices(L, row_ptr, col_idx, codes);
  const sck::Structure s = structure_view(L, row_ptr, col_idx, codes);
  const Tensor y2 = apply_cpu(L, s, codebook, as_2d(input), bias, input.scalar_type());
  return y2.reshape(out_shape(input, L.out));
}

Layout check_grad_output(const Tensor& grad, const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes,
                         const Tensor& codebook, int64_t in_features) {
  check_input(grad, "grad_output");
  const Layout L = check_layout(row_ptr, col_idx, codes, codebook, in_features, grad.device(), grad.scalar_type());
  TORCH_CHECK(grad.size(-1) == L.out, kOp, ": grad_output.shape[-1] must be out_features = ", L.out, ", got ",
              grad.size(-1));
  check_indices(L, row_ptr, col_idx, codes);
  return L;
}

Tensor sparse_codebook_linear_grad_input_cpu(const Tensor& grad, const Tensor& row_ptr, const Tensor& col_idx,
                                             const Tensor& codes, const Tensor& codebook, int64_t in_features) {
  const Layout L = check_grad_output(grad, row_ptr, col_idx, codes, codebook, in_features);
  const auto [t_rp, t_col, t_codes] = transposed(L, row_ptr, col_idx, codes);
  const Layout T = transposed_layout(L, t_col);
  const sck::Structure s = structure_view(T, t_rp, t_col, t_codes);
  const Tensor dx = apply_cpu(T, s, codebook, as_2d(grad), Tensor(), grad.scalar_type());
  return dx.reshape(out_shape(grad, L.in));
}

std::tuple<Tensor, Tensor, Tensor> sparse_codebook_transpose(const Tensor& row_ptr, const Tensor& col_idx,
                                                             const Tensor& codes, int64_t in_features) {
  // The codebook only sets K for the checks: every code a layout can hold is allowed here.
  const int64_t k = codes.numel() == col_idx.numel() ? 256 : 16;
  const Tensor cb = at::empty({k}, at::TensorOptions().dtype(at::kFloat).device(row_ptr.device()));
  const Layout L = check_layout(row_ptr, col_idx, codes, cb, in_features, row_ptr.device(), at::kFloat);
  check_indices(L, row_ptr, col_idx, codes);
  return build_transpose(L, row_ptr, col_idx, codes);
}

template <typename T>
void grad_codebook_cpu_impl(const Layout& L, const sck::Structure& s, const Tensor& g2, const Tensor& x2,
                            std::vector<double>& hist) {
  const int64_t B = g2.size(0);
  // Batch 1: the rows themselves; else transposes with the batch contiguous.
  const Tensor gt = B == 1 ? g2 : g2.t().contiguous();
  const Tensor xt = B == 1 ? x2 : x2.t().contiguous();
  const int64_t ld = B;
  const int64_t nblocks = (L.out + kHistBlockRows - 1) / kHistBlockRows;
  std::vector<double> partial(static_cast<size_t>(nblocks * L.K), 0.0);
  const T* gp = gt.data_ptr<T>();
  const T* xp = xt.data_ptr<T>();
  at::parallel_for(0, nblocks, std::max<int64_t>(1, grain_rows(L.nnz, L.out, B) / kHistBlockRows),
                   [&](int64_t b0, int64_t b1) {
                     for (int64_t blk = b0; blk < b1; ++blk) {
                       const int64_t r0 = blk * kHistBlockRows, r1 = std::min(L.out, r0 + kHistBlockRows);
                       sck::grad_codebook(s, gp, ld, xp, ld, B, r0, r1, partial.data() + blk * L.K);
                     }
                   });
  for (int64_t blk = 0; blk < nblocks; ++blk)
    for (int64_t c = 0; c < L.K; ++c) hist[c] += partial[blk * L.K + c];
}

Layout check_grad_codebook_args(const Tensor& grad, const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx,
                                const Tensor& codes, const Tensor& codebook) {
  check_input(input, "input");
  TORCH_CHECK(grad.defined() && grad.scalar_type() == input.scalar_type(), kOp, ": grad_output dtype ",
              grad.defined() ? grad.scalar_type() : at::ScalarType::Undefined, " differs from input dtype ",
              input.scalar_type());
  TORCH_CHECK(grad.device() == input.device(), kOp, ": grad_output is on ", grad.device(), " but input is on ",
              input.device());
  const Layout L = check_grad_output(grad, row_ptr, col_idx, codes, codebook, input.size(-1));
  TORCH_CHECK(grad.numel() / std::max<int64_t>(L.out, 1) == input.numel() / std::max<int64_t>(L.in, 1) ||
                  L.out == 0 || L.in == 0,
              kOp, ": grad_output ", grad.sizes(), " and input ", input.sizes(), " have different batch sizes");
  return L;
}

Tensor sparse_codebook_linear_grad_codebook_cpu(const Tensor& grad, const Tensor& input, const Tensor& row_ptr,
                                                const Tensor& col_idx, const Tensor& codes, const Tensor& codebook) {
  const Layout L = check_grad_codebook_args(grad, input, row_ptr, col_idx, codes, codebook);
  const at::ScalarType ct = acc_type(input.scalar_type());
  const Tensor g2 = as_2d(grad).to(ct).contiguous();
  const Tensor x2 = as_2d(input).to(ct).contiguous();
  std::vector<double> hist(static_cast<size_t>(L.K), 0.0);
  if (g2.size(0) > 0 && L.nnz > 0) {
    const sck::Structure s = structure_view(L, row_ptr, col_idx, codes);
    if (ct == at::kDouble) grad_codebook_cpu_impl<double>(L, s, g2, x2, hist);
    else grad_codebook_cpu_impl<float>(L, s, g2, x2, hist);
  }
  Tensor out = at::empty({L.K}, codebook.options().dtype(at::kDouble));
  std::copy(hist.begin(), hist.end(), out.data_ptr<double>());
  return out.to(codebook.scalar_type());
}

int64_t sparse_codebook_linear_path(int64_t num_clusters, bool packed, int64_t batch, bool fp64) {
  sck::Structure s;
  s.packed = packed;
  s.num_clusters = static_cast<int>(num_clusters);
  return sck::path_code(s, batch >= kSpmvMaxBatch, fp64);
}

#ifdef TORCHSLIM_WITH_CUDA
// ---------------------------------------------------------------- CUDA
#define TS_SCK_CUDA_CHECK(expr)                                                                      \
  do {                                                                                               \
    const cudaError_t ts_err_ = (expr);                                                              \
    TORCH_CHECK(ts_err_ == cudaSuccess, kOp, ": CUDA launch failed: ", cudaGetErrorString(ts_err_)); \
  } while (0)

cuda::SckDType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::SckDType::F32;
    case at::kDouble: return cuda::SckDType::F64;
    case at::kHalf: return cuda::SckDType::F16;
    case at::kBFloat16: return cuda::SckDType::BF16;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
  return cuda::SckDType::F32;
}

cuda::SckStructure cuda_view(const Layout& L, const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes) {
  cuda::SckStructure s;
  s.row_ptr = row_ptr.data_ptr<int32_t>();
  s.col = col_idx.const_data_ptr();
  s.col32 = L.col32;
  s.codes = codes.data_ptr<uint8_t>();
  s.packed = L.packed;
  s.rows = L.out;
  s.cols = L.in;
  s.nnz = L.nnz;
  return s;
}

// y [B, L.out] (input dtype) = x2 [B, L.in] through the structure; fp32 (fp64) accumulation.
Tensor apply_cuda(const Layout& L, const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes,
                  const Tensor& codebook, const Tensor& x2d, const Tensor& bias) {
  const Tensor x2 = x2d.contiguous();
  const int64_t B = x2.size(0);
  Tensor y2 = at::empty({B, L.out}, x2.options());
  if (B == 0 || L.out == 0) return y2;
  const Tensor cb = codebook.contiguous();
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  TS_SCK_CUDA_CHECK(cuda::sck_spmm(cuda_view(L, row_ptr, col_idx, codes), cb.data_ptr(), static_cast<int>(L.K),
                                   x2.data_ptr(), B, b.defined() ? b.data_ptr() : nullptr, y2.data_ptr(),
                                   cuda_dtype(x2.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return y2;
}

Tensor sparse_codebook_linear_cuda(const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx,
                                   const Tensor& codes, const Tensor& codebook, const std::optional<Tensor>& bias_opt) {
  check_input(input, "input");
  const Layout L = check_layout(row_ptr, col_idx, codes, codebook, input.size(-1), input.device(), input.scalar_type());
  const Tensor bias = bias_or_undefined(bias_opt, L, input.device(), input.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  check_indices(L, row_ptr, col_idx, codes);
  const Tensor y2 = apply_cuda(L, row_ptr, col_idx, codes, codebook, as_2d(input), bias);
  return y2.reshape(out_shape(input, L.out));
}

Tensor sparse_codebook_linear_grad_input_cuda(const Tensor& grad, const Tensor& row_ptr, const Tensor& col_idx,
                                              const Tensor& codes, const Tensor& codebook, int64_t in_features) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const Layout L = check_grad_output(grad, row_ptr, col_idx, codes, codebook, in_features);
  const auto [t_rp, t_col, t_codes] = transposed(L, row_ptr, col_idx, codes);
  const Layout T = transposed_layout(L, t_col);
  const Tensor dx = apply_cuda(T, t_rp, t_col, t_codes, codebook, as_2d(grad), Tensor());
  return dx.reshape(out_shape(grad, L.in));
}

Tensor sparse_codebook_linear_grad_codebook_cuda(const Tensor& grad, const Tensor& input, const Tensor& row_ptr,
                                                 const Tensor& col_idx, const Tensor& codes, const Tensor& codebook) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Layout L = check_grad_codebook_args(grad, input, row_ptr, col_idx, codes, codebook);
  const at::ScalarType acc = acc_type(input.scalar_type());
  const Tensor g2 = as_2d(grad).contiguous();
  const Tensor x2 = as_2d(input).contiguous();
  Tensor hist = at::zeros({L.K}, codebook.options().dtype(acc));
  const int64_t B = g2.size(0);
  if (B > 0 && L.nnz > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const cuda::SckStructure s = cuda_view(L, row_ptr, col_idx, codes);
    // Per-entry dW values, then a fixed-order binning by code (deterministic).
    Tensor dw = at::empty({L.nnz}, x2.options().dtype(acc));
    Tensor partial = at::empty({cuda::sck_grad_partial_blocks(L.nnz), L.K}, dw.options());
    TS_SCK_CUDA_CHECK(cuda::sck_grad_codebook(s, static_cast<int>(L.K), g2.data_ptr(), x2.data_ptr(), B,
                                              cuda_dtype(x2.scalar_type()), dw.data_ptr(), partial.data_ptr(),
                                              hist.data_ptr(), stream));
  }
  return hist.to(codebook.scalar_type());
}
#endif  // TORCHSLIM_WITH_CUDA

// ---------------------------------------------------------------- autograd (C++)
// In C++ rather than torch.library.register_autograd: a Python autograd kernel costs ~5 us
// per call, as much as the whole kernel of a small layer at batch 1.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor call_forward(const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes,
                    const Tensor& codebook, const std::optional<Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchslim::sparse_codebook_linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const std::optional<Tensor>&)>();
  return op.call(input, row_ptr, col_idx, codes, codebook, bias);
}

Tensor call_grad_input(const Tensor& grad, const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes,
                       const Tensor& codebook, const c10::SymInt& in_features) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchslim::sparse_codebook_linear_grad_input", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     c10::SymInt)>();
  return op.call(grad, row_ptr, col_idx, codes, codebook, in_features);
}

Tensor call_grad_codebook(const Tensor& grad, const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx,
                          const Tensor& codes, const Tensor& codebook) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchslim::sparse_codebook_linear_grad_codebook", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&)>();
  return op.call(grad, input, row_ptr, col_idx, codes, codebook);
}

// Sum over every dimension but the last (no sizes read: works with symbolic shapes).
Tensor sum_leading(const Tensor& g) {
  if (g.dim() == 1) return g.clone();
  std::vector<int64_t> dims(static_cast<size_t>(g.dim() - 1));
  for (size_t i = 0; i < dims.size(); ++i) dims[i] = static_cast<int64_t>(i);
  return g.sum(dims);
}

class SparseCodebookLinearFn : public torch::autograd::Function<SparseCodebookLinearFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx,
                        const Tensor& codes, const Tensor& codebook, const std::optional<Tensor>& bias) {
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = call_forward(input, row_ptr, col_idx, codes, codebook, bias);  // checks the arguments first
    }
    ctx->save_for_backward({input, row_ptr, col_idx, codes, codebook});
    ctx->saved_data["in_features"] = input.sym_size(-1);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& g = grads[0];
    Tensor gi, gc, gb;
    if (ctx->needs_input_grad(0))
      gi = call_grad_input(g, saved[1], saved[2], saved[3], saved[4], ctx->saved_data["in_features"].toSymInt());
    if (ctx->needs_input_grad(4)) gc = call_grad_codebook(g, saved[0], saved[1], saved[2], saved[3], saved[4]);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(5)) gb = sum_leading(g);
    return {gi, Tensor(), Tensor(), Tensor(), gc, gb};
  }
};

// grad_input = grad_output @ W is linear in grad_output and in the codebook: its gradients
// are the forward op and the codebook gradient (double backward).
class SparseCodebookGradInputFn : public torch::autograd::Function<SparseCodebookGradInputFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& grad, const Tensor& row_ptr, const Tensor& col_idx,
                        const Tensor& codes, const Tensor& codebook, c10::SymInt in_features) {
    ctx->save_for_backward({grad, row_ptr, col_idx, codes, codebook});
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_grad_input(grad, row_ptr, col_idx, codes, codebook, in_features);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& gg = grads[0];
    Tensor dg, dc;
    if (ctx->needs_input_grad(0)) dg = call_forward(gg, saved[1], saved[2], saved[3], saved[4], std::nullopt);
    if (ctx->needs_input_grad(4)) dc = call_grad_codebook(saved[0], gg, saved[1], saved[2], saved[3], saved[4]);
    return {dg, Tensor(), Tensor(), Tensor(), dc, Tensor()};
  }
};

Tensor sparse_codebook_linear_autograd(const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx,
                                       const Tensor& codes, const Tensor& codebook,
                                       const std::optional<Tensor>& bias) {
  return SparseCodebookLinearFn::apply(input, row_ptr, col_idx, codes, codebook, bias);
}

Tensor sparse_codebook_linear_grad_input_autograd(const Tensor& grad, const Tensor& row_ptr, const Tensor& col_idx,
                                                  const Tensor& codes, const Tensor& codebook,
                                                  c10::SymInt in_features) {
  return SparseCodebookGradInputFn::apply(grad, row_ptr, col_idx, codes, codebook, std::move(in_features));
}

}  // namespace

void define_sparse_codebook_linear_ops(torch::Library& m) {
  m.def("sparse_codebook_linear(Tensor input, Tensor row_ptr, Tensor col_idx, Tensor codes, Tensor codebook, "
        "Tensor? bias=None) -> Tensor");
  m.def("sparse_codebook_linear_grad_input(Tensor grad_output, Tensor row_ptr, Tensor col_idx, Tensor codes, "
        "Tensor codebook, SymInt in_features) -> Tensor");
  m.def("sparse_codebook_linear_grad_codebook(Tensor grad_output, Tensor input, Tensor row_ptr, Tensor col_idx, "
        "Tensor codes, Tensor codebook) -> Tensor");
  m.def("_sparse_codebook_transpose(Tensor row_ptr, Tensor col_idx, Tensor codes, SymInt in_features) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_sparse_codebook_linear_path(int num_clusters, bool packed, int batch, bool fp64) -> int");
  m.impl("_sparse_codebook_linear_path", &sparse_codebook_linear_path);
}

}  // namespace torchslim

TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  using namespace torchslim;
  m.impl("sparse_codebook_linear", &sparse_codebook_linear_cpu);
  m.impl("sparse_codebook_linear_grad_input", &sparse_codebook_linear_grad_input_cpu);
  m.impl("sparse_codebook_linear_grad_codebook", &sparse_codebook_linear_grad_codebook_cpu);
  m.impl("_sparse_codebook_transpose", &sparse_codebook_transpose);
}

TORCH_LIBRARY_IMPL(torchslim, Autograd, m) {
  using namespace torchslim;
  m.impl("sparse_codebook_linear", &sparse_codebook_linear_autograd);
  m.impl("sparse_codebook_linear_grad_input", &sparse_codebook_linear_grad_input_autograd);
}

#ifdef TORCHSLIM_WITH_CUDA
TORCH_LIBRARY_IMPL(torchslim, CUDA, m) {
  using namespace torchslim;
  m.impl("sparse_codebook_linear", &sparse_codebook_linear_cuda);
  m.impl("sparse_codebook_linear_grad_input", &sparse_codebook_linear_grad_input_cuda);
  m.impl("sparse_codebook_linear_grad_codebook", &sparse_codebook_linear_grad_codebook_cuda);
  m.impl("_sparse_codebook_transpose", &sparse_codebook_transpose);
}
#endif
