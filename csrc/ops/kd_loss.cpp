// Glue for the fused distillation loss: argument checks, allocation, dtype/device dispatch
// and registration of torchslim::kd_kl_div_fwd. Autograd and the fake kernel live in
// python/torchslim/ops/kd_loss.py.
//
// kd_kl_div_fwd(student, teacher, temperature, reduction, row_weight?, need_grad)
//   -> (loss, grad)
// loss: T^2 * KL(softmax(teacher/T) || softmax(student/T)) reduced over the rows
// (reduction 0 = none [leading shape], 1 = sum, 2 = mean (per element), 3 = batchmean),
// rows weighted by row_weight (0 = padding row). grad: d loss / d student for a loss
// gradient of 1, shaped like student and contiguous (empty [0] when need_grad is false).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels/cpu/kd_loss.h"
#include "ops/registration.h"

#ifdef TORCHSLIM_WITH_CUDA
// Only device-generic c10 headers: the CUDA stream is reached through c10::Stream, so the
// glue needs no CUDA toolkit header.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "kernels/cuda/kd_loss.h"
#endif

namespace torchslim {
namespace {

enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2, kBatchMean = 3 };

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

struct Prepared {
  at::Tensor s2, t2;   // [rows, C], class dim contiguous
  at::Tensor weight;   // [rows] in the compute dtype, or undefined
  int64_t rows = 0, classes = 0;
  std::vector<int64_t> lead;  // leading shape
};

Prepared check_and_prepare(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                           int64_t reduction, const std::optional<at::Tensor>& row_weight) {
  TORCH_CHECK(student.dim() >= 1, "kd_kl_div: student_logits must have at least one dimension [..., C], got a ",
              student.dim(), "-d tensor");
  TORCH_CHECK(supported_dtype(student.scalar_type()),
              "kd_kl_div: student_logits must be float32, float64, float16 or bfloat16, got ", student.scalar_type());
  TORCH_CHECK(supported_dtype(teacher.scalar_type()),
              "kd_kl_div: teacher_logits must be float32, float64, float16 or bfloat16, got ", teacher.scalar_type());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "kd_kl_div: teacher_logits must have the dtype of student_logits (", student.scalar_type(), "), got ",
              teacher.scalar_type());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kd_kl_div: teacher_logits must have the shape of student_logits ",
              student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(), "kd_kl_div: teacher_logits must be on the device of student_logits (",
              student.device(), "), got ", teacher.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "kd_kl_div: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(reduction >= kNone && reduction <= kBatchMean,
              "kd_kl_div: reduction code must be 0 (none), 1 (sum), 2 (mean) or 3 (batchmean), got ", reduction);

  Prepared out;
  out.classes = student.size(-1);
  out.lead.assign(student.sizes().begin(), student.sizes().end() - 1);
  out.rows = 1;
  for (int64_t d : out.lead) out.rows *= d;
  auto as_rows = [&](const at::Tensor& x) {
    at::Tensor x2 = x.reshape({out.rows, out.classes});
    if (out.classes > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
    return x2;
  };
  out.s2 = as_rows(student);
  out.t2 = as_rows(teacher);

  if (row_weight.has_value() && row_weight->defined()) {
    const at::Tensor& w = *row_weight;
    TORCH_CHECK(w.is_floating_point() || w.scalar_type() == at::kBool,
                "kd_kl_div: row_weight must be a floating-point or bool tensor, got ", w.scalar_type());
    TORCH_CHECK(w.device() == student.device(), "kd_kl_div: row_weight must be on the device of student_logits (",
                student.device(), "), got ", w.device());
    TORCH_CHECK(w.sizes() == at::IntArrayRef(out.lead) || (w.dim() == 1 && w.size(0) == out.rows),
                "kd_kl_div: row_weight must have the leading shape of student_logits ", at::IntArrayRef(out.lead),
                " (one weight per row), got ", w.sizes());
    const auto compute = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    out.weight = w.reshape({out.rows}).to(compute).contiguous();
  }
  return out;
}

// The gradient is the one [N, C] tensor the op writes. A large fresh buffer is first
// touched by the kernel, and at 4 KiB pages the page faults cost more than the kernel
// (~16k faults for 64 MiB); asking for transparent huge pages on its 2 MiB-aligned interior
// (a hint only: the content and the allocator are torch's) cuts them ~500-fold.
at::Tensor empty_gradient(const at::Tensor& like) {
  at::Tensor grad = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t end = begin + uintptr_t(grad.nbytes());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (hi >= lo + 2 * kHuge) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return grad;
}

cpu::KdDtype kd_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cpu::KdDtype::F64;
    case at::kHalf: return cpu::KdDtype::F16;
    case at::kBFloat16: return cpu::KdDtype::BF16;
    default: return cpu::KdDtype::F32;
  }
}

