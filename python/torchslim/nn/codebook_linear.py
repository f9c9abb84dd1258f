"""CodebookLinear: a linear layer whose weights are small indices into a codebook of shared
values (Deep Compression's weight sharing)."""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.kmeans import INITS, assign, kmeans_1d
from torchslim.ops import codebook_linear
from torchslim.ops._reference import pack_int4, unpack_int4
from torchslim.ops.sparse_codebook_linear import sparse_codebook_linear, sparse_codebook_pack

MAX_CLUSTERS = 256
PACKED_MAX_CLUSTERS = 16

# Sparse-codebook rule for zero_pinned layers (torchslim._path_rules): the sparse-codebook
# kernel is faster at density <= 0.15 for batch < 32, <= 0.4 from batch 32.
from torchslim._path_rules import (SPARSE_CODEBOOK_MAX_DENSITY, SPARSE_CODEBOOK_MAX_DENSITY_SMALL_BATCH,  # noqa: E402,F401
                                   SPARSE_CODEBOOK_MIN_BATCH, sparse_codebook_faster)

_sc_op = torch.ops.torchslim.sparse_codebook_linear.default
_is_compiling = torch.compiler.is_compiling
_REBUILD_LOCK = threading.Lock()


def _version(t: torch.Tensor) -> int:
    # Inference tensors have no version counter (-1): identity and storage are all a cache
    # can check for them, as in MaskedSparseLinear.
    return -1 if t.is_inference() else t._version


class _SparseCodes:
    """(row_ptr, col_idx, codes) of a zero_pinned layer's ``indices`` (kept = index != 0),
    valid while ``indices`` keeps its identity, storage and version."""

    __slots__ = ("indices", "version", "ptr", "row_ptr", "col_idx", "codes", "nnz", "density")

    def __init__(self, indices: torch.Tensor, labels: torch.Tensor, num_clusters: int):
        # version / ptr read before deriving, so a racing edit leaves this marked stale.
        self.indices, self.version, self.ptr = indices, _version(indices), indices.data_ptr()
        # Ordinary tensors even under inference_mode: the op checks a structure once and
        # remembers it by version counter, which inference tensors lack.
        with torch.inference_mode(False), torch.no_grad():
            self.row_ptr, self.col_idx, self.codes = sparse_codebook_pack(labels, None, num_clusters)
        self.nnz = int(self.col_idx.shape[0])
        self.density = self.nnz / labels.numel() if labels.numel() else 0.0

    def valid_for(self, indices: torch.Tensor) -> bool:
        return (self.indices is indices and self.ptr == indices.data_ptr()
                and (self.version < 0 or self.version == indices._version))


_sc_grad_input = torch.ops.torchslim.sparse_codebook_linear_grad_input.default
_sc_grad_codebook = torch.ops.torchslim.sparse_codebook_linear_grad_codebook.default


class _SparseCodebookFn(torch.autograd.Function):
    """The sparse-codebook path with gradients. The first-order backward runs the op's
    sparse gradient kernels; under ``create_graph=True`` (double backward, which the op's
    codebook gradient does not support) it is written with differentiable dense ops."""

    @staticmethod
    def forward(ctx, input, codebook, bias, row_ptr, col_idx, codes, indices, in_features):
        ctx.save_for_backward(input, codebook, row_ptr, col_idx, codes, indices)
        ctx.in_features = in_features
        return _sc_op(input, row_ptr, col_idx, codes, codebook, bias)

    @staticmethod
    def backward(ctx, grad):
        input, codebook, row_ptr, col_idx, codes, indices = ctx.saved_tensors
        need_input, need_codebook, need_bias = ctx.needs_input_grad[:3]
        gi = gc = gb = None
        if torch.is_grad_enabled():
            labels = (unpack_int4(indices, ctx.in_features) if codebook.numel() <= PACKED_MAX_CLUSTERS
                      else indices).long()
            kept = labels != 0
            if need_input:
                gi = grad @ torch.where(kept, codebook[labels], torch.zeros((), dtype=codebook.dtype))
            if need_codebook:
                g2, x2 = grad.reshape(-1, grad.shape[-1]), input.reshape(-1, input.shape[-1])
                dw = torch.where(kept, g2.t() @ x2, torch.zeros((), dtype=grad.dtype))
                gc = torch.zeros_like(codebook).index_add(0, labels.reshape(-1), dw.reshape(-1))
        else:
            if need_input:
                gi = _sc_grad_input(grad, row_ptr, col_idx, codes, codebook, ctx.in_features)
            if need_codebook:
                gc = _sc_grad_codebook(grad, input, row_ptr, col_idx, codes, codebook)
        if need_bias:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gi, gc, gb, None, None, None, None, None


