// Glue for the masked sparse linear op: argument checks, allocation, dtype/device dispatch
// and registration. The only file of the op that touches at::Tensor.
//
// Public op:
//   masked_linear(input, weight, mask, bias)          input @ (weight*mask)^T + bias
//   masked_linear_grad_input(grad_output, weight, mask)     grad_output @ (weight*mask)
//   masked_linear_grad_weight(grad_output, input, mask)     (grad_output^T input) at kept positions
// Structure ops used by torchslim.nn.MaskedSparseLinear, which caches the structure:
//   _masked_structure(mask) -> (row_ptr, col_idx, t_row_ptr, t_col_idx)
//   _masked_structure_perm(row_ptr, col_idx, t_row_ptr) -> t_perm (values_t = values[t_perm])
//   _masked_sddmm(grad_output, input, row_ptr, col_idx) -> dense-shaped dW, zero off the structure
//   _masked_gather(weight, row_ptr, col_idx, transposed) -> values (float32, float64 for float64)
//   _masked_spmm(input, values, row_ptr, col_idx, bias) -> input @ S^T + bias
//   _masked_dense(weight, mask) -> where(mask, weight, 0) (the dense path's weight and gradient)
//   _masked_backward(grad_output, input, values_t, structures, need_input, need_weight)
//       -> (grad_input, grad_weight): one transpose of grad_output serves both; grad_weight
//          is dense-shaped, computed only at the kept positions, zero elsewhere
// The structure ops check shapes, dtypes, devices and the row_ptr end points on every call,
// and every index (row_ptr non-decreasing, col_idx within range, int16 only for extents up
// to 32767) once per structure: a structure that passed is remembered until it is written
// to or freed (validated.h), so a cached structure costs no pass over its indices per call
// while a hand-made or edited one is checked before any kernel reads it. Edits that bypass
// the version counter (.numpy(), .data, another thread mid-call) cannot make a kernel read
// or write out of bounds: the kernels clamp every pointer and index they read (see "Safe
// reads" in kernels/cpu/masked_linear.h; the CUDA kernels do the same).
//
// Masks are user-visible and may change while a call runs (another thread's set_mask or
// load_state_dict): a structure is built from a private snapshot of the mask, so its two
// passes (count, then fill) and its row and column forms see one and the same mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "kernels/cpu/masked_linear.h"
#include "ops/grain.h"
#include "ops/path_rules.h"
#include "ops/registration.h"
#include "ops/validated.h"

#ifdef TORCHSLIM_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "kernels/cuda/masked_linear.h"
#endif

namespace torchslim {
namespace {

using at::Tensor;
namespace mk = torchslim::cpu::masked;

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}
// Values and accumulation: float64 for float64, float32 for every other floating dtype.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
at::ScalarType index_type_for(int64_t extent) { return extent <= 32767 ? at::kShort : at::kInt; }

// ---------------------------------------------------------------- checks

void check_linear_args(const char* op, const Tensor& input, const Tensor& weight, const Tensor& mask,
                       const std::optional<Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got a ", weight.dim(),
              "-D tensor of shape ", weight.sizes());
  TORCH_CHECK(is_floating(weight.scalar_type()), op,
              ": weight must be floating point (float32, float64, bfloat16 or float16), got ", weight.scalar_type());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension [..., in_features], got a 0-D tensor");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), op, ": input and weight must have the same dtype, got input ",
              input.scalar_type(), " and weight ", weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(), op, ": input and weight must be on the same device, got input on ",
              input.device(), " and weight on ", weight.device());
  TORCH_CHECK(input.size(-1) == weight.size(1), op, ": input.shape[-1] (", input.size(-1),
              ") must equal weight.shape[1] = in_features (", weight.size(1), "); input shape ", input.sizes(),
              ", weight shape ", weight.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), op, ": mask must have the shape of weight ", weight.sizes(), ", got ",
              mask.sizes());
  TORCH_CHECK(mask.device() == weight.device(), op, ": mask must be on the device of weight (", weight.device(),
              "), got ", mask.device());
  if (bias.has_value() && bias->defined()) {
    const Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias must be 1-D of length out_features (",
                weight.size(0), "), got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == weight.scalar_type(), op, ": bias must have the dtype of weight (",
                weight.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == weight.device(), op, ": bias must be on the device of weight (", weight.device(),
                "), got ", b.device());
  }
}

void check_structure(const char* op, const Tensor& row_ptr, const Tensor& col_idx, const at::Device& device) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kInt, op,
              ": row_ptr must be a 1-D int32 tensor of length rows + 1, got ", row_ptr.scalar_type(), " of shape ",
              row_ptr.sizes());
  TORCH_CHECK(col_idx.dim() == 1 && (col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt), op,
              ": col_idx must be a 1-D int16 or int32 tensor, got ", col_idx.scalar_type(), " of shape ",
              col_idx.sizes());
  TORCH_CHECK(row_ptr.device() == device && col_idx.device() == device, op,
              ": row_ptr and col_idx must be on the device of the data (", device, "), got ", row_ptr.device(),
              " and ", col_idx.device());
  TORCH_CHECK(row_ptr.is_contiguous() && col_idx.is_contiguous(), op, ": row_ptr and col_idx must be contiguous");
  if (device.is_cpu()) {
    const int32_t* rp = row_ptr.data_ptr<int32_t>();
    const int64_t rows = row_ptr.size(0) - 1;
    TORCH_CHECK(rp[0] == 0 && rp[rows] == col_idx.size(0), op, ": row_ptr must start at 0 and end at nnz = ",
                col_idx.size(0), ", got ", rp[0], " and ", rp[rows]);
  }
}

