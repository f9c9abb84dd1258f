// Glue for the fused sparse MLP inference op: a chain of sparse linear layers (each
// optionally followed by ReLU) in one call, so that a small pruned network at batch 1
// pays one dispatch instead of one per layer and per activation.
//
//   _sparse_mlp(input, plan, values, row_ptr, col_idx, bias, out_features) -> output
//
// plan is an int64 [L, 6] CPU tensor, one row per layer:
//   in_features, out_features, row_ptr offset, values/col_idx offset, bias offset (-1: no
//   bias), activation (0: none, 1: ReLU).
// Layer l's CSR is row_ptr[rp_off : rp_off + out + 1] (starting at 0, relative to its
// entries), col_idx / values from nnz_off, bias[bias_off : bias_off + out]. Every layer's
// structure is validated (monotone row pointers, column range) before any product reads
// it: one vectorised pass over the indices, once per structure; the plan's offsets and
// sizes are checked on every call (without overflow, whatever the plan holds), and the
// kernels clamp what they read, so an index edited behind the version counter gives wrong
// numbers, never an out-of-bounds access (kernels/cpu/masked_linear.h). No autograd: torchslim.nn.SparseSequential
// calls this only when no gradient is needed. Non-finite inputs give what the dense
// layers would give (same fix-up as _masked_spmm).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <vector>

#include "kernels/cpu/masked_linear.h"
#include "kernels/cpu/sparse_codebook_linear.h"
#include "kernels/cpu/sparse_mlp.h"
#include "ops/grain.h"
#include "ops/registration.h"
#include "ops/validated.h"

