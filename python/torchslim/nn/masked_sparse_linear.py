"""MaskedSparseLinear: an nn.Linear whose weight is multiplied by a fixed boolean mask."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.ops import masked_linear

_ops = torch.ops.torchslim
_spmm = torch.ops.torchslim._masked_spmm.default
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled

# Dense fallback rule (see the class docstring; the same numbers are in the C++ glue).
SPARSE_MAX_DENSITY_BATCH1 = 0.25        # inference, batch 1, dense weight in cache
SPARSE_MAX_DENSITY_BATCH1_LARGE = 0.45  # inference, batch 1, dense weight > LARGE_WEIGHT_BYTES
LARGE_WEIGHT_BYTES = 16 * 1024 * 1024
SMALL_WEIGHT_NUMEL = 32768              # inference, batch 1: dense below this many weights
SPARSE_MAX_DENSITY = 0.4                # inference, batch > 1
SPARSE_MAX_DENSITY_TRAIN = 0.35         # training (gradients needed), batch >= 64
SPARSE_MAX_DENSITY_TRAIN_SMALL = 0.2    # training, batch < 64

# One lock for every layer: rebuilds are rare (a mask or weight change), reads take no lock.
_REBUILD_LOCK = threading.Lock()
_CACHE_SLOTS = ("_st", "_pk", "_pkt", "_dw")


class _Structure:
    """CSR of the mask by rows (forward, grad_weight) and by columns (grad_input)."""

    __slots__ = ("mask", "version", "ptr", "row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm", "nnz", "density",
                 "sparse_b1", "sparse_bn", "sparse_train", "sparse_train_small")

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self.version = mask._version
        self.ptr = mask.data_ptr()
        # Normal (not inference) tensors even when built under inference_mode: the ops check
        # a structure's indices once and remember it by its version counter, which
        # inference tensors lack (they would be checked on every call).
        with torch.inference_mode(False):
            self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx = _ops._masked_structure(mask)
            self.t_perm = _ops._masked_structure_perm(self.row_ptr, self.col_idx, self.t_row_ptr)
        self.nnz = int(self.col_idx.shape[0])
        self.density = self.nnz / mask.numel() if mask.numel() else 0.0
        large = mask.numel() * 4 > LARGE_WEIGHT_BYTES
        d = self.density
        self.sparse_b1 = mask.numel() > SMALL_WEIGHT_NUMEL and d <= (
            SPARSE_MAX_DENSITY_BATCH1_LARGE if large else SPARSE_MAX_DENSITY_BATCH1)
        self.sparse_bn = d <= SPARSE_MAX_DENSITY
        self.sparse_train = d <= SPARSE_MAX_DENSITY_TRAIN
        self.sparse_train_small = d <= SPARSE_MAX_DENSITY_TRAIN_SMALL


class _Packed:
    """A copy derived from the weight (packed kept values, or the masked dense weight),
    valid while the weight's version, storage and the structure are unchanged."""

    __slots__ = ("st", "weight", "version", "ptr", "data")

    def __init__(self, st, weight, data, version, ptr):
        # version / ptr: read before `data` was derived, so an edit racing the derivation
        # leaves this copy stale-marked (rebuilt next call) rather than trusted.
        self.st = st
        self.weight = weight
        self.version = version
        self.ptr = ptr
        self.data = data


class _MaskedSparseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, values, st):
        ctx.st = st
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, values)
        return _ops._masked_spmm(input, values, st.row_ptr, st.col_idx, bias)

    @staticmethod
    def backward(ctx, grad):
        input, values = ctx.saved_tensors
        st = ctx.st
        grad_input = grad_weight = grad_bias = None
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_input or need_weight:
            values_t = values.index_select(0, st.t_perm) if need_input else values
            gi, gw = _ops._masked_backward(grad, input, values_t, st.row_ptr, st.col_idx, st.t_row_ptr, st.t_col_idx,
                                           need_input, need_weight)
            grad_input = gi if need_input else None
            grad_weight = gw if need_weight else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_input, grad_weight, grad_bias, None, None


class _MaskedDenseFn(torch.autograd.Function):
    """where(mask, weight, 0) with the same select for the gradient (the dense path)."""

    @staticmethod
    def forward(ctx, weight, mask):
        ctx.save_for_backward(mask)
        return _ops._masked_dense(weight, mask)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _ops._masked_dense(grad, mask), None


