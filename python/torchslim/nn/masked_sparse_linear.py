"""MaskedSparseLinear: an nn.Linear whose weight is multiplied by a fixed boolean mask."""
from __future__ import annotations

import torch
from torch import nn

from torchslim.ops import masked_linear


class MaskedSparseLinear(nn.Module):
    """Drop-in replacement for nn.Linear computing ``x @ (weight * mask).T + bias``.

    ``weight`` keeps its dense shape (optimizers and DDP work unchanged; its gradient is
    exactly zero where ``mask`` is False); ``mask`` is a bool buffer saved in the state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        ref = nn.Linear(in_features, out_features, bias=bias, **factory)
        with torch.no_grad():
            self.weight.copy_(ref.weight)
            if bias:
                self.bias.copy_(ref.bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "MaskedSparseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.set_mask(w.detach() != 0 if mask is None else mask)
        return layer

    def set_mask(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"mask must have shape {(self.out_features, self.in_features)} (out_features, in_features), got {tuple(mask.shape)}"
            )
        with torch.no_grad():
            self.mask.copy_(mask.to(device=self.mask.device) != 0)

    @property
    def density(self) -> float:
        return float(self.mask.sum().item()) / max(self.mask.numel(), 1)

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.mask)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return masked_linear(input, self.weight, self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, density={self.density:.4f}"