void check_values(const char* op, const Tensor& values, const Tensor& col_idx, at::ScalarType data_type,
                  const at::Device& device) {
  TORCH_CHECK(values.dim() == 1 && values.size(0) == col_idx.size(0), op,
              ": values must be 1-D with one entry per col_idx entry (", col_idx.size(0), "), got shape ",
              values.sizes());
  TORCH_CHECK(values.scalar_type() == acc_type(data_type), op, ": values must be ", acc_type(data_type),
              " for ", data_type, " data, got ", values.scalar_type());
  TORCH_CHECK(values.device() == device, op, ": values must be on ", device, ", got ", values.device());
}

// ---------------------------------------------------------------- CPU building blocks

// CSR of the mask by rows (transposed=false) or by columns (transposed=true). mask must be a
// contiguous snapshot no one else can write (see snapshot_mask): the build reads it twice.
std::tuple<Tensor, Tensor> build_structure_cpu(const Tensor& mask, bool transposed) {
  TORCH_INTERNAL_ASSERT(mask.is_contiguous());
  const int64_t rows = mask.size(0), cols = mask.size(1);
  const int64_t n = transposed ? cols : rows;   // rows of the structure
  const int64_t extent = transposed ? rows : cols;  // range of its indices
  Tensor ptr = at::empty({n + 1}, mask.options().dtype(at::kInt));
  int32_t* p = ptr.data_ptr<int32_t>();
  const bool* m = mask.data_ptr<bool>();
  p[0] = 0;
  if (!transposed) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(cols, 1)),
                     [&](int64_t r0, int64_t r1) { mk::count_rows(m, cols, p + 1, r0, r1); });
  } else {
    at::parallel_for(0, cols, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(rows, 1)),
                     [&](int64_t c0, int64_t c1) { mk::count_cols(m, rows, cols, p + 1, c0, c1); });
  }
  int64_t total = 0;
  for (int64_t i = 1; i <= n; ++i) {
    total += p[i];
    TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(), "masked_linear: more than 2^31-1 kept weights");
    p[i] = static_cast<int32_t>(total);
  }
  Tensor idx = at::empty({total}, mask.options().dtype(index_type_for(extent)));
  auto fill = [&](auto* out) {
    if (!transposed) {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(cols, 1)),
                       [&](int64_t r0, int64_t r1) { mk::fill_rows(m, cols, p, out, r0, r1); });
    } else {
      at::parallel_for(0, cols, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(rows, 1)),
                       [&](int64_t c0, int64_t c1) { mk::fill_cols(m, rows, cols, p, out, c0, c1); });
    }
  };
  if (idx.scalar_type() == at::kShort) fill(idx.data_ptr<int16_t>());
  else fill(idx.data_ptr<int32_t>());
  return {ptr, idx};
}

template <typename F>
void with_index(const Tensor& col_idx, F&& f) {
  if (col_idx.scalar_type() == at::kShort) f(col_idx.data_ptr<int16_t>());
  else f(col_idx.data_ptr<int32_t>());
}

template <typename F>
void with_acc(at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) f(double(0));
  else f(float(0));
}

// Every index of a structure within range before any kernel reads it (see the header
// comment); extent is the range of col_idx.
void check_indices(const char* op, const Tensor& row_ptr, const Tensor& col_idx, int64_t extent) {
  // int16 indices only where every valid index fits: a negative int16 read as unsigned
  // must not pass for an in-range one.
  TORCH_CHECK(col_idx.scalar_type() == at::kInt || extent <= 32767, op, ": col_idx is int16 but its extent is ",
              extent, "; int16 indices serve extents up to 32767, use int32");
  if (known_valid({&row_ptr, &col_idx}, extent)) return;
  count_index_check();
  const int64_t rows = row_ptr.size(0) - 1;
  if (row_ptr.device().is_cpu()) {
    mk::CsrCheck c;
    with_index(col_idx, [&](auto* ci) { c = mk::check_csr(row_ptr.data_ptr<int32_t>(), rows, ci, extent); });
    TORCH_CHECK(c.fault != mk::CsrFault::FirstNotZero, op, ": row_ptr must start at 0");
    TORCH_CHECK(c.fault != mk::CsrFault::Decreasing, op, ": row_ptr decreases after row ", c.where);
    TORCH_CHECK(c.fault != mk::CsrFault::ColumnOutOfRange, op, ": col_idx entry ", c.where,
                " is outside [0, ", extent, ")");
  } else {
    // Device structures: a few reductions, synchronising once per structure.
    TORCH_CHECK(row_ptr[0].item<int64_t>() == 0 && row_ptr[rows].item<int64_t>() == col_idx.size(0), op,
                ": row_ptr must start at 0 and end at nnz = ", col_idx.size(0));
    TORCH_CHECK(rows == 0 || (row_ptr.diff() >= 0).all().item<bool>(), op, ": row_ptr must be non-decreasing");
    if (col_idx.numel() > 0) {
      const auto [lo, hi] = at::aminmax(col_idx);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < extent, op, ": col_idx entries must be in [0, ",
                  extent, "), got [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
  }
  remember_valid({&row_ptr, &col_idx}, extent);
}


// values[k] = weight[r, col[k]] (or weight[col[k], r] when transposed), in the accumulation dtype.
Tensor gather_cpu(const Tensor& weight, const Tensor& row_ptr, const Tensor& col_idx, bool transposed) {
  const at::ScalarType acc = acc_type(weight.scalar_type());
  const Tensor w = weight.scalar_type() == acc ? weight.contiguous() : weight.to(acc).contiguous();
  Tensor values = at::empty({col_idx.size(0)}, w.options());
  const int64_t n = row_ptr.size(0) - 1;
  const int64_t ld = w.size(1);
  const int64_t nnz = col_idx.size(0);
  const int64_t extent = transposed ? w.size(0) : w.size(1);
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  with_acc(acc, [&](auto zero) {
    using T = decltype(zero);
    const T* wp = w.data_ptr<T>();
    T* vp = values.data_ptr<T>();
    with_index(col_idx, [&](auto* ci) {
      at::parallel_for(0, n, grain_rows(nnz, n, 1), [&](int64_t r0, int64_t r1) {
        if (transposed) mk::gather(wp, 1, ld, rp, ci, nnz, extent, vp, r0, r1);
        else mk::gather(wp, ld, 1, rp, ci, nnz, extent, vp, r0, r1);
      });
    });
  });
  return values;
}

// x2d [B, K] -> X^T [K, nbp] in the accumulation dtype, batch padded with zeros.
Tensor transpose_in(const Tensor& x2d, at::ScalarType acc, int64_t nbp) {
  const Tensor x = (x2d.scalar_type() == acc ? x2d : x2d.to(acc)).contiguous();
  const int64_t B = x.size(0), K = x.size(1);
  Tensor xt = at::empty({K, nbp}, x.options());
  with_acc(acc, [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    T* op = xt.data_ptr<T>();
    at::parallel_for(0, K, std::max<int64_t>(16, kGrainWork / std::max<int64_t>(nbp, 1)),
                     [&](int64_t c0, int64_t c1) { mk::transpose_pad(xp, K, B, nbp, K, op, nbp, c0, c1); });
  });
  return xt;
}

// Y^T [N, nbp] -> Y [B, N], both in the accumulation dtype.
Tensor transpose_out(const Tensor& yt, int64_t B) {
  const int64_t N = yt.size(0), ld = yt.size(1);
  Tensor y = at::empty({B, N}, yt.options());
  with_acc(yt.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* ip = yt.data_ptr<T>();
    T* op = y.data_ptr<T>();
    at::parallel_for(0, B, std::max<int64_t>(16, kGrainWork / std::max<int64_t>(N, 1)),
                     [&](int64_t b0, int64_t b1) { mk::transpose_pad(ip, ld, N, N, B, op, N, b0, b1); });
  });
  return y;
}

