"""What counts as a linear layer, and how to read one as ``y = x @ W.T + b``.

torchslim compresses ``nn.Linear`` and layers that compute the same function with another
weight layout: transformers' ``Conv1D`` (GPT-2 family; ``weight`` stored ``[in, out]``,
``y = x @ weight + bias``). transformers is never imported here: a Conv1D is recognised by
its class name, module and attributes, so torchslim works with or without it installed.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_conv1d", "is_linear_like", "linear_parts"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (``pytorch_utils.Conv1D``): weight ``[in, out]``."""
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "nf"))


def is_linear_like(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (or subclass) or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """``(weight [out, in], bias or None, in_features, out_features)`` of a linear-like layer,
    the weight as ``nn.Linear`` stores it (a transposed view for Conv1D; detach/clone as
    needed)."""
    if is_conv1d(module):
        w = module.weight.t()
        return w, module.bias, int(w.shape[1]), int(w.shape[0])
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, int(module.in_features), int(module.out_features)
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