class MaskedSparseLinear(nn.Module):
    """Drop-in replacement for nn.Linear computing ``x @ (weight * mask).T + bias``.

    ``weight`` keeps its dense shape (optimizers and DDP work unchanged; its gradient is
    exactly zero where ``mask`` is False); ``mask`` is a bool buffer saved in the state_dict.

    Execution. The sparse structure (CSR of the mask by rows, for the forward and the
    weight gradient, and by columns, for the input gradient; int16 indices when the
    dimension allows) is built once and cached; it is rebuilt only when the mask changes
    (``set_mask``, an in-place edit — seen through ``mask._version`` —, ``.to()``,
    ``load_state_dict``). Inference reads a packed copy of the kept weights (float32, or
    float64 for float64 layers), refreshed when the weight's version changes (after an
    optimizer step), never the dense weight. Training uses sparse kernels for the forward,
    the input gradient and the weight gradient (a sampled dense-dense product computed
    only at kept positions). Rebuilds take a lock and swap the finished cache in, so several
    threads may call one layer concurrently.

    Dense fallback. When the sparse kernels would be slower the layer runs
    ``F.linear(x, where(mask, weight, 0), bias)`` instead (the masked dense weight is cached
    for inference). Rule, from the density at which the sparse kernels stop being faster
    (measured on an AMD EPYC Zen 4 with AVX-512, float32, 1024x1024 and 4096x4096, one
    thread; CPU time): the sparse path is taken when

    ============================  =======================================
    inference, batch 1            density <= 0.25 (0.45 if the dense weight
                                  exceeds 16 MiB: dense is then memory-bound),
                                  and more than 32768 weights (below that the
                                  fixed cost of a call dominates: dense wins)
    inference, batch > 1          density <= 0.4
    training, batch >= 64         density <= 0.35
    training, batch < 64          density <= 0.2
    ============================  =======================================

    and the dense path otherwise.
    ``layer.density`` gives the kept fraction and ``layer.last_path`` the path taken by the
    last forward ("sparse" or "dense").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        ref = nn.Linear(in_features, out_features, bias=bias, **factory)
        with torch.no_grad():
            self.weight.copy_(ref.weight)
            if bias:
                self.bias.copy_(ref.bias)
        self._clear_caches()

    # ------------------------------------------------------------ construction and mask

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
        st = self.__dict__.get("_st")
        if st is not None and self._structure_valid(st, self.mask):
            return st.density
        return float(self.mask.sum().item()) / max(self.mask.numel(), 1)

    @property
    def last_path(self) -> str | None:
        """The path the last forward took: "sparse" or "dense" (None before any forward)."""
        return self.__dict__.get("_last_path")

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.where(self.mask, self.weight, torch.zeros((), dtype=self.weight.dtype,
                                                                                device=self.weight.device)))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------ caches

    def _clear_caches(self) -> None:
        d = self.__dict__
        for slot in _CACHE_SLOTS:
            d[slot] = None

    @staticmethod
    def _structure_valid(st: _Structure, mask: torch.Tensor) -> bool:
        return st.mask is mask and st.version == mask._version and st.ptr == mask.data_ptr()

    def _structure(self, mask: torch.Tensor) -> _Structure:
        with _REBUILD_LOCK:
            st = self.__dict__["_st"]
            if st is None or not self._structure_valid(st, mask):
                st = _Structure(mask)
                self.__dict__["_st"] = st
            return st

    def _packed(self, slot: str, st: _Structure, weight: torch.Tensor) -> torch.Tensor:
        with _REBUILD_LOCK:
            pk = self.__dict__[slot]
            if (pk is None or pk.st is not st or pk.weight is not weight or pk.version != weight._version
                    or pk.ptr != weight.data_ptr()):
                version, ptr = weight._version, weight.data_ptr()
                with torch.no_grad():
                    if slot == "_pk":
                        data = _ops._masked_gather(weight, st.row_ptr, st.col_idx, False)
                    else:  # "_dw": the masked dense weight for the dense inference path
                        data = _ops._masked_dense(weight, st.mask)
                pk = _Packed(st, weight, data, version, ptr)
                self.__dict__[slot] = pk
            return pk.data

    def _sparse_data(self) -> tuple[_Structure, torch.Tensor]:
        """The cached structure and packed kept values (float32, float64 for float64
        layers), rebuilt if stale; what torchslim.nn.SparseSequential hands the fused op."""
        mask, weight = self._buffers["mask"], self._parameters["weight"]
        st = self._st
        if st is None or not self._structure_valid(st, mask):
            st = self._structure(mask)
        pk = self._pk
        if (pk is None or pk.st is not st or pk.weight is not weight or pk.version != weight._version
                or pk.ptr != weight.data_ptr()):
            return st, self._packed("_pk", st, weight)
        return st, pk.data

    def __getstate__(self):
        state = self.__dict__.copy()
        for slot in _CACHE_SLOTS:
            state[slot] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for slot in _CACHE_SLOTS:
            self.__dict__.setdefault(slot, None)

    # ------------------------------------------------------------ forward

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Kept lean: this runs once per layer per call, and at batch 1 its Python cost is
        # comparable to the kernel's.
        params = self._parameters
        weight, bias, mask = params["weight"], params.get("bias"), self._buffers["mask"]
        if _is_compiling() or not isinstance(input, torch.Tensor):
            return masked_linear(input, weight, mask, bias)  # traced graphs: the functional op
        if input.dtype != weight.dtype or input.shape[-1] != self.in_features:
            return masked_linear(input, weight, mask, bias)  # raises the op's clear error
        st = self._st
        if st is None or st.mask is not mask or st.version != mask._version or st.ptr != mask.data_ptr():
            st = self._structure(mask)
        grad = _grad_enabled() and (weight.requires_grad or input.requires_grad
                                    or (bias is not None and bias.requires_grad))
        n = input.numel()
        if grad:
            sparse = st.sparse_train if n >= 64 * self.in_features else st.sparse_train_small
        else:
            sparse = st.sparse_b1 if n <= self.in_features else st.sparse_bn
        if sparse:
            self.__dict__["_last_path"] = "sparse"
            pk = self._pk
            if (pk is None or pk.st is not st or pk.weight is not weight or pk.version != weight._version
                    or pk.ptr != weight.data_ptr()):
                values = self._packed("_pk", st, weight)
            else:
                values = pk.data
            if grad:
                return _MaskedSparseFn.apply(input, weight, bias, values, st)
            return _spmm(input, values, st.row_ptr, st.col_idx, bias)
        self.__dict__["_last_path"] = "dense"
        if grad:
            return F.linear(input, _MaskedDenseFn.apply(weight, mask), bias)
        pk = self._dw
        if (pk is None or pk.st is not st or pk.weight is not weight or pk.version != weight._version
                or pk.ptr != weight.data_ptr()):
            return F.linear(input, self._packed("_dw", st, weight), bias)
        return F.linear(input, pk.data, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, density={self.density:.4f}"