def _check_num_clusters(num_clusters) -> int:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int):
        raise ValueError(f"num_clusters must be an integer in 1..{MAX_CLUSTERS}, got {num_clusters!r}")
    if not 1 <= num_clusters <= MAX_CLUSTERS:
        raise ValueError(
            f"num_clusters must be in 1..{MAX_CLUSTERS} (indices are uint8), got {num_clusters}")
    return num_clusters


def index_bits(num_clusters: int) -> int:
    """Bits each stored index takes: 4 (packed two a byte) for <= 16 clusters, else 8."""
    return 4 if num_clusters <= PACKED_MAX_CLUSTERS else 8


def encode_indices(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """[out, in] integer labels < num_clusters -> the uint8 ``indices`` layout of a layer
    with ``num_clusters`` clusters (packed 4-bit when num_clusters <= 16)."""
    idx = labels.to(torch.uint8)
    return pack_int4(idx) if num_clusters <= PACKED_MAX_CLUSTERS else idx.contiguous()


class CodebookLinear(nn.Module):
    """Drop-in replacement for nn.Linear computing ``x @ codebook[indices].T + bias``.

    - ``codebook``: Parameter [num_clusters], the shared weight values (trainable). Under
      global sharing (``torchslim.share.cluster_weights(scope="global")``) several layers
      hold the same Parameter object, so its gradient sums over them.
    - ``indices``: uint8 buffer, not trained. num_clusters <= 16: packed 4-bit
      [out, ceil(in/2)] (element j in the low nibble of byte j//2 when j is even, the high
      nibble when odd); otherwise [out, in].
    - ``bias``: Parameter [out] or None.
    - ``weight``: the decoded [out, in] weight (read-only property, differentiable with
      respect to ``codebook``).
    - ``zero_pinned``: codebook[0] is held at exactly 0.0 and indexes the pruned positions.
      The forward reads the codebook as ``[0, codebook[1:]]``, so codebook[0] gets an exactly
      zero gradient on every backward and the layer computes with 0 there whatever the stored
      value; this is structural (no hook), so it survives state_dict, deepcopy, pickling and
      torch.compile. Since the stored value is 0 and its gradient is 0, SGD/Adam/AdamW
      weight decay (which scales with the value) leaves it at 0 too.

    Sparse-codebook path (``zero_pinned`` layers). The layer then runs
    ``torchslim.ops.sparse_codebook_linear`` on its kept positions only (CSR + one 4-bit code
    per kept weight, the EIE layout) when that is faster than the dense-codebook kernel:
    density (fraction of indices != 0) <= 0.15 at batch < 32, <= 0.4 at batch >= 32
    (measured, fp32, benchmarks/notes/sparse_codebook.md). ``(row_ptr, col_idx, codes)`` are
    derived from ``indices`` once and cached; they are rebuilt (under a lock, so threads may
    share a layer) when ``indices`` changes: ``assign_indices``, ``load_state_dict``, ``.to()``,
    an in-place edit (seen through the version counter; an inference tensor has none, so an
    in-place edit of one inside inference_mode is not seen). Gradients flow to the input,
    the codebook (codebook[0] still gets exactly 0) and the bias, as on the codebook path
    (the first-order backward on the sparse kernels; ``create_graph=True`` backward as
    differentiable dense ops).
    ``layer.last_path`` says which ran ("sparse_codebook" or "codebook");
    ``torchslim.nn.force_path("sparse" / "dense")`` forces one. Under ``torch.compile`` the
    layer always runs the codebook kernel (a compiled graph cannot check that the cached
    structure is current), so compiled and eager results agree whatever is edited.
    """

    def __init__(self, in_features: int, out_features: int, num_clusters: int = 16, bias: bool = True,
                 zero_pinned: bool = False, device=None, dtype=None):
        super().__init__()
        self._build(in_features, out_features, num_clusters, bias, zero_pinned, device, dtype)
        self.reset_parameters()

    def _build(self, in_features, out_features, num_clusters, bias, zero_pinned, device, dtype) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        _check_num_clusters(num_clusters)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_clusters = num_clusters
        self.zero_pinned = bool(zero_pinned)
        # Ordinary tensors even inside inference_mode, so that the layer can be trained later.
        with torch.inference_mode(False):
            self.codebook = nn.Parameter(torch.empty(num_clusters, **factory))
            self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
            cols = (in_features + 1) // 2 if num_clusters <= PACKED_MAX_CLUSTERS else in_features
            self.register_buffer("indices", torch.empty(out_features, cols, dtype=torch.uint8, device=device))
        self.reconstruction_error: float | None = None  # set by from_dense / assign_indices
        self.__dict__["_sc"] = None

    @classmethod
    def _uninitialized(cls, in_features, out_features, num_clusters, bias, zero_pinned, device, dtype):
        """A layer whose codebook, indices and bias are about to be overwritten (skips the
        random initialisation)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(in_features, out_features, num_clusters, bias, zero_pinned, device, dtype)
        return layer

    def reset_parameters(self) -> None:
        """nn.Linear's range: codebook evenly spaced in +-1/sqrt(in_features), random
        indices (drawn from the global RNG), bias uniform in the same range."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.codebook.copy_(torch.linspace(-bound, bound, self.num_clusters))
            if self.zero_pinned:
                self.codebook[0] = 0.0
            labels = torch.randint(0, self.num_clusters, (self.out_features, self.in_features),
                                   device=self.indices.device)
            self.indices.copy_(encode_indices(labels, self.num_clusters))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    # ---- decoding -------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Bits per stored index (4 packed, or 8)."""
        return index_bits(self.num_clusters)

    @property
    def packed(self) -> bool:
        return self.num_clusters <= PACKED_MAX_CLUSTERS

    def effective_codebook(self) -> torch.Tensor:
        """The codebook the layer computes with: ``[0, codebook[1:]]`` when zero_pinned."""
        if self.zero_pinned:
            return F.pad(self.codebook[1:], (1, 0))
        return self.codebook

    def labels(self) -> torch.Tensor:
        """Unpacked indices [out, in] (uint8)."""
        if self.packed:
            return unpack_int4(self.indices, self.in_features)
        return self.indices

    @property
    def weight(self) -> torch.Tensor:
        """Decoded weight ``codebook[indices]`` [out, in] (read-only; a fresh tensor)."""
        return self.effective_codebook()[self.labels().long()]

    # ---- conversion -----------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Module, num_clusters: int = 16, init: str = "linear",
                   mask: torch.Tensor | None = None, seed: int = 0, max_iter: int = 300) -> "CodebookLinear":
        """k-means the weights of ``linear`` into ``num_clusters`` shared values.

        ``linear``: an nn.Linear, a transformers ``Conv1D`` (read as the ``[out, in]`` linear
        layer it is), a MaskedSparseLinear, or a layer pruned with ``torch.nn.utils.prune``
        (parametrized: its ``weight_mask`` is the mask; after ``prune.remove`` it is a plain
        layer). With a mask (the ``mask`` argument, or the layer's own mask for a
        MaskedSparseLinear or a torch-pruned layer; both given: their intersection) the layer is ``zero_pinned``: the pruned positions
        index codebook[0] == 0.0 and stay exactly zero, and the other ``num_clusters - 1``
        centroids are fitted to the kept weights only (so ``num_clusters`` must be >= 2).
        Without a mask every weight, zeros included, is clustered into ``num_clusters``.
        ``init``: "linear" | "density" | "kmeans++" | "random" (see torchslim.kmeans);
        ``seed`` makes the random inits reproducible. The relative reconstruction error
        ||W - W_shared|| / ||W|| is kept in ``reconstruction_error``.
        """
        weight, bias, eff_mask = _dense_parts(linear, mask)
        _check_num_clusters(num_clusters)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(repr(i) for i in INITS)}, got {init!r}")
        pinned = eff_mask is not None
        if pinned and num_clusters < 2:
            raise ValueError("num_clusters must be >= 2 for a pruned layer (codebook[0] is the pinned zero)")
        kept = weight[eff_mask] if pinned else weight.reshape(-1)
        free = num_clusters - 1 if pinned else num_clusters
        if kept.numel() > 0:
            centroids = kmeans_1d(kept, free, init=init, seed=seed, max_iter=max_iter, return_labels=False).centroids
        else:
            centroids = torch.zeros(free, dtype=torch.float64)
        layer = cls._uninitialized(weight.shape[1], weight.shape[0], num_clusters, bias is not None,
                                   pinned, weight.device, weight.dtype)
        codebook = torch.cat([torch.zeros(1, dtype=torch.float64), centroids]) if pinned else centroids
        with torch.no_grad():
            layer.codebook.copy_(codebook.to(layer.codebook))
            if bias is not None:
                layer.bias.copy_(bias)
        layer.assign_indices(weight, eff_mask)
        return layer

    @torch.no_grad()
    def assign_indices(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Set ``indices`` to each weight's nearest codebook entry (codebook[1:] when
        zero_pinned, with masked-out positions -> 0), and record ``reconstruction_error``."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        w = weight.detach().to(self.codebook.device)
        if self.zero_pinned:
            centroids = self.codebook.detach()[1:]
            labels = assign(w, centroids) + 1 if centroids.numel() else torch.ones_like(w, dtype=torch.long)
            if mask is not None:
                labels = labels.masked_fill(~mask.to(device=w.device, dtype=torch.bool), 0)
            target = w if mask is None else w * mask.to(device=w.device, dtype=w.dtype)
        else:
            labels = assign(w, self.codebook.detach())
            target = w
        self.indices.copy_(encode_indices(labels, self.num_clusters).to(self.indices.device))
        err = float(torch.linalg.vector_norm(self.weight.detach() - target, dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(target, dtype=torch.float64))
        self.reconstruction_error = err / norm if norm > 0 else err

    def to_dense(self) -> nn.Linear:
        """An nn.Linear holding the decoded weight and the bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.codebook.device, dtype=self.codebook.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The functional op infers the packed 4-bit layout from the widths; the layer knows
        # in_features, so an input of the wrong width (e.g. 2*in, which with packed indices
        # would look like a valid unpacked call) is an error here, never a silent misread.
        if isinstance(input, torch.Tensor) and input.dim() >= 1 and input.shape[-1] != self.in_features:
            raise ValueError(f"CodebookLinear: input.shape[-1] must be in_features = {self.in_features}, "
                             f"got input of shape {tuple(input.shape)}")
        indices = self._buffers["indices"]
        if (self.zero_pinned and not _is_compiling() and isinstance(input, torch.Tensor)
                and input.dtype == self.codebook.dtype and input.device == indices.device and indices.numel()
                and indices.device.type != "meta"):
            sc = self.__dict__.get("_sc")
            if sc is None or not sc.valid_for(indices):
                sc = self._sparse_codes(indices)
            from torchslim.nn.masked_sparse_linear import forced_path

            forced = forced_path()
            if forced is not None:
                sparse = forced == "sparse"
            else:
                batch = input.numel() // self.in_features if self.in_features else 0
                sparse = sparse_codebook_faster(sc.density, batch)
            if sparse:
                self.__dict__["_last_path"] = "sparse_codebook"
                bias = self.bias
                if torch.is_grad_enabled() and (input.requires_grad or self.codebook.requires_grad
                                                or (bias is not None and bias.requires_grad)):
                    return _SparseCodebookFn.apply(input, self.effective_codebook(), bias, sc.row_ptr, sc.col_idx,
                                                   sc.codes, indices, self.in_features)
                return _sc_op(input, sc.row_ptr, sc.col_idx, sc.codes, self.effective_codebook(), bias)
        if not _is_compiling():
            self.__dict__["_last_path"] = "codebook"
        return codebook_linear(input, indices, self.effective_codebook(), self.bias)

    def _sparse_codes(self, indices: torch.Tensor) -> _SparseCodes:
        with _REBUILD_LOCK:
            sc = self.__dict__.get("_sc")
            if sc is None or not sc.valid_for(indices):
                sc = _SparseCodes(indices, self.labels(), self.num_clusters)
                self.__dict__["_sc"] = sc
            return sc

    def sparse_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(row_ptr, col_idx, codes)`` of the kept positions (zero_pinned layers), the
        cached layout the sparse-codebook path runs."""
        if not self.zero_pinned:
            raise ValueError("sparse_codes: only a zero_pinned layer (pruned + shared) has kept positions")
        indices = self._buffers["indices"]
        sc = self.__dict__.get("_sc")
        if sc is None or not sc.valid_for(indices):
            sc = self._sparse_codes(indices)
        return sc.row_ptr, sc.col_idx, sc.codes

    @property
    def density(self) -> float:
        """Fraction of positions whose index is not the pinned zero (1.0 if not zero_pinned)."""
        if not self.zero_pinned:
            return 1.0
        indices = self._buffers["indices"]
        sc = self.__dict__.get("_sc")
        if sc is not None and sc.valid_for(indices):
            return sc.density
        n = self.in_features * self.out_features
        return float((self.labels() != 0).sum()) / n if n else 0.0

    @property
    def last_path(self) -> str | None:
        """The path the last eager forward took: "sparse_codebook" or "codebook" (None before any)."""
        return self.__dict__.get("_last_path")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_sc"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_sc", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"K={self.num_clusters}, bits={self.bits}, zero_pinned={self.zero_pinned}")


def _dense_parts(linear: nn.Module, mask):
    """(weight [out, in], bias, mask or None) of a layer CodebookLinear.from_dense takes over
    (see torchslim.nn.masked_sparse_linear.takeover_parts); masked weights are zeroed."""
    from torchslim.nn.masked_sparse_linear import takeover_parts

    try:
        weight, bias, own = takeover_parts(linear)
    except TypeError:
        raise TypeError(f"from_dense expects an nn.Linear, a transformers Conv1D, a MaskedSparseLinear or a layer "
                        f"pruned with torch.nn.utils.prune, got {type(linear).__name__}") from None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must have shape {tuple(weight.shape)} (out_features, in_features), got {tuple(mask.shape)}")
        mask = mask.to(device=weight.device) != 0
        own = mask if own is None else (own.to(device=weight.device) & mask)
    if own is not None:
        own = own.to(device=weight.device, dtype=torch.bool)
        weight = torch.where(own, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return weight, bias, own