// y [B, N] (accumulation dtype) = x @ S^T + bias from x (accumulation dtype, contiguous
// [B, K]) and, for B > 1, its padded transpose xt [K, nbp].
Tensor spmm_acc(const Tensor& x, const Tensor& xt, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                const Tensor& b) {
  const at::ScalarType acc = x.scalar_type();
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t N = row_ptr.size(0) - 1;
  const int64_t nnz = col_idx.size(0);
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  Tensor y;
  if (B == 1) {
    y = at::empty({1, N}, x.options());
    with_acc(acc, [&](auto zero) {
      using T = decltype(zero);
      const T* xp = x.data_ptr<T>();
      const T* vp = values.data_ptr<T>();
      const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
      T* yp = y.data_ptr<T>();
      with_index(col_idx, [&](auto* ci) {
        at::parallel_for(0, N, grain_rows(nnz, N, 1),
                         [&](int64_t r0, int64_t r1) { mk::spmv(xp, rp, ci, vp, nnz, K, bp, yp, r0, r1); });
      });
    });
  } else {
    const int64_t nbp = xt.size(1);
    Tensor yt = at::empty({N, nbp}, xt.options());
    with_acc(acc, [&](auto zero) {
      using T = decltype(zero);
      const T* xp = xt.data_ptr<T>();
      const T* vp = values.data_ptr<T>();
      const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
      T* yp = yt.data_ptr<T>();
      with_index(col_idx, [&](auto* ci) {
        at::parallel_for(0, N, grain_rows(nnz, N, nbp), [&](int64_t r0, int64_t r1) {
          mk::spmm_t(xp, nbp, nbp, rp, ci, vp, nnz, K, bp, yp, nbp, r0, r1);
        });
      });
    });
    y = transpose_out(yt, B);
  }
  // Non-finite inputs: give the outputs a dense product would give (see nonfinite_fixup).
  with_acc(acc, [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    with_index(col_idx, [&](auto* ci) {
      at::parallel_for(0, B, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
        mk::nonfinite_fixup(xp, K, K, rp, ci, nnz, N, yp, N, b0, b1);
      });
    });
  });
  return y;
}

Tensor to_acc_contiguous(const Tensor& t) {
  const at::ScalarType acc = acc_type(t.scalar_type());
  return (t.scalar_type() == acc ? t : t.to(acc)).contiguous();
}

// y2d [B, N] = x2d [B, K] @ S^T + bias, S the [N, K] CSR (values in the accumulation dtype).
Tensor spmm_cpu(const Tensor& x2d, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                const std::optional<Tensor>& bias) {
  const at::ScalarType dtype = x2d.scalar_type();
  const int64_t B = x2d.size(0);
  const int64_t N = row_ptr.size(0) - 1;
  if (B == 0 || N == 0) return at::empty({B, N}, x2d.options());
  Tensor b;
  if (bias.has_value() && bias->defined()) b = to_acc_contiguous(*bias);
  const Tensor x = to_acc_contiguous(x2d);
  const Tensor xt = B == 1 ? Tensor() : transpose_in(x, x.scalar_type(), round_up(B, mk::kBatchPad));
  const Tensor y = spmm_acc(x, xt, values, row_ptr, col_idx, b);
  return y.scalar_type() == dtype ? y : y.to(dtype);
}

