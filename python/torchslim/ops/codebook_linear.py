"""codebook_linear: a linear layer whose weights are indices into a shared codebook.

``codebook_linear(input, indices, codebook, bias=None) = input @ codebook[indices].T + bias``
with any leading batch dimensions. ``indices`` is uint8 ``[out, in]`` (up to 256 codebook
entries) or packed 4-bit ``[out, ceil(in/2)]`` (up to 16 entries; element j in the low
nibble of byte j//2 when j is even, the high nibble when odd), the packed layout being
recognised by ``indices.shape[1] != input.shape[-1]``.

Backed by ``torch.ops.torchslim.codebook_linear`` (CPU and CUDA kernels that decode the
weights on the fly). Gradients flow to ``input`` (grad @ W, W decoded tile by tile),
``codebook`` (dW binned by index without forming the whole dW) and ``bias``; ``indices``
get none. Double backward (``create_graph=True``) is supported: the backward then runs as
differentiable dense ops (the decoded weight and a scatter-sum).
"""
from __future__ import annotations

import torch

import torchslim._extension  # noqa: F401  (loads torch.ops.torchslim)
from torchslim.ops._reference import unpack_int4

__all__ = ["codebook_linear"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _layout(input_shape, indices, codebook):
    """(out_features, packed) for fake kernels; raises like the C++ checks."""
    in_features = input_shape[-1]
    torch._check(indices.dtype == torch.uint8, lambda: f"codebook_linear: indices must be uint8, got {indices.dtype}")
    torch._check(indices.dim() == 2, lambda: f"codebook_linear: indices must be 2-D, got shape {tuple(indices.shape)}")
    torch._check(codebook.dim() == 1, lambda: f"codebook_linear: codebook must be 1-D, got shape {tuple(codebook.shape)}")
    torch._check(codebook.numel() > 0, lambda: "codebook_linear: codebook is empty (num_clusters must be >= 1)")
    cols = indices.shape[1]
    packed = cols != in_features
    if packed:
        torch._check(cols == (in_features + 1) // 2,
                     lambda: f"codebook_linear: indices must have {in_features} columns (uint8) or "
                             f"{(in_features + 1) // 2} (packed 4-bit), got shape {tuple(indices.shape)}")
        torch._check(codebook.numel() <= 16,
                     lambda: f"codebook_linear: packed 4-bit indices address at most 16 codebook entries, "
                             f"codebook has {codebook.numel()}")
    else:
        torch._check(codebook.numel() <= 256,
                     lambda: f"codebook_linear: uint8 indices address at most 256 entries, codebook has {codebook.numel()}")
    return indices.shape[0], packed


@torch.library.register_fake("torchslim::codebook_linear")
def _(input, indices, codebook, bias=None):
    out_features, _ = _layout(input.shape, indices, codebook)
    torch._check(indices.device == input.device and codebook.device == input.device,
                 lambda: f"codebook_linear: input, indices and codebook must be on one device, got {input.device}, "
                         f"{indices.device} and {codebook.device}")
    torch._check(codebook.dtype == input.dtype,
                 lambda: f"codebook_linear: codebook dtype {codebook.dtype} differs from input dtype {input.dtype}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features,
                     lambda: f"codebook_linear: bias must have shape [{out_features}], got {tuple(bias.shape)}")
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("torchslim::codebook_linear_grad_input")
def _(grad_output, indices, codebook, in_features):
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


@torch.library.register_fake("torchslim::codebook_linear_grad_codebook")
def _(grad_output, input, indices, codebook):
    return codebook.new_empty(codebook.shape)


def _setup_context(ctx, inputs, output):
    input, indices, codebook, bias = inputs
    ctx.save_for_backward(input, indices, codebook)
    ctx.in_features = input.shape[-1]
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, indices, codebook = ctx.saved_tensors
    grad_input = grad_codebook = grad_bias = None
    if torch.is_grad_enabled():
        # create_graph=True (double backward, e.g. a gradient penalty): the gradient ops have
        # no derivative of their own, so the backward is written with differentiable ops.
        labels = indices if indices.shape[1] == ctx.in_features else unpack_int4(indices, ctx.in_features)
        labels = labels.long()
        if ctx.needs_input_grad[0]:
            grad_input = grad @ codebook[labels]
        if ctx.needs_input_grad[2]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), input.reshape(-1, input.shape[-1])
            grad_codebook = torch.zeros_like(codebook).index_add(0, labels.reshape(-1), (g2.t() @ x2).reshape(-1))
    else:
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.torchslim.codebook_linear_grad_input(grad, indices, codebook, ctx.in_features)
        if ctx.needs_input_grad[2]:
            grad_codebook = torch.ops.torchslim.codebook_linear_grad_codebook(grad, input, indices, codebook)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_input, None, grad_codebook, grad_bias


torch.library.register_autograd("torchslim::codebook_linear", _backward, setup_context=_setup_context)


def codebook_linear(input: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ codebook[indices].T + bias`` (indices uint8 ``[out, in]`` or packed 4-bit)."""
    for name, t in (("input", input), ("indices", indices), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"codebook_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"codebook_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if indices.dtype != torch.uint8:
        raise TypeError(f"codebook_linear: indices must be uint8 (torch.uint8), got {indices.dtype}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"codebook_linear: input must be floating point, got {input.dtype}")
    if codebook.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"codebook_linear: codebook must be floating point, got {codebook.dtype}")
    if input.dim() < 1:
        raise ValueError("codebook_linear: input must have at least 1 dimension, got a scalar")
    if indices.device != input.device or codebook.device != input.device:
        # (checked here: a meta input would otherwise dispatch to the fake kernel and return a
        # meta tensor where nn.Linear raises)
        raise ValueError(f"codebook_linear: input, indices and codebook must be on one device, got {input.device}, "
                         f"{indices.device} and {codebook.device}")
    return torch.ops.torchslim.codebook_linear(input, indices, codebook, bias)
