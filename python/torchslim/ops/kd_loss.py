"""kd_kl_div: the fused, temperature-scaled distillation loss (torch.ops.torchslim.kd_kl_div_fwd).

One kernel computes, per row, the log-sum-exp of both inputs in a single read, the loss and
the student gradient ``T * (softmax(s/T) - softmax(t/T))`` (scaled for the reduction). The
gradient is returned by the op and saved for backward, which only multiplies it by the
incoming gradient (and returns it untouched when that is exactly 1 on the CPU). No other
``[N, C]`` tensor is created.

The teacher gets no gradient: ``teacher_logits`` must not require grad (call ``.detach()``),
otherwise a ValueError is raised rather than silently dropping its gradient.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch._subclasses.fake_tensor import is_fake

_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_OP = "torchslim::kd_kl_div_fwd"


@torch.library.register_fake(_OP)
def _kd_kl_div_fwd_fake(student_logits, teacher_logits, temperature, reduction, row_weight, need_grad):
    lead = student_logits.shape[:-1]
    loss = student_logits.new_empty(lead if reduction == 0 else ())
    if need_grad:
        grad = torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
    else:
        grad = student_logits.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    _, _, _, reduction, _, need_grad = inputs
    ctx.reduction = reduction
    ctx.need_grad = need_grad
    ctx.set_materialize_grads(False)  # no zero-filled [N, C] gradient for the (unused) second output
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _is_eager_cpu_one(grad_loss):
    """True for a plain (untraced) CPU scalar gradient equal to 1, e.g. from loss.backward()."""
    if type(grad_loss) is not torch.Tensor or grad_loss.device.type != "cpu" or grad_loss.numel() != 1:
        return False
    if torch.compiler.is_compiling() or is_fake(grad_loss):
        return False
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        return False
    return bool(grad_loss.item() == 1.0)


def _backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.need_grad:
        raise RuntimeError(
            "kd_kl_div: the gradient was not computed in the forward pass (student_logits did not require grad "
            "or grad mode was off)"
        )
    (saved,) = ctx.saved_tensors
    if grad_loss is None:  # grads are not materialised: nothing flowed into the loss
        return None, None, None, None, None, None
    if ctx.reduction == 0:
        grad = saved * grad_loss.unsqueeze(-1).to(saved.dtype)
    elif _is_eager_cpu_one(grad_loss):
        # loss.backward() on the loss itself: the saved gradient is the answer.
        grad = saved
    else:
        grad = saved * grad_loss.to(saved.dtype)
    return grad, None, None, None, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def kd_kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    row_weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` on raw logits ``[..., C]``.

    Rows are the flattened leading dims. ``reduction``: ``"batchmean"`` (sum over rows divided
    by the number of rows that count), ``"sum"``, ``"mean"`` (divided by rows that count times
    C, like ``F.kl_div``'s "mean") or ``"none"`` (one value per row, leading shape).
    Unlike ``F.kl_div``, whose "batchmean" divides by ``input.size(0)`` only, "batchmean" here
    averages over all leading dims: ``[B, L, C]`` logits are divided by ``B * L`` (a
    per-token mean for sequence models). With no row that counts (empty input, all weights 0,
    every target ignored) "batchmean" and "mean" are 0, with a zero gradient. A reduced loss
    beyond the dtype's range (a finite fp32 "sum" over 3.4e38) is ``inf``, as in
    ``torch.sum``.

    ``row_weight`` (leading shape, float or bool) weights each row; rows of weight 0 (padding)
    count for nothing, whatever their logits, and "batchmean" divides by the sum of the weights
    (the number of rows that count for 0/1 weights). ``target`` (leading shape, integer) with
    ``ignore_index`` marks rows to ignore the same way (``target == ignore_index``).

    Gradient flows to ``student_logits`` only; ``teacher_logits`` must be detached (it gets no
    gradient and a ValueError says so if it requires one). Float32, float64, float16 and
    bfloat16 (math in float32, float64 for float64 inputs).
    """
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"kd_kl_div: student_logits must be a Tensor, got {type(student_logits).__name__}")
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(f"kd_kl_div: teacher_logits must be a Tensor, got {type(teacher_logits).__name__}")
    if student_logits.dtype not in _DTYPES:
        raise TypeError(
            f"kd_kl_div: student_logits must be float32, float64, float16 or bfloat16, got {student_logits.dtype}"
        )
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            f"kd_kl_div: teacher_logits must have the dtype of student_logits ({student_logits.dtype}), "
            f"got {teacher_logits.dtype}"
        )
    if student_logits.dim() < 1:
        raise ValueError("kd_kl_div: student_logits must have at least one dimension [..., C], got a 0-d tensor")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_kl_div: teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"kd_kl_div: teacher_logits must be on {student_logits.device} like student_logits, "
            f"got {teacher_logits.device}"
        )
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "kd_kl_div: teacher_logits requires grad, but the teacher gets no gradient from this loss; "
            "pass teacher_logits.detach() (or compute the teacher under torch.no_grad())"
        )
    if torch.compiler.is_compiling():
        pass  # may be symbolic (e.g. an annealed temperature): the op's TORCH_CHECK validates it at run time
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"kd_kl_div: temperature must be a real number, got {type(temperature).__name__}")
    else:
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"kd_kl_div: temperature must be a finite number > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"kd_kl_div: reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")

    lead = student_logits.shape[:-1]
    weight = None
    if row_weight is not None:
        if not isinstance(row_weight, torch.Tensor):
            raise TypeError(f"kd_kl_div: row_weight must be a Tensor, got {type(row_weight).__name__}")
        if not (row_weight.is_floating_point() or row_weight.dtype == torch.bool):
            raise TypeError(f"kd_kl_div: row_weight must be a floating-point or bool tensor, got {row_weight.dtype}")
        if row_weight.shape != lead:
            raise ValueError(
                f"kd_kl_div: row_weight must have the leading shape of student_logits {tuple(lead)}, "
                f"got {tuple(row_weight.shape)}"
            )
        weight = row_weight.detach()
    if target is not None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"kd_kl_div: target must be a Tensor, got {type(target).__name__}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"kd_kl_div: target must be an integer tensor, got {target.dtype}")
        if target.shape != lead:
            raise ValueError(
                f"kd_kl_div: target must have the leading shape of student_logits {tuple(lead)}, got {tuple(target.shape)}"
            )
        keep = target != ignore_index
        weight = keep if weight is None else weight * keep
    if weight is not None and weight.device != student_logits.device:
        raise ValueError(f"kd_kl_div: row_weight/target must be on {student_logits.device}, got {weight.device}")

    need_grad = bool(student_logits.requires_grad and torch.is_grad_enabled())
    loss, _ = torch.ops.torchslim.kd_kl_div_fwd(
        student_logits, teacher_logits, temperature, _REDUCTIONS[reduction], weight, need_grad
    )
    return loss