// Both gradients of the sparse layer from one transpose of grad_output (and of input).
std::tuple<Tensor, Tensor> backward_cpu(const Tensor& g2d, const Tensor& x2d, const Tensor& values_t,
                                        const Tensor& row_ptr, const Tensor& col_idx, const Tensor& t_row_ptr,
                                        const Tensor& t_col_idx, bool need_input, bool need_weight) {
  const at::ScalarType dtype = x2d.scalar_type();
  const int64_t B = x2d.size(0), K = x2d.size(1), N = g2d.size(1);
  Tensor grad_input = at::empty({0}, x2d.options()), grad_weight = at::empty({0}, x2d.options());
  if (B == 0) {
    if (need_input) grad_input = at::zeros({0, K}, x2d.options());
    if (need_weight) grad_weight = at::zeros({N, K}, x2d.options());
    return {grad_input, grad_weight};
  }
  const int64_t nbp = round_up(B, mk::kBatchPad);
  const Tensor g = to_acc_contiguous(g2d);
  const Tensor gt = (B == 1 && !need_weight) ? Tensor() : transpose_in(g, g.scalar_type(), nbp);
  if (need_input) {
    const Tensor dx = spmm_acc(g, gt, values_t, t_row_ptr, t_col_idx, Tensor());
    grad_input = dx.scalar_type() == dtype ? dx : dx.to(dtype);
  }
  if (need_weight) {
    if (col_idx.size(0) == 0) {
      grad_weight = at::zeros({N, K}, x2d.options());
    } else {
      const Tensor xt = transpose_in(to_acc_contiguous(x2d), g.scalar_type(), nbp);
      Tensor dw = at::empty({N, K}, xt.options());
      const int32_t* rp = row_ptr.data_ptr<int32_t>();
      with_acc(g.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        const T* xp = xt.data_ptr<T>();
        const T* gp = gt.data_ptr<T>();
        T* dp = dw.data_ptr<T>();
        with_index(col_idx, [&](auto* ci) {
          at::parallel_for(0, N, grain_rows(col_idx.size(0), N, nbp), [&](int64_t r0, int64_t r1) {
            mk::sddmm_t(gp, nbp, xp, nbp, nbp, rp, ci, col_idx.size(0), dp, K, K, r0, r1);
          });
        });
      });
      grad_weight = dw.scalar_type() == dtype ? dw : dw.to(dtype);
    }
  }
  return {grad_input, grad_weight};
}

// dW [N, K] (dtype of x2d): dW[r, c] = sum_b g2d[b, r] x2d[b, c] where S has (r, c), else 0.
Tensor sddmm_cpu(const Tensor& g2d, const Tensor& x2d, const Tensor& row_ptr, const Tensor& col_idx) {
  return std::get<1>(backward_cpu(g2d, x2d, Tensor(), row_ptr, col_idx, Tensor(), Tensor(), false, true));
}

// ---------------------------------------------------------------- dense fallback rule

// The rule of ops/path_rules.h (the same one the Python modules use). `training`: the
// gradient kernels; `dtype`: the weight's.
bool prefer_dense(double density, int64_t batch, int64_t weight_numel, at::ScalarType dtype, bool training = false) {
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  return !rules::masked_sparse_faster(density, batch, weight_numel, training, low);
}

// where(mask, weight, 0) (mask bool, of weight's shape and device): the dense paths' masked
// weight and weight gradient. On the CPU one vectorised select, bit-identical to at::where
// (NaN/inf included) but ~15x faster than its general kernel on 1M floats here.
Tensor masked_dense_weight(const Tensor& weight, const Tensor& mask) {
  if (!weight.device().is_cpu()) return at::where(mask, weight, at::zeros({}, weight.options()));
  const Tensor w = weight.contiguous();
  const Tensor m = mask.contiguous();
  Tensor out = at::empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  auto run = [&](auto zero) {
    using U = decltype(zero);
    const U* wp = static_cast<const U*>(w.const_data_ptr());
    U* op = static_cast<U*>(out.data_ptr());
    const bool* mp = m.const_data_ptr<bool>();
    at::parallel_for(0, n, 1 << 18, [&](int64_t i0, int64_t i1) { mk::masked_copy(wp, mp, op, i0, i1); });
  };
  switch (w.element_size()) {
    case 2: run(uint16_t(0)); break;
    case 4: run(uint32_t(0)); break;
    default: run(uint64_t(0)); break;
  }
  return out;
}

Tensor lead_reshape(const Tensor& y2d, const Tensor& input, int64_t last) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = last;
  return y2d.view(shape);
}

#ifdef TORCHSLIM_WITH_CUDA
// The current CUDA stream of `device` as a cudaStream_t (void*), through the device-generic
// guard interface so that the glue needs no CUDA header.
void* current_stream(const at::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return stream.native_handle();
}

// CUDA structure from ATen ops: nonzero() lists entries in row-major order, which is CSR order.
std::tuple<Tensor, Tensor> build_structure_cuda(const Tensor& mask, bool transposed) {
  const Tensor m = transposed ? mask.t() : mask;
  const int64_t n = m.size(0), extent = m.size(1);
  Tensor counts = m.sum(1, /*keepdim=*/false, at::kInt);
  Tensor ptr = at::zeros({n + 1}, mask.options().dtype(at::kInt));
  ptr.narrow(0, 1, n).copy_(counts.cumsum(0, at::kInt));
  Tensor nz = m.nonzero();
  TORCH_CHECK(nz.size(0) <= std::numeric_limits<int32_t>::max(), "masked_linear: more than 2^31-1 kept weights");
  Tensor idx = nz.select(1, 1).to(index_type_for(extent)).contiguous();
  return {ptr, idx};
}

Tensor gather_cuda(const Tensor& weight, const Tensor& row_ptr, const Tensor& col_idx, bool transposed) {
  const at::ScalarType acc = acc_type(weight.scalar_type());
  const Tensor w = weight.contiguous();
  const int64_t n = row_ptr.size(0) - 1, nnz = col_idx.size(0);
  const int64_t extent = transposed ? w.size(0) : w.size(1);
  if (n == 0 || extent == 0 || nnz == 0) return at::zeros({nnz}, w.options().dtype(acc));
  // Row of each entry by a search of row_ptr, and columns clamped: in range whatever the
  // structure holds now (see "Safe reads" in kernels/cuda/masked_linear.h).
  Tensor rows = at::searchsorted(row_ptr.narrow(0, 1, n), at::arange(nnz, row_ptr.options()), /*out_int32=*/false,
                                 /*right=*/true)
                    .clamp_max_(n - 1);
  Tensor cols = col_idx.to(at::kLong);
  cols.masked_fill_(cols < 0, extent - 1).clamp_max_(extent - 1);  // negative: the last, as on the CPU
  Tensor flat = transposed ? cols * w.size(1) + rows : rows * w.size(1) + cols;
  return w.view(-1).index_select(0, flat).to(acc);
}