std::tuple<at::Tensor, at::Tensor> kd_kl_div_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     double temperature, int64_t reduction,
                                                     const std::optional<at::Tensor>& row_weight, bool need_grad) {
  TORCH_CHECK(student.device().is_cpu(), "kd_kl_div: expected CPU tensors, got student_logits on ", student.device());
  Prepared pr = check_and_prepare(student, teacher, temperature, reduction, row_weight);
  const int64_t N = pr.rows, C = pr.classes;

  // Rows that count: the sum of the row weights (N without weights).
  double counted = double(N);
  if (pr.weight.defined()) counted = pr.weight.sum(at::kDouble).item<double>();
  double scale = 1.0;  // what the sum of the row losses is multiplied by
  if (reduction == kBatchMean) scale = counted > 0.0 ? 1.0 / counted : 0.0;
  if (reduction == kMean) scale = counted > 0.0 && C > 0 ? 1.0 / (counted * double(C)) : 0.0;

  at::Tensor grad = need_grad ? empty_gradient(student) : at::empty({0}, student.options());
  // Per-row losses only for reduction "none"; otherwise each parallel chunk returns its sum,
  // added up in row order (deterministic for a given thread count).
  at::Tensor row_loss = reduction == kNone ? at::empty({N}, student.options().dtype(at::kDouble)) : at::Tensor();
  double total = 0.0;
  if (N > 0 && C > 0) {
    cpu::KdLossParams p;
    p.dtype = kd_dtype(student.scalar_type());
    p.student = pr.s2.data_ptr();
    p.teacher = pr.t2.data_ptr();
    p.rows = N;
    p.classes = C;
    p.student_row_stride = pr.s2.stride(0);
    p.teacher_row_stride = pr.t2.stride(0);
    p.row_weight = pr.weight.defined() ? pr.weight.data_ptr() : nullptr;
    p.temperature = temperature;
    p.grad_scale = scale;
    p.grad = need_grad ? grad.data_ptr() : nullptr;
    p.row_loss = row_loss.defined() ? row_loss.data_ptr<double>() : nullptr;
    p.stream_grad = need_grad && grad.nbytes() >= (size_t(16) << 20);  // far beyond the caches
    // Fixed chunks of >= 32k elements; each returns its loss sum, added up in chunk order
    // (deterministic whatever the thread count or scheduling).
    const int64_t chunk = std::max<int64_t>(1, 32768 / C);
    const int64_t nchunks = (N + chunk - 1) / chunk;
    std::vector<double> partial(nchunks, 0.0);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) partial[c] = cpu::kd_loss_rows(p, c * chunk, std::min(N, (c + 1) * chunk));
    });
    for (double v : partial) total += v;
  } else {  // no rows or no classes: nothing to diverge
    if (row_loss.defined()) row_loss.zero_();
    if (need_grad) grad.zero_();
  }

  if (reduction == kNone) return {row_loss.to(student.scalar_type()).reshape(pr.lead), grad};
  // Through double: a finite sum beyond the dtype's range (fp32 > 3.4e38, fp16 > 65504)
  // rounds to inf, as torch's own reductions do, instead of failing the Scalar conversion.
  return {at::scalar_tensor(total * scale, student.options().dtype(at::kDouble)).to(student.scalar_type()), grad};
}

#ifdef TORCHSLIM_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> kd_kl_div_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                      double temperature, int64_t reduction,
                                                      const std::optional<at::Tensor>& row_weight, bool need_grad) {
  TORCH_CHECK(student.device().is_cuda(), "kd_kl_div: expected CUDA tensors, got student_logits on ", student.device());
  Prepared pr = check_and_prepare(student, teacher, temperature, reduction, row_weight);
  const c10::DeviceGuard guard(student.device());
  const int64_t N = pr.rows, C = pr.classes;
  const auto fopts = student.options().dtype(at::kFloat);

  // The reduction scale stays on the device (no host synchronisation).
  at::Tensor counted = pr.weight.defined() ? pr.weight.sum(at::kFloat) : at::full({}, double(N), fopts);
  at::Tensor denom = counted;
  if (reduction == kMean) denom = counted * double(C);
  at::Tensor scale;
  if (reduction == kBatchMean || reduction == kMean) {
    scale = at::where(denom > 0, denom.reciprocal(), at::zeros_like(denom)).to(at::kFloat).contiguous();
  } else {
    scale = at::ones({}, fopts);
  }

  at::Tensor grad = need_grad ? at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous))
                              : at::empty({0}, student.options());
  const auto compute = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::zeros({N}, student.options().dtype(compute));
  if (N > 0 && C > 0) {
    cuda::KdLossCudaParams p;
    p.dtype = static_cast<int>(kd_dtype(student.scalar_type()));
    p.student = pr.s2.data_ptr();
    p.teacher = pr.t2.data_ptr();
    p.rows = N;
    p.classes = C;
    p.student_row_stride = pr.s2.stride(0);
    p.teacher_row_stride = pr.t2.stride(0);
    p.row_weight = pr.weight.defined() ? pr.weight.data_ptr() : nullptr;
    p.temperature = temperature;
    p.grad_scale = scale.data_ptr<float>();
    p.grad = need_grad ? grad.data_ptr() : nullptr;
    p.row_loss = row_loss.data_ptr();
    void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(student.device()).native_handle();
    const char* err = cuda::kd_loss_launch(p, stream);
    TORCH_CHECK(err == nullptr, "kd_kl_div: CUDA kernel launch failed: ", err ? err : "");
  } else if (need_grad) {
    grad.zero_();
  }

  at::Tensor loss;
  if (reduction == kNone) loss = row_loss.to(student.scalar_type()).reshape(pr.lead);
  else loss = (row_loss.sum(at::kDouble) * scale).to(student.scalar_type()).reshape({});
  return {loss, grad};
}
#endif

}  // namespace

void define_kd_loss_ops(torch::Library& m) {
  m.def(
      "kd_kl_div_fwd(Tensor student_logits, Tensor teacher_logits, float temperature, int reduction, "
      "Tensor? row_weight, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(torchslim, CPU, m) { m.impl("kd_kl_div_fwd", &kd_kl_div_fwd_cpu); }

#ifdef TORCHSLIM_WITH_CUDA
TORCH_LIBRARY_IMPL(torchslim, CUDA, m) { m.impl("kd_kl_div_fwd", &kd_kl_div_fwd_cuda); }
#endif

}  // namespace torchslim