namespace torchslim {
namespace {

using at::Tensor;
namespace mk = torchslim::cpu::masked;
namespace sm = torchslim::cpu::sparse_mlp;

constexpr int64_t kPlanCols = 6;
// Batches up to this size run row by row (no transposes); larger ones run on transposed
// activations, the layout the batched sparse kernel wants, kept across the whole chain.
constexpr int64_t kRowPathMaxBatch = 2;

struct Layer {
  int64_t in, out, rp_off, nnz_off, bias_off;
  bool relu;
  int64_t nnz;  // entries of the layer, read once from its row_ptr (the kernels clamp to it)
};

// Rows per parallel chunk for a layer of nnz entries times per_entry columns. A layer with
// less than kParallelWork of that work runs on the calling thread: waking the pool costs
// tens of microseconds on small machines, more than splitting a small layer saves.
constexpr int64_t kParallelWork = 1 << 21;
// One batch-1 entry (a gathered load) costs about as much as this many batched entries
// (one SIMD lane of an FMA on contiguous activations).
constexpr int64_t kSpmvEntryCost = 8;
int64_t layer_grain(int64_t nnz, int64_t rows, int64_t per_entry) {
  if (nnz * per_entry < kParallelWork) return std::max<int64_t>(rows, 1);
  return grain_rows(nnz, rows, per_entry);
}

// The arguments both fused chains take alike: input, plan (plan_cols columns), row_ptr, col_idx.
void check_chain_arguments(const char* op, const Tensor& input, const Tensor& plan, int64_t plan_cols,
                           const Tensor& row_ptr, const Tensor& col_idx) {
  TORCH_CHECK(input.dim() >= 1 && (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble), op,
              ": input must be a float32 or float64 tensor [..., in_features], got ", input.scalar_type(),
              " of shape ", input.sizes());
  TORCH_CHECK(plan.device().is_cpu() && plan.scalar_type() == at::kLong && plan.dim() == 2 &&
                  plan.size(0) >= 1 && plan.size(1) == plan_cols && plan.is_contiguous(),
              op, ": plan must be a contiguous int64 CPU tensor [layers >= 1, ", plan_cols, "], got ",
              plan.scalar_type(), " of shape ", plan.sizes());
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.is_contiguous(), op,
              ": row_ptr must be a contiguous 1-D int32 tensor, got ", row_ptr.scalar_type(), " of shape ",
              row_ptr.sizes());
  TORCH_CHECK((col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt) && col_idx.dim() == 1 &&
                  col_idx.is_contiguous(),
              op, ": col_idx must be a contiguous 1-D int16 or int32 tensor, got ", col_idx.scalar_type(),
              " of shape ", col_idx.sizes());
}

std::vector<Layer> read_plan(const Tensor& input, const Tensor& plan, const Tensor& values, const Tensor& row_ptr,
                             const Tensor& col_idx, const Tensor& bias, int64_t out_features) {
  const char* op = "_sparse_mlp";
  check_chain_arguments(op, input, plan, kPlanCols, row_ptr, col_idx);
  TORCH_CHECK(values.scalar_type() == input.scalar_type() && values.dim() == 1 && values.is_contiguous() &&
                  values.size(0) == col_idx.size(0),
              op, ": values must be a contiguous 1-D ", input.scalar_type(), " tensor with one entry per col_idx entry (",
              col_idx.size(0), "), got ", values.scalar_type(), " of shape ", values.sizes());
  TORCH_CHECK(bias.scalar_type() == input.scalar_type() && bias.dim() == 1 && bias.is_contiguous(), op,
              ": bias must be a contiguous 1-D ", input.scalar_type(), " tensor, got ", bias.scalar_type(),
              " of shape ", bias.sizes());
  for (const Tensor* t : {&input, &values, &row_ptr, &col_idx, &bias}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ", t->device());
  }
  const int64_t L = plan.size(0);
  const int64_t* p = plan.data_ptr<int64_t>();
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  std::vector<Layer> layers(L);
  int64_t width = input.size(-1);
  // The full index check runs once per (plan, row_ptr, col_idx) state (validated.h).
  const bool structure_known_valid = known_valid({&plan, &row_ptr, &col_idx}, 0);
  if (!structure_known_valid) count_index_check();
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* q = p + l * kPlanCols;
    Layer& y = layers[l];
    y = Layer{q[0], q[1], q[2], q[3], q[4], q[5] == 1, 0};
    TORCH_CHECK(y.in == width, op, ": layer ", l, " has in_features ", y.in, " but its input has width ", width,
                l == 0 ? " (input.shape[-1])" : " (the previous layer's out_features)");
    // Every comparison below is arranged so that no term can overflow, whatever the plan
    // holds (out_features < row_ptr length bounds every later sum).
    TORCH_CHECK(y.out >= 0 && y.out < row_ptr.size(0) && (q[5] == 0 || q[5] == 1), op, ": layer ", l,
                " has out_features ", y.out, " and activation ", q[5],
                "; expected 0 <= out_features < row_ptr length (", row_ptr.size(0),
                ") and activation 0 (none) or 1 (ReLU)");
    TORCH_CHECK(y.rp_off >= 0 && y.rp_off <= row_ptr.size(0) - 1 - y.out, op, ": layer ", l,
                " needs out_features + 1 = ", y.out + 1, " row_ptr entries from offset ", y.rp_off, ", row_ptr has ",
                row_ptr.size(0), " entries");
    const int32_t* lrp = rp + y.rp_off;
    TORCH_CHECK(lrp[0] == 0, op, ": layer ", l, ": its row_ptr must start at 0, got ", lrp[0]);
    y.nnz = lrp[y.out];
    TORCH_CHECK(y.nnz_off >= 0 && y.nnz >= 0 && y.nnz_off <= col_idx.size(0) - y.nnz, op, ": layer ", l, " needs ",
                y.nnz, " col_idx entries from offset ", y.nnz_off, ", col_idx has ", col_idx.size(0), " entries");
    TORCH_CHECK(y.bias_off == -1 || (y.bias_off >= 0 && y.bias_off <= bias.size(0) - y.out), op, ": layer ", l,
                " needs ", y.out, " bias entries from offset ", y.bias_off, ", bias has ", bias.size(0),
                " entries (bias offset -1 means no bias)");
    TORCH_CHECK(col_idx.scalar_type() == at::kInt || y.in <= 32767, op, ": layer ", l, " has in_features ", y.in,
                ", which int16 col_idx cannot index; use int32");
    if (structure_known_valid) {
      width = y.out;
      continue;
    }
    mk::CsrCheck c;
    if (col_idx.scalar_type() == at::kShort) {
      c = mk::check_csr(lrp, y.out, col_idx.data_ptr<int16_t>() + y.nnz_off, y.in);
    } else {
      c = mk::check_csr(lrp, y.out, col_idx.data_ptr<int32_t>() + y.nnz_off, y.in);
    }
    TORCH_CHECK(c.fault != mk::CsrFault::Decreasing, op, ": layer ", l, ": row_ptr decreases after row ", c.where);
    TORCH_CHECK(c.fault != mk::CsrFault::ColumnOutOfRange, op, ": layer ", l, ": col_idx entry ", c.where,
                " is outside [0, in_features = ", y.in, ")");
    width = y.out;
  }
  if (!structure_known_valid) remember_valid({&plan, &row_ptr, &col_idx}, 0);
  TORCH_CHECK(out_features == width, op, ": out_features (", out_features, ") must equal the last layer's (", width,
              ")");
  return layers;
}