cuda::masked::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::masked::DType::F32;
    case at::kHalf: return cuda::masked::DType::F16;
    case at::kBFloat16: return cuda::masked::DType::BF16;
    case at::kDouble: return cuda::masked::DType::F64;
    default: TORCH_CHECK(false, "masked_linear: unsupported CUDA dtype ", t);
  }
}

Tensor spmm_cuda(const Tensor& x2d, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                 const std::optional<Tensor>& bias) {
  const c10::DeviceGuard guard(x2d.device());
  const int64_t B = x2d.size(0), N = row_ptr.size(0) - 1;
  if (B == 0 || N == 0) return at::empty({B, N}, x2d.options());
  Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  // Batch contiguous: X^T [K, B] (for B == 1 that is x itself), Y^T [N, B].
  const Tensor xt = B == 1 ? x2d.contiguous() : x2d.t().contiguous();
  Tensor yt = at::empty({N, B}, x2d.options());
  cuda::masked::spmm_t(cuda_dtype(x2d.scalar_type()), xt.data_ptr(), B, values.data_ptr(), row_ptr.data_ptr<int32_t>(),
                       col_idx.data_ptr(), col_idx.scalar_type() == at::kShort, col_idx.size(0), x2d.size(1),
                       b.defined() ? b.data_ptr() : nullptr, yt.data_ptr(), N, current_stream(x2d.device()));
  return B == 1 ? yt.view({1, N}) : yt.t().contiguous();
}

Tensor sddmm_cuda(const Tensor& g2d, const Tensor& x2d, const Tensor& row_ptr, const Tensor& col_idx) {
  const c10::DeviceGuard guard(x2d.device());
  const int64_t B = x2d.size(0), K = x2d.size(1), N = g2d.size(1);
  Tensor dw = at::zeros({N, K}, x2d.options());
  if (B == 0 || col_idx.size(0) == 0) return dw;
  const Tensor xt = x2d.t().contiguous();
  const Tensor gt = g2d.t().contiguous();
  cuda::masked::sddmm_t(cuda_dtype(x2d.scalar_type()), gt.data_ptr(), xt.data_ptr(), B, N, K,
                        row_ptr.data_ptr<int32_t>(), col_idx.data_ptr(), col_idx.scalar_type() == at::kShort,
                        col_idx.size(0), dw.data_ptr(), current_stream(x2d.device()));
  return dw;
}
#endif

// A private contiguous copy of the mask: every pass of a build reads the same mask even
// if another thread edits the module's mask meanwhile (a bool [out, in] copy is cheap next
// to the build).
Tensor snapshot_mask(const Tensor& mask) { return mask.clone(at::MemoryFormat::Contiguous); }

// CSR of a snapshot (see snapshot_mask).
std::tuple<Tensor, Tensor> build_from_snapshot(const Tensor& snap, bool transposed) {
#ifdef TORCHSLIM_WITH_CUDA
  if (snap.is_cuda()) return build_structure_cuda(snap, transposed);
#endif
  TORCH_CHECK(snap.is_cpu(), "masked_linear: unsupported device ", snap.device());
  return build_structure_cpu(snap, transposed);
}

std::tuple<Tensor, Tensor> build_structure(const Tensor& mask, bool transposed) {
  return build_from_snapshot(snapshot_mask(mask), transposed);
}

Tensor gather_any(const Tensor& weight, const Tensor& row_ptr, const Tensor& col_idx, bool transposed) {
#ifdef TORCHSLIM_WITH_CUDA
  if (weight.is_cuda()) return gather_cuda(weight, row_ptr, col_idx, transposed);
#endif
  return gather_cpu(weight, row_ptr, col_idx, transposed);
}

Tensor spmm_any(const Tensor& x2d, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                const std::optional<Tensor>& bias) {
#ifdef TORCHSLIM_WITH_CUDA
  if (x2d.is_cuda()) return spmm_cuda(x2d, values, row_ptr, col_idx, bias);
#endif
  return spmm_cpu(x2d, values, row_ptr, col_idx, bias);
}

Tensor sddmm_any(const Tensor& g2d, const Tensor& x2d, const Tensor& row_ptr, const Tensor& col_idx) {
#ifdef TORCHSLIM_WITH_CUDA
  if (x2d.is_cuda()) return sddmm_cuda(g2d, x2d, row_ptr, col_idx);
#endif
  return sddmm_cpu(g2d, x2d, row_ptr, col_idx);
}

double mask_density(const Tensor& mask) {
  if (mask.numel() == 0) return 0.0;
  return static_cast<double>(mask.count_nonzero().item<int64_t>()) / static_cast<double>(mask.numel());
}

// ---------------------------------------------------------------- public ops

Tensor masked_linear(const Tensor& input, const Tensor& weight, const Tensor& mask, const std::optional<Tensor>& bias) {
  check_linear_args("masked_linear", input, weight, mask, bias);
  const int64_t N = weight.size(0), K = weight.size(1);
  const Tensor x2d = input.reshape({-1, K});
  const int64_t B = x2d.size(0);
  if (B == 0 || N == 0 || K == 0 || prefer_dense(mask_density(mask), B, mask.numel(), weight.scalar_type())) {
    return at::linear(input, masked_dense_weight(weight, mask), bias.has_value() ? *bias : Tensor());
  }
  auto [row_ptr, col_idx] = build_structure(mask, false);
  const Tensor values = gather_any(weight, row_ptr, col_idx, false);
  return lead_reshape(spmm_any(x2d, values, row_ptr, col_idx, bias), input, N);
}

