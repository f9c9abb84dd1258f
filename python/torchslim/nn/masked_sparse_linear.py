"""MaskedSparseLinear: an nn.Linear whose weight is multiplied by a fixed boolean mask."""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from torchslim._layers import is_conv1d
from torchslim.ops import masked_linear

__all__ = ["MaskedSparseLinear", "force_path", "forced_path", "pack_mask_bits", "unpack_mask_bits", "takeover_parts"]

_ops = torch.ops.torchslim
_spmm = torch.ops.torchslim._masked_spmm.default
_gather = torch.ops.torchslim._masked_gather.default
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled

# Dense fallback rule (see the class docstring): torchslim._path_rules, the numbers the C++
# glue uses too.
from torchslim._path_rules import (LARGE_WEIGHT_BYTES, SMALL_WEIGHT_NUMEL, SPARSE_MAX_DENSITY,  # noqa: E402,F401
                                   SPARSE_MAX_DENSITY_BATCH1, SPARSE_MAX_DENSITY_BATCH1_LARGE, SPARSE_MAX_DENSITY_TRAIN,
                                   SPARSE_MAX_DENSITY_TRAIN_SMALL, TRAIN_MIN_BATCH, masked_sparse_faster)

_LOW_PRECISION = (torch.bfloat16, torch.float16)  # their own batch > 1 rule (the dense product is faster)

# One lock for every layer: rebuilds are rare (a mask or weight change), reads take no lock.
_REBUILD_LOCK = threading.Lock()
_CACHE_SLOTS = ("_st", "_pk", "_pkt", "_dw")

# ---------------------------------------------------------------- forced path

_PATHS = (None, "sparse", "dense")
_FORCED_PATH = None  # process-wide; read by every forward (and guarded on by torch.compile)


class force_path:
    """Make every MaskedSparseLinear (and SparseSequential's fused runs) take ``path``
    whatever the density rule says: ``"sparse"`` (the sparse kernels; SparseSequential may
    fuse any run of sparse layers), ``"dense"`` (``F.linear`` on the masked weight; no fused
    runs) or ``None`` (the rule). ``layer.last_path`` reports what ran.

    Works like ``torch.set_grad_enabled``: calling ``force_path("sparse")`` sets it until
    changed (e.g. in a pytest fixture, undone by ``force_path(None)``), and
    ``with force_path("dense"): ...`` restores the previous setting on exit. The setting is
    process-wide (one module-level value seen by all threads), meant for tests and
    benchmarks; set it before starting threads. Under ``torch.compile`` a change of the
    setting recompiles (the value is guarded on).
    """

    def __init__(self, path: str | None):
        global _FORCED_PATH
        if path not in _PATHS:
            raise ValueError(f"force_path: path must be 'sparse', 'dense' or None, got {path!r}")
        self.path = path
        self.previous = _FORCED_PATH
        _FORCED_PATH = path

    def __enter__(self) -> "force_path":
        return self

    def __exit__(self, *exc) -> None:
        global _FORCED_PATH
        _FORCED_PATH = self.previous


def forced_path() -> str | None:
    """The path set by :class:`force_path` ("sparse", "dense") or None (the density rule)."""
    return _FORCED_PATH