constexpr size_t kKeepScratchBytes = size_t(64) << 20;

// Per-thread scratch buffer `slot` (0 or 1) of at least n elements, reused across calls;
// buffers over kKeepScratchBytes are released at the next call.
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<T> buffers[2];
  std::vector<T>& b = buffers[slot];
  if (b.size() * sizeof(T) > kKeepScratchBytes) std::vector<T>().swap(b);
  if (b.size() < static_cast<size_t>(n)) {
    std::vector<T>().swap(b);
    b.resize(static_cast<size_t>(n));
  }
  return b.data();
}

template <typename T, typename I>
struct Chain {
  const std::vector<Layer>& layers;
  const int32_t* rp;
  const I* ci;
  const T* val;
  const T* bias;

  const int32_t* layer_rp(const Layer& y) const { return rp + y.rp_off; }
  const I* layer_ci(const Layer& y) const { return ci + y.nnz_off; }
  const T* layer_val(const Layer& y) const { return val + y.nnz_off; }
  const T* layer_bias(const Layer& y) const { return y.bias_off < 0 ? nullptr : bias + y.bias_off; }

  // Row-major activations h [B, layers[l0].in] through layers l0.. into out [B, last out].
  void rows(std::vector<T> h, int64_t B, size_t l0, T* out) const {
    std::vector<T> next;
    for (size_t l = l0; l < layers.size(); ++l) {
      const Layer& y = layers[l];
      const bool last = l + 1 == layers.size();
      if (!last) next.assign(B * y.out, T(0));
      T* dst = last ? out : next.data();
      const int32_t* lrp = layer_rp(y);
      for (int64_t b = 0; b < B; ++b) {
        const T* x = h.data() + b * y.in;
        T* o = dst + b * y.out;
        at::parallel_for(0, y.out, layer_grain(y.nnz, y.out, kSpmvEntryCost), [&](int64_t r0, int64_t r1) {
          mk::spmv(x, lrp, layer_ci(y), layer_val(y), y.nnz, y.in, layer_bias(y), o, r0, r1);
        });
      }
      mk::nonfinite_fixup(h.data(), y.in, y.in, lrp, layer_ci(y), y.nnz, y.out, dst, y.out, 0, B);
      sm::relu_all_finite(dst, B * y.out, y.relu);
      if (!last) h.swap(next);
    }
  }