Tensor masked_linear_grad_input(const Tensor& grad_output, const Tensor& weight, const Tensor& mask) {
  TORCH_CHECK(weight.dim() == 2, "masked_linear_grad_input: weight must be 2-D, got shape ", weight.sizes());
  TORCH_CHECK(grad_output.dim() >= 1 && grad_output.size(-1) == weight.size(0),
              "masked_linear_grad_input: grad_output.shape[-1] must equal out_features (", weight.size(0), "), got shape ",
              grad_output.sizes());
  const Tensor w_t = weight.t();  // reuse the forward checks with the roles of in and out swapped
  check_linear_args("masked_linear_grad_input", grad_output, w_t, mask.t(), std::nullopt);
  const int64_t N = weight.size(0), K = weight.size(1);
  const Tensor g2d = grad_output.reshape({-1, N});
  const int64_t B = g2d.size(0);
  if (B == 0 || N == 0 || K == 0 || prefer_dense(mask_density(mask), B, mask.numel(), weight.scalar_type(), true)) {
    return at::matmul(grad_output, masked_dense_weight(weight, mask));
  }
  auto [t_ptr, t_idx] = build_structure(mask, true);
  const Tensor values_t = gather_any(weight, t_ptr, t_idx, true);
  return lead_reshape(spmm_any(g2d, values_t, t_ptr, t_idx, std::nullopt), grad_output, K);
}

Tensor masked_linear_grad_weight(const Tensor& grad_output, const Tensor& input, const Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool,
              "masked_linear_grad_weight: mask must be a 2-D bool tensor [out_features, in_features], got ",
              mask.scalar_type(), " of shape ", mask.sizes());
  TORCH_CHECK(is_floating(input.scalar_type()) && input.scalar_type() == grad_output.scalar_type(),
              "masked_linear_grad_weight: input and grad_output must share a floating dtype, got ", input.scalar_type(),
              " and ", grad_output.scalar_type());
  TORCH_CHECK(input.device() == grad_output.device() && mask.device() == input.device(),
              "masked_linear_grad_weight: grad_output, input and mask must be on one device, got ", grad_output.device(),
              ", ", input.device(), ", ", mask.device());
  const int64_t N = mask.size(0), K = mask.size(1);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == K, "masked_linear_grad_weight: input.shape[-1] must be in_features (",
              K, "), got shape ", input.sizes());
  TORCH_CHECK(grad_output.dim() >= 1 && grad_output.size(-1) == N,
              "masked_linear_grad_weight: grad_output.shape[-1] must be out_features (", N, "), got shape ",
              grad_output.sizes());
  const Tensor x2d = input.reshape({-1, K});
  const Tensor g2d = grad_output.reshape({-1, N});
  TORCH_CHECK(x2d.size(0) == g2d.size(0), "masked_linear_grad_weight: input and grad_output must have the same number of rows, got ",
              x2d.size(0), " and ", g2d.size(0));
  const int64_t B = x2d.size(0);
  if (B == 0 || N == 0 || K == 0) return at::zeros({N, K}, input.options());
  if (prefer_dense(mask_density(mask), B, mask.numel(), input.scalar_type(), true)) {
    return masked_dense_weight(at::mm(g2d.t(), x2d), mask);
  }
  auto [row_ptr, col_idx] = build_structure(mask, false);
  return sddmm_any(g2d, x2d, row_ptr, col_idx);
}

// ---------------------------------------------------------------- structure ops

std::tuple<Tensor, Tensor, Tensor, Tensor> masked_structure(const Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2, "_masked_structure: mask must be 2-D [out_features, in_features], got shape ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "_masked_structure: mask must be a bool tensor, got ", mask.scalar_type());
  // One snapshot for both forms, so that they describe the same mask.
  const Tensor snap = snapshot_mask(mask);
  auto [ptr, idx] = build_from_snapshot(snap, false);
  auto [t_ptr, t_idx] = build_from_snapshot(snap, true);
  return {ptr, idx, t_ptr, t_idx};
}

