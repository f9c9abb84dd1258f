"""masked_linear: ``input @ (weight * mask).T + bias`` with sparse CPU/CUDA kernels.

``torch.ops.torchslim.masked_linear`` is the functional op (it builds the sparse structure
from the mask on every call and falls back to a dense product when that is faster);
``torchslim.nn.MaskedSparseLinear`` caches the structure and the packed kept weights and
calls the structure ops (``torch.ops.torchslim._masked_*``) directly.

Gradients: ``grad_input = grad @ (weight*mask)``, ``grad_weight`` is computed only at the
kept positions (a sampled dense-dense product) and returned dense-shaped with exact zeros
where ``mask`` is False, ``grad_bias = grad.sum(leading dims)``. Double backward
(``create_graph=True``) is supported: the backward then runs as differentiable dense ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_linear"]

_ops = torch.ops.torchslim
_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def masked_linear(input: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ (weight * mask).T + bias`` for any leading batch dims of ``input``.

    ``mask`` is a bool tensor of the shape of ``weight``; a mask of another dtype is read as
    ``mask != 0`` (kept where nonzero), never as scale factors. The gradient of ``weight`` is
    exactly zero where ``mask`` is False. Masked positions are structural zeros: a NaN or inf
    stored in a masked weight does not reach the output (kept entries propagate NaN/inf as a
    dense product does).
    """
    for name, t in (("input", input), ("weight", weight), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"masked_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"masked_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if mask.dtype != torch.bool:
        mask = mask != 0
    return _ops.masked_linear(input, weight, mask, bias)


# ---------------------------------------------------------------- fake (meta) kernels

def _validate(input, weight, mask, bias) -> None:
    """The checks of the C++ glue, for fake tensors (torch.compile tracing)."""
    if weight.dim() != 2:
        raise ValueError(f"masked_linear: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOATING:
        raise TypeError(f"masked_linear: weight must be floating point, got {weight.dtype}")
    if input.dim() < 1:
        raise ValueError("masked_linear: input must have at least 1 dimension [..., in_features]")
    if input.dtype != weight.dtype:
        raise TypeError(f"masked_linear: input and weight must have the same dtype, got {input.dtype} and {weight.dtype}")
    if input.device != weight.device:
        raise ValueError(f"masked_linear: input and weight must be on one device, got {input.device} and {weight.device}")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"masked_linear: input.shape[-1] ({input.shape[-1]}) must equal in_features ({weight.shape[1]})")
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_linear: mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape) or mask.device != weight.device:
        raise ValueError(f"masked_linear: mask must have the shape and device of weight {tuple(weight.shape)}, "
                         f"got {tuple(mask.shape)} on {mask.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype
                             or bias.device != weight.device):
        raise ValueError(f"masked_linear: bias must be 1-D of length out_features ({weight.shape[0]}) with the dtype "
                         f"and device of weight, got {bias.dtype} of shape {tuple(bias.shape)} on {bias.device}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _index_dtype(extent: int) -> torch.dtype:
    return torch.int16 if extent <= 32767 else torch.int32


@torch.library.register_fake("torchslim::masked_linear")
def _masked_linear_fake(input, weight, mask, bias=None):
    _validate(input, weight, mask, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("torchslim::masked_linear_grad_input")
def _grad_input_fake(grad_output, weight, mask):
    torch._check(grad_output.shape[-1] == weight.shape[0], lambda: "masked_linear_grad_input: grad_output.shape[-1] must be out_features")
    return grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1]))


@torch.library.register_fake("torchslim::masked_linear_grad_weight")
def _grad_weight_fake(grad_output, input, mask):
    torch._check(input.shape[-1] == mask.shape[1], lambda: "masked_linear_grad_weight: input.shape[-1] must be in_features")
    return input.new_empty(tuple(mask.shape))


@torch.library.register_fake("torchslim::_masked_structure")
def _structure_fake(mask):
    nnz = torch.library.get_ctx().new_dynamic_size()
    n, k = mask.shape
    return (mask.new_empty(n + 1, dtype=torch.int32), mask.new_empty(nnz, dtype=_index_dtype(k)),
            mask.new_empty(k + 1, dtype=torch.int32), mask.new_empty(nnz, dtype=_index_dtype(n)))


@torch.library.register_fake("torchslim::_masked_structure_perm")
def _structure_perm_fake(row_ptr, col_idx, t_row_ptr):
    return col_idx.new_empty(col_idx.shape[0], dtype=torch.int32)


@torch.library.register_fake("torchslim::_masked_sddmm")
def _sddmm_fake(grad_output, input, row_ptr, col_idx):
    return input.new_empty((row_ptr.shape[0] - 1, input.shape[-1]))


@torch.library.register_fake("torchslim::_masked_gather")
def _gather_fake(weight, row_ptr, col_idx, transposed):
    return weight.new_empty(col_idx.shape[0], dtype=_acc_dtype(weight.dtype))


@torch.library.register_fake("torchslim::_masked_spmm")
def _spmm_fake(input, values, row_ptr, col_idx, bias=None):
    return input.new_empty((*input.shape[:-1], row_ptr.shape[0] - 1))


@torch.library.register_fake("torchslim::_masked_dense")
def _masked_dense_fake(weight, mask):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("torchslim::_masked_backward")
def _backward_fake(grad_output, input, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx, need_input, need_weight):
    gi = input.new_empty(input.shape) if need_input else input.new_empty(0)
    gw = input.new_empty((row_ptr.shape[0] - 1, t_row_ptr.shape[0] - 1)) if need_weight else input.new_empty(0)
    return gi, gw


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    input, weight, mask, bias = inputs
    ctx.save_for_backward(input if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight, mask = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if torch.is_grad_enabled():
        # create_graph=True (double backward, e.g. a gradient penalty): the gradient ops have
        # no derivative of their own, so the backward is written with differentiable ops.
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        if ctx.needs_input_grad[0]:
            grad_input = grad @ torch.where(mask, weight, zero)
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), input.reshape(-1, input.shape[-1])
            grad_weight = torch.where(mask, g2.t() @ x2, zero)
    else:
        if ctx.needs_input_grad[0]:
            grad_input = _ops.masked_linear_grad_input(grad, weight, mask)
        if ctx.needs_input_grad[1]:
            grad_weight = _ops.masked_linear_grad_weight(grad, input, mask)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_input, grad_weight, None, grad_bias


torch.library.register_autograd("torchslim::masked_linear", _backward, setup_context=_setup_context)