  // Batched: the chain runs on transposed activations [width, nbp] (batch contiguous,
  // padded to a multiple of mk::kBatchPad), so one transpose in and one out serve every layer.
  void batched(const T* x, int64_t B, T* out) const {
    const int64_t nbp = (B + mk::kBatchPad - 1) / mk::kBatchPad * mk::kBatchPad;
    const int64_t K0 = layers[0].in;
    int64_t widest = K0;
    for (const Layer& y : layers) widest = std::max(widest, y.out);
    // Two activation buffers, written before they are read. Kept per thread between calls
    // (up to kKeepScratchBytes each): fresh large allocations are new pages, and faulting
    // them in cost more than the products for a small MLP at batch 256.
    T* ht = scratch<T>(0, widest * nbp);
    T* next = scratch<T>(1, widest * nbp);
    at::parallel_for(0, K0, std::max<int64_t>(16, kGrainWork / nbp),
                     [&](int64_t c0, int64_t c1) { mk::transpose_pad(x, K0, B, nbp, K0, ht, nbp, c0, c1); });
    bool finite = sm::relu_all_finite(ht, K0 * nbp, false);
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& y = layers[l];
      if (!finite) {
        // Rare: a non-finite activation. Finish row by row, where the dense semantics of
        // NaN / inf against pruned weights are applied per row.
        std::vector<T> h(B * y.in);
        at::parallel_for(0, B, std::max<int64_t>(16, kGrainWork / std::max<int64_t>(y.in, 1)),
                         [&](int64_t b0, int64_t b1) { mk::transpose_pad(ht, nbp, y.in, y.in, B, h.data(), y.in, b0, b1); });
        rows(std::move(h), B, l, out);
        return;
      }
      const int32_t* lrp = layer_rp(y);
      std::atomic<bool> all_finite{true};
      at::parallel_for(0, y.out, layer_grain(y.nnz, y.out, nbp), [&](int64_t r0, int64_t r1) {
        mk::spmm_t(ht, nbp, nbp, lrp, layer_ci(y), layer_val(y), y.nnz, y.in, layer_bias(y), next, nbp, r0, r1);
        if (!sm::relu_all_finite(next + r0 * nbp, (r1 - r0) * nbp, y.relu)) all_finite = false;
      });
      finite = all_finite;
      std::swap(ht, next);
    }
    const int64_t N = layers.back().out;
    at::parallel_for(0, B, std::max<int64_t>(16, kGrainWork / std::max<int64_t>(N, 1)),
                     [&](int64_t b0, int64_t b1) { mk::transpose_pad(ht, nbp, N, N, B, out, N, b0, b1); });
  }
};

Tensor sparse_mlp(const Tensor& input, const Tensor& plan, const Tensor& values, const Tensor& row_ptr,
                  const Tensor& col_idx, const Tensor& bias, int64_t out_features) {
  const std::vector<Layer> layers = read_plan(input, plan, values, row_ptr, col_idx, bias, out_features);
  const int64_t K0 = input.size(-1);
  const Tensor x2d = input.reshape({-1, K0}).contiguous();
  const int64_t B = x2d.size(0);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
  shape.push_back(out_features);
  Tensor y = at::empty(shape, input.options());
  if (B == 0 || out_features == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "_sparse_mlp", [&] {
    auto run = [&](auto* ci) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(ci)>>;
      const Chain<scalar_t, I> chain{layers, row_ptr.data_ptr<int32_t>(), ci, values.data_ptr<scalar_t>(),
                                     bias.data_ptr<scalar_t>()};
      const scalar_t* x = x2d.data_ptr<scalar_t>();
      if (B <= kRowPathMaxBatch) chain.rows(std::vector<scalar_t>(x, x + B * K0), B, 0, y.data_ptr<scalar_t>());
      else chain.batched(x, B, y.data_ptr<scalar_t>());
    };
    if (col_idx.scalar_type() == at::kShort) run(col_idx.data_ptr<int16_t>());
    else run(col_idx.data_ptr<int32_t>());
  });
  return y;
}

// ------------------------------------------------------------ sparse-codebook chain
//   _sparse_codebook_mlp(input, plan, codebooks, row_ptr, col_idx, codes, bias, out_features)
//
// The same chain for pruned + shared layers in the sparse-codebook layout
// (kernels/cpu/sparse_codebook_linear.h: CSR positions, one code per kept weight, a
// codebook). plan is int64 [L, 9], one row per layer:
//   in_features, out_features, row_ptr offset, col_idx offset, codes offset (bytes),
//   codebook offset, num_clusters K (codes 4-bit packed when K <= 16, else one byte each),
//   bias offset (-1: no bias), activation (0: none, 1: ReLU).
// Each layer's codes start on a byte boundary. Checks as for _sparse_mlp: the plan on every
// call (without overflow), every index (row_ptr order, columns, codes < K) once per
// (plan, row_ptr, col_idx, codes) state. The products are the per-layer op's kernels
// (batch-1 GEMV below kScMaxRowBatch rows, the batched kernel on transposed activations
// above), so a chain gives what the per-layer op calls give, including for non-finite
// inputs (a pruned weight reads nothing, as in sparse_codebook_linear).
namespace sck = torchslim::cpu::sck;