// t_perm[j] = position in the row structure of the j-th entry of the column structure, so
// that the transposed values are values[t_perm] (no strided pass over the dense weight).
// Runs once per structure build, so it checks everything on every call: the row structure
// (row_ptr from 0 to nnz, non-decreasing, col_idx in [0, cols)), t_row_ptr (from 0 to nnz,
// non-decreasing) and that t_row_ptr gives every column as many entries as col_idx has.
Tensor masked_structure_perm(const Tensor& row_ptr, const Tensor& col_idx, const Tensor& t_row_ptr) {
  const char* op = "_masked_structure_perm";
  check_structure(op, row_ptr, col_idx, row_ptr.device());
  TORCH_CHECK(t_row_ptr.dim() == 1 && t_row_ptr.size(0) >= 1 && t_row_ptr.scalar_type() == at::kInt &&
                  t_row_ptr.device() == row_ptr.device() && t_row_ptr.is_contiguous(),
              op, ": t_row_ptr must be a contiguous 1-D int32 tensor of length in_features + 1 on ", row_ptr.device(),
              ", got ", t_row_ptr.scalar_type(), " of shape ", t_row_ptr.sizes(), " on ", t_row_ptr.device());
  const int64_t n = row_ptr.size(0) - 1, cols = t_row_ptr.size(0) - 1, nnz = col_idx.size(0);
  check_indices(op, row_ptr, col_idx, cols);
#ifdef TORCHSLIM_WITH_CUDA
  if (row_ptr.is_cuda()) {
    TORCH_CHECK(t_row_ptr[0].item<int64_t>() == 0 && t_row_ptr[cols].item<int64_t>() == nnz, op,
                ": t_row_ptr must start at 0 and end at nnz = ", nnz);
    const Tensor t_counts = t_row_ptr.diff().to(at::kLong);
    TORCH_CHECK(cols == 0 || (t_counts >= 0).all().item<bool>(), op, ": t_row_ptr must be non-decreasing");
    TORCH_CHECK(nnz == 0 || at::equal(at::bincount(col_idx.to(at::kLong), {}, cols), t_counts), op,
                ": t_row_ptr does not match the column counts of col_idx");
    // Entries in row order, sorted by (column, row): the column structure's order. Rows
    // from a search of row_ptr (always in range, unlike a repeat of its differences).
    Tensor rows = at::searchsorted(row_ptr.narrow(0, 1, n), at::arange(nnz, row_ptr.options()), /*out_int32=*/false,
                                   /*right=*/true)
                      .clamp_max_(std::max<int64_t>(n - 1, 0));
    Tensor key = col_idx.to(at::kLong) * n + rows;
    return std::get<1>(key.sort(/*stable=*/true, 0, false)).to(at::kInt);
  }
#endif
  const int32_t* tp = t_row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(tp[0] == 0 && tp[cols] == nnz, op, ": t_row_ptr must start at 0 and end at nnz = ", nnz, ", got ", tp[0],
              " and ", tp[cols]);
  for (int64_t c = 0; c < cols; ++c) {
    TORCH_CHECK(tp[c + 1] >= tp[c], op, ": t_row_ptr decreases after column ", c, " (", tp[c], " then ", tp[c + 1], ")");
  }
  Tensor perm = at::empty({nnz}, row_ptr.options());
  bool ok = false;
  with_index(col_idx, [&](auto* ci) {
    ok = mk::transpose_perm(row_ptr.data_ptr<int32_t>(), ci, n, tp, cols, nnz, perm.data_ptr<int32_t>());
  });
  TORCH_CHECK(ok, op, ": t_row_ptr does not match the column counts of col_idx (or the structure changed during the call)");
  return perm;
}

Tensor masked_sddmm(const Tensor& grad_output, const Tensor& input, const Tensor& row_ptr, const Tensor& col_idx) {
  TORCH_CHECK(input.dim() >= 1 && is_floating(input.scalar_type()) && grad_output.scalar_type() == input.scalar_type(),
              "_masked_sddmm: input and grad_output must share a floating dtype, got ", input.scalar_type(), " and ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), "_masked_sddmm: grad_output and input must be on one device, got ",
              grad_output.device(), " and ", input.device());
  check_structure("_masked_sddmm", row_ptr, col_idx, input.device());
  const int64_t N = row_ptr.size(0) - 1, K = input.size(-1);
  check_indices("_masked_sddmm", row_ptr, col_idx, K);
  TORCH_CHECK(grad_output.dim() >= 1 && grad_output.size(-1) == N, "_masked_sddmm: grad_output.shape[-1] must be ", N,
              ", got shape ", grad_output.sizes());
  TORCH_CHECK(col_idx.scalar_type() == index_type_for(K) || col_idx.scalar_type() == at::kInt,
              "_masked_sddmm: col_idx of ", col_idx.scalar_type(), " cannot index in_features = ", K);
  const Tensor x2d = input.reshape({-1, K});
  const Tensor g2d = grad_output.reshape({-1, N});
  TORCH_CHECK(x2d.size(0) == g2d.size(0), "_masked_sddmm: input and grad_output must have the same number of rows, got ",
              x2d.size(0), " and ", g2d.size(0));
  return sddmm_any(g2d, x2d, row_ptr, col_idx);
}

Tensor masked_gather(const Tensor& weight, const Tensor& row_ptr, const Tensor& col_idx, bool transposed) {
  TORCH_CHECK(weight.dim() == 2 && is_floating(weight.scalar_type()),
              "_masked_gather: weight must be a 2-D floating tensor, got ", weight.scalar_type(), " of shape ", weight.sizes());
  check_structure("_masked_gather", row_ptr, col_idx, weight.device());
  const int64_t rows = transposed ? weight.size(1) : weight.size(0);
  TORCH_CHECK(row_ptr.size(0) == rows + 1, "_masked_gather: row_ptr must have length ", rows + 1, " for weight of shape ",
              weight.sizes(), (transposed ? " (transposed)" : ""), ", got ", row_ptr.size(0));
  check_indices("_masked_gather", row_ptr, col_idx, transposed ? weight.size(0) : weight.size(1));
  return gather_any(weight, row_ptr, col_idx, transposed);
}

// The module's dense path (forward weight and weight gradient): see masked_dense_weight.
Tensor masked_dense(const Tensor& weight, const Tensor& mask) {
  TORCH_CHECK(is_floating(weight.scalar_type()), "_masked_dense: weight must be floating point, got ",
              weight.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "_masked_dense: mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), "_masked_dense: mask must have the shape of weight ", weight.sizes(),
              ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == weight.device(), "_masked_dense: mask must be on the device of weight (",
              weight.device(), "), got ", mask.device());
  return masked_dense_weight(weight, mask);
}