# ---------------------------------------------------------------- bit-packed masks

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[out, in]`` -> uint8 ``[out, ceil(in / 8)]``: column j of a row is bit ``j % 8``
    (least significant first) of byte ``j // 8``, padding bits 0 (numpy's
    ``packbits(bitorder="little")``). The form of ``mask`` in a MaskedSparseLinear state_dict."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"pack_mask_bits: mask must be a 2-D tensor [out, in], got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    bits = (mask != 0).to(torch.uint8)
    if nbytes * 8 != cols:
        bits = F.pad(bits, (0, nbytes * 8 - cols))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (bits.reshape(rows, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_mask_bits(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask_bits`: uint8 ``[out, ceil(in / 8)]`` -> bool ``[out, in]``.
    Raises ValueError for another dtype or shape, or a set padding bit."""
    nbytes = (in_features + 7) // 8
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or tuple(packed.shape) != (out_features, nbytes):
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"a bit-packed mask must be uint8 of shape {(out_features, nbytes)} "
                         f"(out_features, ceil(in_features / 8)), got {got}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(out_features, nbytes * 8)
    if nbytes * 8 != in_features and packed.device.type != "meta" and bool(bits[:, in_features:].any()):
        raise ValueError(f"a bit-packed mask has set padding bits beyond in_features={in_features}")
    return bits[:, :in_features].to(torch.bool).contiguous()


# ---------------------------------------------------------------- takeover of other layers

def _torch_prune_hook(module: nn.Module, name: str = "weight"):
    """The torch.nn.utils.prune method (forward pre-hook) that parametrizes ``name``, or None."""
    from torch.nn.utils import prune

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == name:
            return hook
    return None


def takeover_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(weight [out, in] contiguous, bias or None, mask or None)``, detached, of a layer
    torchslim can take over: an ``nn.Linear`` (also one parametrized by
    ``torch.nn.utils.parametrize``: its computed weight), a transformers ``Conv1D`` (weight
    transposed to ``[out, in]``), a layer pruned with ``torch.nn.utils.prune`` (weight
    ``weight_orig``, mask ``weight_mask != 0``; ``prune.remove``-d layers are plain layers whose
    zeros are the pruning) or a MaskedSparseLinear (its weight and mask). The mask is None
    for layers that carry none. TypeError for anything else."""
    if isinstance(module, MaskedSparseLinear):
        return module.weight.detach(), _detached(module.bias), module.mask
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise TypeError(f"expected an nn.Linear, a transformers Conv1D, a MaskedSparseLinear or one of those pruned "
                        f"with torch.nn.utils.prune, got {type(module).__name__}")
    mask = None
    if _torch_prune_hook(module) is not None:
        weight, mask = module.weight_orig.detach(), module.weight_mask.detach() != 0
    else:
        weight = module.weight.detach()  # (a parametrized weight is computed here)
    if is_conv1d(module):
        weight = weight.t()
        mask = None if mask is None else mask.t()
    bias = module.bias
    if _torch_prune_hook(module, "bias") is not None:  # a pruned bias: its pruned entries are zero
        bias = module.bias_orig * module.bias_mask
    return weight.contiguous(), _detached(bias), None if mask is None else mask.contiguous()


def _detached(t):
    return None if t is None else t.detach()


# ---------------------------------------------------------------- caches

def _version(t: torch.Tensor) -> int:
    """The version counter, or -1 for an inference tensor (which has none: an in-place edit
    of one, possible only inside inference_mode, is not seen by the caches)."""
    return -1 if t.is_inference() else t._version


class _Structure:
    """CSR of the mask by rows (forward, grad_weight) and by columns (grad_input)."""

    __slots__ = ("mask", "version", "ptr", "row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm", "nnz", "density",
                 "sparse_b1", "sparse_bn", "sparse_bn_low", "sparse_train", "sparse_train_small", "sparse_ok")

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self.version = _version(mask)
        self.ptr = mask.data_ptr()
        # Normal (not inference) tensors even when built under inference_mode: the ops check
        # a structure's indices once and remember it by its version counter, which
        # inference tensors lack (they would be checked on every call).
        with torch.inference_mode(False):
            self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx = _ops._masked_structure(mask)
            self.t_perm = _ops._masked_structure_perm(self.row_ptr, self.col_idx, self.t_row_ptr)
        self.nnz = int(self.col_idx.shape[0])
        self.density = self.nnz / mask.numel() if mask.numel() else 0.0
        # The path rule (torchslim._path_rules) for the four cases forward() tells apart.
        d, n = self.density, mask.numel()
        self.sparse_b1 = masked_sparse_faster(d, 1, n)
        self.sparse_bn = masked_sparse_faster(d, 2, n)
        self.sparse_bn_low = masked_sparse_faster(d, 2, n, low_precision=True)  # bf16 / fp16 layers
        self.sparse_train = masked_sparse_faster(d, TRAIN_MIN_BATCH, n, training=True)
        self.sparse_train_small = masked_sparse_faster(d, 1, n, training=True)
        # The sparse kernels need in_features > 0 and out_features > 0 (an empty layer runs dense).
        self.sparse_ok = mask.numel() > 0
        if not self.sparse_ok:
            self.sparse_b1 = self.sparse_bn = self.sparse_bn_low = self.sparse_train = self.sparse_train_small = False


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


def _structure_valid(st, mask) -> bool:
    return (st is not None and st.mask is mask and st.ptr == mask.data_ptr()
            and (st.version < 0 or st.version == mask._version))


def _packed_valid(pk, st, weight) -> bool:
    return (pk is not None and pk.st is st and pk.weight is weight and pk.ptr == weight.data_ptr()
            and (pk.version < 0 or pk.version == weight._version))


# Every live layer, so that an optimizer step can refresh the packed values that compiled
# inference graphs read (they cannot check version counters themselves).
_LAYERS: "weakref.WeakSet[MaskedSparseLinear]" = weakref.WeakSet()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if _is_compiling() or not _LAYERS:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_LAYERS):
        if layer.__dict__.get("_pk") is not None and id(layer._parameters.get("weight")) in stepped:
            layer.refresh()


register_optimizer_step_post_hook(_after_optimizer_step)


# ---------------------------------------------------------------- autograd

class _MaskedSparseFn(torch.autograd.Function):
    """The sparse training path. Structure tensors are inputs (not a Python object) so that
    torch.compile traces it like eager."""

    @staticmethod
    def forward(ctx, input, weight, bias, values, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm):
        ctx.save_for_backward(input, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
        # For double backward only, and not saved for backward (no version check): the mask
        # may change between forward and backward (set_mask from another thread); the
        # first-order backward uses the structure of the forward.
        ctx.weight, ctx.mask = weight, mask
        ctx.has_bias = bias is not None
        return _spmm(input, values, row_ptr, col_idx, bias)

    @staticmethod
    def backward(ctx, grad):
        input, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # create_graph=True (e.g. a gradient penalty): the backward must itself be
            # differentiable, so it is written with differentiable dense ops.
            if need_input:
                grad_input = grad @ _MaskedDenseFn.apply(ctx.weight, ctx.mask)
            if need_weight:
                g2, x2 = grad.reshape(-1, grad.shape[-1]), input.reshape(-1, input.shape[-1])
                grad_weight = _MaskedDenseFn.apply(g2.t() @ x2, ctx.mask)
        elif need_input or need_weight:
            values_t = values.index_select(0, t_perm) if need_input else values
            gi, gw = _ops._masked_backward(grad, input, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx,
                                           need_input, need_weight)
            grad_input = gi if need_input else None
            grad_weight = gw if need_weight else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class _MaskedDenseFn(torch.autograd.Function):
    """where(mask, weight, 0) with the same select for the gradient (the dense path). The
    select is its own adjoint, so the backward applies this function again: differentiable
    to any order."""

    @staticmethod
    def forward(ctx, weight, mask):
        ctx.save_for_backward(mask)
        return _ops._masked_dense(weight, mask)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _MaskedDenseFn.apply(grad, mask), None
        return _ops._masked_dense(grad, mask), None


# ---------------------------------------------------------------- the module

class MaskedSparseLinear(nn.Module):
    """Drop-in replacement for nn.Linear computing ``x @ (weight * mask).T + bias``.

    ``weight`` keeps its dense shape (optimizers and DDP work unchanged; its gradient is
    exactly zero where ``mask`` is False); ``mask`` is a bool buffer. ``set_mask`` and
    ``from_dense`` (and ``load_state_dict``) set ``weight`` to exactly 0 at the masked
    positions.

    State dict. ``state_dict()`` holds ``weight`` with exact zeros at the masked positions
    (whatever an optimizer did to them since: a route that drops the mask still computes the
    pruned function) and ``mask`` bit-packed as uint8 ``[out, ceil(in / 8)]`` (see
    :func:`pack_mask_bits`), so a pruned model's state_dict is larger than the dense one's by
    the mask bits only. ``load_state_dict`` accepts that form and the bool ``[out, in]`` mask
    of older checkpoints.

    Execution. The sparse structure (CSR of the mask by rows, for the forward and the
    weight gradient, and by columns, for the input gradient; int16 indices when the
    dimension allows) is built once and cached; it is rebuilt only when the mask changes
    (``set_mask``, an in-place edit — seen through ``mask._version`` —, ``.to()``,
    ``load_state_dict``). Inference reads a packed copy of the kept weights (float32, or
    float64 for float64 layers), refreshed when the weight's version changes (after an
    optimizer step), never the dense weight. Training uses sparse kernels for the forward,
    the input gradient and the weight gradient (a sampled dense-dense product computed
    only at kept positions). Rebuilds take a lock and swap the finished cache in, so several
    threads may call one layer concurrently. Double backward (``create_graph=True``) is
    supported: the backward then runs as differentiable dense ops.

    torch.compile. Compiled graphs read the same cached structure (as graph inputs), so a
    compiled layer costs what the eager one does; the structure and packed values are
    refreshed outside the graph by ``set_mask``, ``load_state_dict``, ``.to()``, every eager
    forward and every ``optimizer.step()`` (a global optimizer step hook). With gradients the
    compiled graph gathers the kept values from ``weight`` itself, so training is always
    current; a compiled no-grad graph cannot check version counters, so after editing
    ``mask`` or ``weight`` in place outside an optimizer call ``layer.refresh()`` (or run the
    layer once eagerly) before calling it. A layer whose structure was never built (a fresh
    constructor call with its all-ones mask) runs the functional op under compile.

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

    and the dense path otherwise; :class:`force_path` overrides the rule.
    ``layer.density`` gives the kept fraction and ``layer.last_path`` the path taken by the
    last forward ("sparse", "dense", or "fused" inside a SparseSequential fused run).

    inference_mode: every entry point works inside ``torch.inference_mode()``; a layer
    constructed there holds ordinary (version-tracked) tensors, and the caches are ordinary
    tensors too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        # Ordinary tensors even inside inference_mode: the caches follow version counters.
        with torch.inference_mode(False):
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
        _LAYERS.add(self)

    # ------------------------------------------------------------ construction and mask

    @classmethod
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None) -> "MaskedSparseLinear":
        """A MaskedSparseLinear computing what ``linear`` computes with ``mask`` applied.

        ``linear``: an ``nn.Linear``, a transformers ``Conv1D`` (its ``[in, out]`` weight is
        stored transposed, ``[out, in]`` contiguous), a layer pruned with
        ``torch.nn.utils.prune`` (parametrized: ``weight_orig`` and its ``weight_mask``; or after
        ``prune.remove``) or a MaskedSparseLinear. ``mask`` None: the layer's own mask if it
        has one (torch pruning's, a MaskedSparseLinear's), and every exact zero of the weight
        counts as pruned; a ``mask`` given with a layer that has its own: their intersection.
        Masked weights are set to exactly 0."""
        weight, bias, own = takeover_parts(linear)
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"mask must have shape {tuple(weight.shape)} (out_features, in_features), "
                                 f"got {tuple(mask.shape)}")
            mask = mask.to(device=weight.device) != 0
            if own is not None:
                mask = mask & own.to(device=weight.device)
        elif own is not None:
            mask = own.to(device=weight.device) & (weight != 0)
        else:
            mask = weight != 0
        layer = cls._empty(weight.shape[1], weight.shape[0], bias is not None, weight.device, weight.dtype)
        with torch.inference_mode(False), torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.set_mask(mask)
        layer.train(linear.training)
        return layer

    @classmethod
    def _empty(cls, in_features, out_features, bias, device, dtype) -> "MaskedSparseLinear":
        """A layer with uninitialised weight, bias and mask, about to be overwritten (no
        random initialisation: no RNG consumed, no time spent)."""
        layer = cls(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        with torch.inference_mode(False):
            return layer.to_empty(device=device)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Set the mask (nonzero = kept), zero ``weight`` at the masked positions and rebuild
        the cached structure."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"mask must have shape {(self.out_features, self.in_features)} (out_features, in_features), got {tuple(mask.shape)}"
            )
        with torch.no_grad():
            self.mask.copy_(mask.to(device=self.mask.device) != 0)
        self._zero_masked_weights()
        self.refresh()

    def _zero_masked_weights(self) -> None:
        w = self._parameters["weight"]
        if w.device.type == "meta" or type(w) not in (torch.Tensor, nn.Parameter):
            return  # (meta: no data; a tensor subclass such as FSDP's DTensor: mask before sharding)
        if w.is_inference() and not torch.is_inference_mode_enabled():
            return  # (an inference tensor cannot be written outside inference_mode)
        with torch.no_grad():
            w.masked_fill_(~self.mask.to(w.device), 0)

    @property
    def density(self) -> float:
        st = self.__dict__.get("_st")
        if _structure_valid(st, self.mask):
            return st.density
        return float(self.mask.sum().item()) / max(self.mask.numel(), 1)

    @property
    def last_path(self) -> str | None:
        """The path the last forward took: "sparse", "dense", or "fused" (a SparseSequential
        fused run, on the sparse kernels); None before any forward."""
        return self.__dict__.get("_last_path")

    def to_dense(self) -> nn.Linear:
        with torch.inference_mode(False):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=self.weight.device, dtype=self.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.where(self.mask, self.weight, torch.zeros((), dtype=self.weight.dtype,
                                                                                    device=self.weight.device)))
                if self.bias is not None:
                    linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        mask = self._buffers["mask"]
        w = destination.get(prefix + "weight")
        if (w is not None and w.device.type != "meta" and type(w) in (torch.Tensor, nn.Parameter)
                and mask.device == w.device):
            clean = _ops._masked_dense(w.detach(), mask)
            if not torch.equal(clean, w.detach()):  # drift at masked positions (Adam, weight decay, edits)
                destination[prefix + "weight"] = clean
        if prefix + "mask" in destination:
            destination[prefix + "mask"] = pack_mask_bits(mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "mask"
        mask = state_dict.get(key)
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            try:
                state_dict[key] = unpack_mask_bits(mask, self.out_features, self.in_features)
            except ValueError as e:
                error_msgs.append(f"{key}: {e} (or a bool mask of shape {(self.out_features, self.in_features)})")
                return
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == n_errors:
            self._zero_masked_weights()
            self.refresh()

    # ------------------------------------------------------------ caches

    def _clear_caches(self) -> None:
        d = self.__dict__
        for slot in _CACHE_SLOTS:
            d[slot] = None

    def refresh(self) -> None:
        """Bring the cached structure (and the packed kept values, where an inference path
        may read them) up to date with ``mask`` and ``weight`` now. Eager calls do this by
        themselves; call it after editing ``mask`` or ``weight`` in place outside an
        optimizer before running a compiled no-grad graph of the layer."""
        mask, weight = self._buffers["mask"], self._parameters["weight"]
        if mask.device.type == "meta" or weight.device.type == "meta":
            self._clear_caches()
            return
        # Inference tensors have no version counter: what was derived from them cannot be
        # known current, so it is rebuilt.
        st = self._structure(mask, rebuild_unversioned=True)
        if st.sparse_b1 or st.sparse_bn or _FORCED_PATH == "sparse" or self.__dict__["_pk"] is not None:
            self._packed("_pk", st, weight, rebuild_unversioned=True)
        if weight.is_inference():
            self.__dict__["_dw"] = None

    def _structure(self, mask: torch.Tensor, rebuild_unversioned: bool = False) -> _Structure:
        with _REBUILD_LOCK:
            st = self.__dict__["_st"]
            if not _structure_valid(st, mask) or (rebuild_unversioned and st.version < 0):
                st = _Structure(mask)
                self.__dict__["_st"] = st
            return st

    def _packed(self, slot: str, st: _Structure, weight: torch.Tensor, rebuild_unversioned: bool = False) -> torch.Tensor:
        with _REBUILD_LOCK:
            pk = self.__dict__[slot]
            if not _packed_valid(pk, st, weight) or (rebuild_unversioned and pk.version < 0):
                version, ptr = _version(weight), weight.data_ptr()
                with torch.inference_mode(False), torch.no_grad():
                    if slot == "_pk":
                        data = _gather(weight, st.row_ptr, st.col_idx, False)
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
        if not _structure_valid(st, mask):
            st = self._structure(mask)
        pk = self._pk
        if not _packed_valid(pk, st, weight):
            return st, self._packed("_pk", st, weight)
        return st, pk.data

    def _apply(self, fn, recurse=True):
        built = self.__dict__.get("_st") is not None
        out = super()._apply(fn, recurse)
        if built:  # (.to / .cuda / .double: compiled graphs need the structure on the new device)
            self.refresh()
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        for slot in _CACHE_SLOTS:
            state[slot] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for slot in _CACHE_SLOTS:
            self.__dict__.setdefault(slot, None)
        _LAYERS.add(self)

    # ------------------------------------------------------------ forward

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Kept lean: this runs once per layer per call, and at batch 1 its Python cost is
        # comparable to the kernel's.
        params = self._parameters
        weight, bias, mask = params["weight"], params.get("bias"), self._buffers["mask"]
        if _is_compiling():
            return self._forward_traced(input, weight, bias, mask)
        if (not isinstance(input, torch.Tensor) or input.dtype != weight.dtype or input.shape[-1] != self.in_features
                or input.device != weight.device):
            return masked_linear(input, weight, mask, bias)  # raises the op's clear error
        st = self._st
        if (st is None or st.mask is not mask or st.ptr != mask.data_ptr()
                or (st.version >= 0 and st.version != mask._version)):
            st = self._structure(mask)
        grad = _grad_enabled() and (weight.requires_grad or input.requires_grad
                                    or (bias is not None and bias.requires_grad))
        forced = _FORCED_PATH
        if forced is not None:
            sparse = forced == "sparse" and st.sparse_ok
        elif grad:
            sparse = st.sparse_train if input.numel() >= TRAIN_MIN_BATCH * self.in_features else st.sparse_train_small
        else:
            sparse = st.sparse_b1 if input.numel() <= self.in_features else (
                st.sparse_bn_low if weight.dtype in _LOW_PRECISION else st.sparse_bn)
        if sparse:
            self.__dict__["_last_path"] = "sparse"
            pk = self._pk
            if (pk is None or pk.st is not st or pk.weight is not weight or pk.ptr != weight.data_ptr()
                    or (pk.version >= 0 and pk.version != weight._version)):
                values = self._packed("_pk", st, weight)
            else:
                values = pk.data
            if grad:
                return _MaskedSparseFn.apply(input, weight, bias, values, mask, st.row_ptr, st.col_idx, st.t_row_ptr,
                                             st.t_col_idx, st.t_perm)
            return _spmm(input, values, st.row_ptr, st.col_idx, bias)
        self.__dict__["_last_path"] = "dense"
        if grad:
            return F.linear(input, _MaskedDenseFn.apply(weight, mask), bias)
        pk = self._dw
        if not _packed_valid(pk, st, weight):
            return F.linear(input, self._packed("_dw", st, weight), bias)
        return F.linear(input, pk.data, bias)

    def _forward_traced(self, input, weight, bias, mask):
        """forward under torch.compile: the cached structure (built eagerly, see the class
        docstring) enters the graph as inputs; version counters cannot be read here."""
        st = self.__dict__["_st"]
        if st is None or st.mask is not mask:  # never built for this mask: the functional op
            return masked_linear(input, weight, mask, bias)
        grad = _grad_enabled() and (weight.requires_grad or input.requires_grad
                                    or (bias is not None and bias.requires_grad))
        forced = _FORCED_PATH
        if forced is not None:
            sparse = forced == "sparse" and st.sparse_ok
        elif grad:
            sparse = st.sparse_train if input.numel() >= TRAIN_MIN_BATCH * self.in_features else st.sparse_train_small
        else:
            sparse = st.sparse_b1 if input.numel() <= self.in_features else (
                st.sparse_bn_low if weight.dtype in _LOW_PRECISION else st.sparse_bn)
        if not sparse:
            self._last_path = "dense"
            return F.linear(input, _MaskedDenseFn.apply(weight, mask), bias)
        self._last_path = "sparse"
        if grad:  # the kept values from the weight itself: always current in training
            values = _gather(weight.detach(), st.row_ptr, st.col_idx, False)
            return _MaskedSparseFn.apply(input, weight, bias, values, mask, st.row_ptr, st.col_idx, st.t_row_ptr,
                                         st.t_col_idx, st.t_perm)
        pk = self.__dict__["_pk"]
        values = pk.data if pk is not None and pk.st is st and pk.weight is weight else _gather(
            weight, st.row_ptr, st.col_idx, False)
        return _spmm(input, values, st.row_ptr, st.col_idx, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, density={self.density:.4f}"