constexpr int64_t kScPlanCols = 9;
// The per-layer op's switch to its batched kernel (kSpmvMaxBatch in sparse_codebook_linear.cpp).
constexpr int64_t kScMaxRowBatch = 4;
// Tag of the structure check: the masked tags are >= 0, the per-layer codebook ones <= -2.
constexpr int64_t kScCheckTag = -1;

struct ScLayer {
  sck::Structure s;
  int64_t nnz, cb_off, bias_off;
  bool relu;
};

std::vector<ScLayer> read_sc_plan(const Tensor& input, const Tensor& plan, const Tensor& codebooks,
                                  const Tensor& row_ptr, const Tensor& col_idx, const Tensor& codes, const Tensor& bias,
                                  int64_t out_features) {
  const char* op = "_sparse_codebook_mlp";
  check_chain_arguments(op, input, plan, kScPlanCols, row_ptr, col_idx);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.is_contiguous(), op,
              ": codes must be a contiguous 1-D uint8 tensor, got ", codes.scalar_type(), " of shape ", codes.sizes());
  TORCH_CHECK(codebooks.scalar_type() == input.scalar_type() && codebooks.dim() == 1 && codebooks.is_contiguous(), op,
              ": codebooks must be a contiguous 1-D ", input.scalar_type(), " tensor, got ", codebooks.scalar_type(),
              " of shape ", codebooks.sizes());
  TORCH_CHECK(bias.scalar_type() == input.scalar_type() && bias.dim() == 1 && bias.is_contiguous(), op,
              ": bias must be a contiguous 1-D ", input.scalar_type(), " tensor, got ", bias.scalar_type(),
              " of shape ", bias.sizes());
  for (const Tensor* t : {&input, &codebooks, &row_ptr, &col_idx, &codes, &bias}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ", t->device());
  }
  const int64_t L = plan.size(0);
  const int64_t* p = plan.data_ptr<int64_t>();
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const bool col32 = col_idx.scalar_type() == at::kInt;
  const auto* ci = static_cast<const char*>(col_idx.const_data_ptr());
  const uint8_t* cd = codes.data_ptr<uint8_t>();
  std::vector<ScLayer> layers(L);
  int64_t width = input.size(-1);
  const bool structure_known_valid = known_valid({&plan, &row_ptr, &col_idx, &codes}, kScCheckTag);
  if (!structure_known_valid) count_index_check();
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* q = p + l * kScPlanCols;
    const int64_t in = q[0], out = q[1], rp_off = q[2], nnz_off = q[3], codes_off = q[4], cb_off = q[5], K = q[6],
                  bias_off = q[7], act = q[8];
    TORCH_CHECK(in == width, op, ": layer ", l, " has in_features ", in, " but its input has width ", width,
                l == 0 ? " (input.shape[-1])" : " (the previous layer's out_features)");
    // Arranged so that no term can overflow, whatever the plan holds.
    TORCH_CHECK(out >= 0 && out < row_ptr.size(0) && (act == 0 || act == 1), op, ": layer ", l, " has out_features ",
                out, " and activation ", act, "; expected 0 <= out_features < row_ptr length (", row_ptr.size(0),
                ") and activation 0 (none) or 1 (ReLU)");
    TORCH_CHECK(rp_off >= 0 && rp_off <= row_ptr.size(0) - 1 - out, op, ": layer ", l, " needs out_features + 1 = ",
                out + 1, " row_ptr entries from offset ", rp_off, ", row_ptr has ", row_ptr.size(0), " entries");
    const int32_t* lrp = rp + rp_off;
    TORCH_CHECK(lrp[0] == 0, op, ": layer ", l, ": its row_ptr must start at 0, got ", lrp[0]);
    const int64_t nnz = lrp[out];
    TORCH_CHECK(nnz_off >= 0 && nnz >= 0 && nnz_off <= col_idx.size(0) - nnz, op, ": layer ", l, " needs ", nnz,
                " col_idx entries from offset ", nnz_off, ", col_idx has ", col_idx.size(0), " entries");
    TORCH_CHECK(K >= 1 && K <= 256, op, ": layer ", l, " has num_clusters ", K, "; expected 1..256");
    const bool packed = K <= 16;
    const int64_t ncodes = packed ? (nnz + 1) / 2 : nnz;
    TORCH_CHECK(codes_off >= 0 && codes_off <= codes.size(0) - ncodes, op, ": layer ", l, " needs ", ncodes,
                packed ? " packed 4-bit" : " one-byte", " codes bytes from offset ", codes_off, ", codes has ",
                codes.size(0), " bytes");
    TORCH_CHECK(cb_off >= 0 && cb_off <= codebooks.size(0) - K, op, ": layer ", l, " needs ", K,
                " codebook entries from offset ", cb_off, ", codebooks has ", codebooks.size(0), " entries");
    TORCH_CHECK(bias_off == -1 || (bias_off >= 0 && bias_off <= bias.size(0) - out), op, ": layer ", l, " needs ",
                out, " bias entries from offset ", bias_off, ", bias has ", bias.size(0),
                " entries (bias offset -1 means no bias)");
    TORCH_CHECK(col32 || in <= 32767, op, ": layer ", l, " has in_features ", in,
                ", which int16 col_idx cannot index; use int32");
    ScLayer& y = layers[l];
    y.s.row_ptr = lrp;
    y.s.col = ci + nnz_off * (col32 ? 4 : 2);
    y.s.col32 = col32;
    y.s.codes = cd + codes_off;
    y.s.packed = packed;
    y.s.rows = out;
    y.s.cols = in;
    y.s.num_clusters = static_cast<int>(K);
    y.s.nnz = nnz;  // from the plan (checked against the tensors' sizes): the kernels' read bound
    y.nnz = nnz;
    y.cb_off = cb_off;
    y.bias_off = bias_off;
    y.relu = act == 1;
    width = out;
    if (structure_known_valid) continue;
    sck::Check c = sck::check_row_ptr(y.s, nnz);
    TORCH_CHECK(c.fault != sck::Fault::Decreasing, op, ": layer ", l, ": row_ptr decreases after row ", c.where,
                " (to ", c.value, ")");
    TORCH_CHECK(c.fault == sck::Fault::None, op, ": layer ", l, ": invalid row_ptr at row ", c.where);
    c = sck::check_entries(y.s, 0, nnz);
    TORCH_CHECK(c.fault != sck::Fault::ColumnOutOfRange, op, ": layer ", l, ": col_idx entry ", c.where, " is ",
                c.value, ", outside [0, in_features = ", in, ")");
    TORCH_CHECK(c.fault != sck::Fault::CodeOutOfRange, op, ": layer ", l, ": codes entry ", c.where, " is ", c.value,
                " but the layer has only ", K, " codebook entries (valid codes are 0..", K - 1, ")");
    TORCH_CHECK(c.fault == sck::Fault::None, op, ": layer ", l, ": invalid structure at entry ", c.where);
  }
  if (!structure_known_valid) remember_valid({&plan, &row_ptr, &col_idx, &codes}, kScCheckTag);
  TORCH_CHECK(out_features == width, op, ": out_features (", out_features, ") must equal the last layer's (", width,
              ")");
  return layers;
}