Tensor masked_spmm(const Tensor& input, const Tensor& values_in, const Tensor& row_ptr, const Tensor& col_idx,
                   const std::optional<Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1 && is_floating(input.scalar_type()),
              "_masked_spmm: input must be a floating tensor [..., in_features], got ", input.scalar_type(), " of shape ",
              input.sizes());
  check_structure("_masked_spmm", row_ptr, col_idx, input.device());
  check_values("_masked_spmm", values_in, col_idx, input.scalar_type(), input.device());
  const Tensor values = values_in.contiguous();  // the kernels read values[k] densely
  const int64_t N = row_ptr.size(0) - 1, K = input.size(-1);
  TORCH_CHECK(col_idx.scalar_type() == index_type_for(K) || col_idx.scalar_type() == at::kInt,
              "_masked_spmm: col_idx of ", col_idx.scalar_type(), " cannot index in_features = ", K);
  check_indices("_masked_spmm", row_ptr, col_idx, K);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "_masked_spmm: bias must be 1-D of length ", N, ", ", input.scalar_type(), ", on ", input.device(),
                "; got ", bias->scalar_type(), " of shape ", bias->sizes(), " on ", bias->device());
  }
  const Tensor x2d = input.reshape({-1, K});
  if (K == 0) {
    Tensor y = at::zeros({x2d.size(0), N}, input.options());
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    return lead_reshape(y, input, N);
  }
  return lead_reshape(spmm_any(x2d, values, row_ptr, col_idx, bias), input, N);
}

std::tuple<Tensor, Tensor> masked_backward(const Tensor& grad_output, const Tensor& input, const Tensor& values_t_in,
                                           const Tensor& row_ptr, const Tensor& col_idx, const Tensor& t_row_ptr,
                                           const Tensor& t_col_idx, bool need_input, bool need_weight) {
  TORCH_CHECK(input.dim() >= 1 && is_floating(input.scalar_type()) && grad_output.scalar_type() == input.scalar_type(),
              "_masked_backward: grad_output and input must share a floating dtype, got ", grad_output.scalar_type(),
              " and ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), "_masked_backward: grad_output and input must be on one device, got ",
              grad_output.device(), " and ", input.device());
  check_structure("_masked_backward", row_ptr, col_idx, input.device());
  check_structure("_masked_backward", t_row_ptr, t_col_idx, input.device());
  check_values("_masked_backward", values_t_in, t_col_idx, input.scalar_type(), input.device());
  const Tensor values_t = values_t_in.contiguous();  // the kernels read values[k] densely
  const int64_t N = row_ptr.size(0) - 1, K = t_row_ptr.size(0) - 1;
  TORCH_CHECK(col_idx.size(0) == t_col_idx.size(0), "_masked_backward: row and column structures differ in size (",
              col_idx.size(0), " vs ", t_col_idx.size(0), ")");
  TORCH_CHECK(input.size(-1) == K, "_masked_backward: input.shape[-1] must be in_features (", K, "), got shape ",
              input.sizes());
  TORCH_CHECK(grad_output.dim() >= 1 && grad_output.size(-1) == N,
              "_masked_backward: grad_output.shape[-1] must be out_features (", N, "), got shape ", grad_output.sizes());
  check_indices("_masked_backward", row_ptr, col_idx, K);
  check_indices("_masked_backward", t_row_ptr, t_col_idx, N);
  const Tensor x2d = input.reshape({-1, K});
  const Tensor g2d = grad_output.reshape({-1, N});
  TORCH_CHECK(x2d.size(0) == g2d.size(0), "_masked_backward: input and grad_output must have the same number of rows");
  Tensor gi, gw;
#ifdef TORCHSLIM_WITH_CUDA
  if (input.is_cuda()) {
    gi = at::empty({0}, input.options());
    gw = at::empty({0}, input.options());
    if (need_input) gi = spmm_cuda(g2d, values_t, t_row_ptr, t_col_idx, std::nullopt);
    if (need_weight) gw = sddmm_cuda(g2d, x2d, row_ptr, col_idx);
  } else
#endif
  {
    std::tie(gi, gw) = backward_cpu(g2d, x2d, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx, need_input, need_weight);
  }
  if (need_input) gi = lead_reshape(gi, input, K);
  return {gi, gw};
}

}  // namespace

void define_masked_linear_ops(torch::Library& m) {
  m.def("masked_linear(Tensor input, Tensor weight, Tensor mask, Tensor? bias=None) -> Tensor");
  m.def("masked_linear_grad_input(Tensor grad_output, Tensor weight, Tensor mask) -> Tensor");
  m.def("masked_linear_grad_weight(Tensor grad_output, Tensor input, Tensor mask) -> Tensor");
  m.def("_masked_structure(Tensor mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_masked_structure_perm(Tensor row_ptr, Tensor col_idx, Tensor t_row_ptr) -> Tensor");
  m.def("_masked_sddmm(Tensor grad_output, Tensor input, Tensor row_ptr, Tensor col_idx) -> Tensor");
  m.def("_masked_gather(Tensor weight, Tensor row_ptr, Tensor col_idx, bool transposed) -> Tensor");
  m.def("_masked_spmm(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias=None) -> Tensor");
  m.def("_masked_dense(Tensor weight, Tensor mask) -> Tensor");
  m.def("_masked_backward(Tensor grad_output, Tensor input, Tensor values_t, Tensor row_ptr, Tensor col_idx, "
        "Tensor t_row_ptr, Tensor t_col_idx, bool need_input, bool need_weight) -> (Tensor, Tensor)");
}

namespace {
// The same functions serve both backends: each dispatches on the device inside.
void impl_masked_linear_ops(torch::Library& m) {
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input);
  m.impl("masked_linear_grad_weight", &masked_linear_grad_weight);
  m.impl("_masked_structure", &masked_structure);
  m.impl("_masked_structure_perm", &masked_structure_perm);
  m.impl("_masked_sddmm", &masked_sddmm);
  m.impl("_masked_gather", &masked_gather);
  m.impl("_masked_spmm", &masked_spmm);
  m.impl("_masked_dense", &masked_dense);
  m.impl("_masked_backward", &masked_backward);
}
}  // namespace

TORCH_LIBRARY_IMPL(torchslim, CPU, m) { impl_masked_linear_ops(m); }

#ifdef TORCHSLIM_WITH_CUDA
TORCH_LIBRARY_IMPL(torchslim, CUDA, m) { impl_masked_linear_ops(m); }
#endif

}  // namespace torchslim