template <typename T>
struct ScChain {
  const std::vector<ScLayer>& layers;
  const T* codebooks;
  const T* bias;

  const T* layer_bias(const ScLayer& y) const { return y.bias_off < 0 ? nullptr : bias + y.bias_off; }
  // The layer's codebook padded to 256 entries (the kernels' table: no code reads outside it).
  std::array<T, 256> table(const ScLayer& y) const {
    std::array<T, 256> t{};
    std::copy(codebooks + y.cb_off, codebooks + y.cb_off + y.s.num_clusters, t.begin());
    return t;
  }

  // Row by row (the batch-1 kernel), x [B, layers[0].in] into out [B, last out].
  void rows(const T* x, int64_t B, T* out) const {
    std::vector<T> h(x, x + B * layers[0].s.cols), next;
    for (size_t l = 0; l < layers.size(); ++l) {
      const ScLayer& y = layers[l];
      const bool last = l + 1 == layers.size();
      if (!last) next.resize(B * y.s.rows);
      T* dst = last ? out : next.data();
      const std::array<T, 256> t = table(y);
      for (int64_t b = 0; b < B; ++b) {
        at::parallel_for(0, y.s.rows, layer_grain(y.nnz, y.s.rows, kSpmvEntryCost), [&](int64_t r0, int64_t r1) {
          sck::spmv(y.s, t.data(), h.data() + b * y.s.cols, layer_bias(y), dst + b * y.s.rows, r0, r1);
        });
      }
      sm::relu_all_finite(dst, B * y.s.rows, y.relu);
      if (!last) h.swap(next);
    }
  }

  // Batched: transposed activations [width, nbp] through the whole chain (one transpose
  // in, one out), as the per-layer op's batched path does per layer.
  void batched(const T* x, int64_t B, T* out) const {
    const int64_t nbp = (B + sck::kBatchPad - 1) / sck::kBatchPad * sck::kBatchPad;
    const int64_t K0 = layers[0].s.cols;
    int64_t widest = K0;
    for (const ScLayer& y : layers) widest = std::max(widest, y.s.rows);
    T* ht = scratch<T>(0, widest * nbp);
    T* next = scratch<T>(1, widest * nbp);
    at::parallel_for(0, K0, std::max<int64_t>(16, kGrainWork / nbp),
                     [&](int64_t c0, int64_t c1) { sck::transpose_pad(x, K0, B, nbp, ht, nbp, c0, c1); });
    for (const ScLayer& y : layers) {
      const std::array<T, 256> t = table(y);
      at::parallel_for(0, y.s.rows, layer_grain(y.nnz, y.s.rows, nbp), [&](int64_t r0, int64_t r1) {
        sck::spmm_t(y.s, t.data(), ht, nbp, nbp, layer_bias(y), next, nbp, r0, r1);
        sm::relu_all_finite(next + r0 * nbp, (r1 - r0) * nbp, y.relu);
      });
      std::swap(ht, next);
    }
    const int64_t N = layers.back().s.rows;
    at::parallel_for(0, B, std::max<int64_t>(16, kGrainWork / std::max<int64_t>(N, 1)),
                     [&](int64_t b0, int64_t b1) { sck::transpose_pad(ht, nbp, N, N, out, N, b0, b1); });
  }
};

Tensor sparse_codebook_mlp(const Tensor& input, const Tensor& plan, const Tensor& codebooks, const Tensor& row_ptr,
                           const Tensor& col_idx, const Tensor& codes, const Tensor& bias, int64_t out_features) {
  const std::vector<ScLayer> layers =
      read_sc_plan(input, plan, codebooks, row_ptr, col_idx, codes, bias, out_features);
  const int64_t K0 = input.size(-1);
  int64_t B = 1;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) B *= input.size(d);
  const Tensor x2d = input.reshape({B, K0}).contiguous();
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
  shape.push_back(out_features);
  Tensor y = at::empty(shape, input.options());
  if (B == 0 || out_features == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "_sparse_codebook_mlp", [&] {
    const ScChain<scalar_t> chain{layers, codebooks.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>()};
    if (B < kScMaxRowBatch) chain.rows(x2d.data_ptr<scalar_t>(), B, y.data_ptr<scalar_t>());
    else chain.batched(x2d.data_ptr<scalar_t>(), B, y.data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace

void define_sparse_mlp_ops(torch::Library& m) {
  m.def("_sparse_mlp(Tensor input, Tensor plan, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor bias, "
        "int out_features) -> Tensor");
  m.def("_sparse_codebook_mlp(Tensor input, Tensor plan, Tensor codebooks, Tensor row_ptr, Tensor col_idx, "
        "Tensor codes, Tensor bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("_sparse_mlp", &sparse_mlp);
  m.impl("_sparse_codebook_mlp", &sparse_codebook_mlp);
}

}  // namespace torchslim
