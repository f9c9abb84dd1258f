"""Inference-only layer forms made by ``torchslim.deploy`` (or ``load(..., deploy=True)``).

A deployed layer holds only its compressed data, as buffers (no Parameters, no dense
weight): ``torch.compile`` reads them as graph inputs, ``state_dict`` / ``.to(device)`` work,
and nothing can train them by accident. For training use ``torchslim.to_sparse`` (or the
MaskedSparseLinear / CodebookLinear modules themselves).

- ``DeployedSparseLinear``: packed kept values + CSR structure (``row_ptr``, ``col_idx``),
  run by the sparse kernel ``torch.ops.torchslim._masked_spmm``.
- ``DeployedDenseLinear``: the dense fallback, for layers too dense for the sparse kernel to
  be faster (density > ``SPARSE_MAX_DENSITY`` = 0.4, the batch > 1 rule of
  MaskedSparseLinear): it holds the masked dense weight, as ``nn.Linear`` would.
- ``DeployedCodebookLinear``: cluster indices (4-bit packed for <= 16 clusters) + codebook,
  run by the codebook kernel.
- ``DeployedSparseCodebookLinear``: a pruned + shared layer in its compressed form: CSR
  positions (``row_ptr``, ``col_idx``), one 4-bit (or 8-bit) code per kept weight and the
  codebook, run by ``sparse_codebook_linear`` (no decoded values). Deploy picks it for
  zero_pinned layers of density <= 0.15 (there it is at least as fast as the other forms at
  batch 1) and small ones (<= 65536 weights) up to 0.4 (so that a pruned + shared MLP is one
  fused chain); others get the decoded sparse (or dense) form (torchslim._path_rules).
- ``DeployedSequential``: an ``nn.Sequential`` whose runs of float32 / float64
  DeployedSparseLinear layers (with ReLU, Identity, Dropout between them) run as one fused
  ``_sparse_mlp`` call on the CPU, as ``SparseSequential`` does for training-capable layers,
  and whose runs of DeployedSparseCodebookLinear layers run as one ``_sparse_codebook_mlp``
  call (from the codes, no decoded values).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._path_rules import deploy_as_dense
from torchslim.ops import codebook_linear
from torchslim.ops._reference import unpack_int4

__all__ = ["DeployedSparseLinear", "DeployedDenseLinear", "DeployedCodebookLinear", "DeployedSparseCodebookLinear",
           "DeployedSequential",
           "DeployedLayerError", "DEPLOYED_TYPES"]

_spmm = torch.ops.torchslim._masked_spmm.default
_sc_op = torch.ops.torchslim.sparse_codebook_linear.default
_sparse_mlp = torch.ops.torchslim._sparse_mlp.default
_sc_mlp = torch.ops.torchslim._sparse_codebook_mlp.default
_grad_enabled = torch.is_grad_enabled


class DeployedLayerError(RuntimeError):
    """Raised when a deployed (inference-only) layer is asked for gradients or a weight."""


def _refuse(layer, what: str):
    return DeployedLayerError(
        f"{type(layer).__name__} is an inference-only deployed layer (it holds only compressed data, as buffers): "
        f"{what}. For training or fine-tuning use torchslim.to_sparse(model) or the model before deploy().")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _index_dtype(extent: int) -> torch.dtype:
    return torch.int16 if extent <= 32767 else torch.int32


class _Deployed(nn.Module):
    """Common behaviour: no gradients, no ``weight``, ``to_dense`` for export."""

    in_features: int
    out_features: int

    @property
    def weight(self):
        raise _refuse(self, "it has no dense .weight (use .to_dense().weight to decode one)")

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise _refuse(self, "requires_grad_() is not supported")
        return self

    def _check_input(self, input) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}")
        if _grad_enabled():
            if input.requires_grad:
                raise _refuse(self, "it was called on an input that requires grad (gradients are not supported; "
                                    "wrap the call in torch.inference_mode() or torch.no_grad(), or detach the input)")
            for name, t in self._buffers.items():
                if t is not None and t.requires_grad:
                    raise _refuse(self, f"its buffer {name!r} requires grad")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input.shape[-1] must be in_features = {self.in_features}, "
                             f"got input of shape {tuple(input.shape)}")

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (a decoded dense weight)."""
        w = self._dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(w.clone())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear


class DeployedSparseLinear(_Deployed):
    """``y = x @ W.T + b`` with W held as CSR: ``values`` [nnz] (float32; float64 for a float64
    layer), ``row_ptr`` int32 [out + 1], ``col_idx`` [nnz] (int16 when in_features <= 32767,
    else int32), ``bias`` [out] in the layer's dtype. Inputs of the layer's dtype (``dtype``)."""

    def __init__(self, in_features: int, out_features: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 values: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = int(in_features), int(out_features), dtype
        if tuple(row_ptr.shape) != (self.out_features + 1,) or row_ptr.dtype != torch.int32:
            raise ValueError(f"row_ptr must be int32 of shape ({self.out_features + 1},), got {row_ptr.dtype} "
                             f"of shape {tuple(row_ptr.shape)}")
        if col_idx.dim() != 1 or col_idx.dtype not in (torch.int16, torch.int32):
            raise ValueError(f"col_idx must be a 1-D int16/int32 tensor, got {col_idx.dtype} of shape {tuple(col_idx.shape)}")
        if tuple(values.shape) != tuple(col_idx.shape) or values.dtype != _acc_dtype(dtype):
            raise ValueError(f"values must be {_acc_dtype(dtype)} of shape {tuple(col_idx.shape)}, got {values.dtype} "
                             f"of shape {tuple(values.shape)}")
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @classmethod
    def from_masked(cls, layer) -> "DeployedSparseLinear":
        """From a MaskedSparseLinear: its cached structure and packed values, copied."""
        with torch.inference_mode(False), torch.no_grad():
            st, values = layer._sparse_data()
            bias = None if layer.bias is None else layer.bias.detach().clone()
            return cls(layer.in_features, layer.out_features, st.row_ptr.clone(), st.col_idx.clone(),
                       values.detach().clone(), bias, layer.weight.dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .double(): the layer computes in the new dtype; its values
        # stay in the kernel's accumulation dtype (float32, or float64 for float64 layers).
        out = super()._apply(fn, recurse)
        dtype = self._buffers["values"].dtype
        if dtype.is_floating_point and dtype != _acc_dtype(self.dtype):
            self.dtype = dtype
            self._buffers["values"] = self._buffers["values"].to(_acc_dtype(dtype))
        return out

    @property
    def nnz(self) -> int:
        return int(self.col_idx.shape[0])

    @property
    def density(self) -> float:
        n = self.in_features * self.out_features
        return self.nnz / n if n else 0.0

    def _dense_weight(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=self.row_ptr.device),
                                       self.row_ptr.diff().long())
        w = torch.zeros(self.out_features, self.in_features, dtype=self.dtype, device=self.values.device)
        w[rows, self.col_idx.long()] = self.values.to(self.dtype)
        return w

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return _spmm(input, self.values, self.row_ptr, self.col_idx, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.4f}, dtype={self.dtype}")


class DeployedDenseLinear(_Deployed):
    """The dense fallback of a deployed layer: ``F.linear(x, dense_weight, bias)``, for layers
    whose density exceeds ``SPARSE_MAX_DENSITY`` (the sparse kernel would be slower there).
    ``dense_weight`` is the masked (or decoded) weight [out, in], a buffer."""

    def __init__(self, dense_weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if dense_weight.dim() != 2:
            raise ValueError(f"dense_weight must be 2-D [out, in], got shape {tuple(dense_weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in dense_weight.shape)
        self.register_buffer("dense_weight", dense_weight)
        self.register_buffer("bias", bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.dense_weight.dtype

    def _dense_weight(self) -> torch.Tensor:
        return self.dense_weight.detach()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return F.linear(input, self.dense_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class DeployedCodebookLinear(_Deployed):
    """``y = x @ codebook[indices].T + b``: ``indices`` uint8 (4-bit packed
    [out, ceil(in/2)] when num_clusters <= 16, else [out, in]), ``codebook`` [num_clusters]
    the values the layer computes with (for a zero_pinned layer codebook[0] is 0.0)."""

    def __init__(self, in_features: int, out_features: int, indices: torch.Tensor, codebook: torch.Tensor,
                 bias: torch.Tensor | None, zero_pinned: bool = False):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.num_clusters, self.zero_pinned = int(codebook.numel()), bool(zero_pinned)
        cols = (self.in_features + 1) // 2 if self.num_clusters <= 16 else self.in_features
        if indices.dtype != torch.uint8 or tuple(indices.shape) != (self.out_features, cols):
            raise ValueError(f"indices must be uint8 of shape {(self.out_features, cols)}, got {indices.dtype} "
                             f"of shape {tuple(indices.shape)}")
        self.register_buffer("indices", indices)
        self.register_buffer("codebook", codebook)
        self.register_buffer("bias", bias)

    @classmethod
    def from_codebook(cls, layer) -> "DeployedCodebookLinear":
        with torch.inference_mode(False), torch.no_grad():
            bias = None if layer.bias is None else layer.bias.detach().clone()
            return cls(layer.in_features, layer.out_features, layer.indices.detach().clone(),
                       layer.effective_codebook().detach().clone(), bias, layer.zero_pinned)

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    def labels(self) -> torch.Tensor:
        return unpack_int4(self.indices, self.in_features) if self.num_clusters <= 16 else self.indices

    def _dense_weight(self) -> torch.Tensor:
        return self.codebook.detach()[self.labels().long()]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return codebook_linear(input, self.indices, self.codebook, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"K={self.num_clusters}, zero_pinned={self.zero_pinned}")


class DeployedSparseCodebookLinear(_Deployed):
    """``y = x @ W.T + b`` with W in the sparse-codebook (EIE) layout of
    ``torchslim.ops.sparse_codebook_linear``: ``row_ptr`` int32 [out + 1], ``col_idx`` int16
    (int32 when in_features > 32767) [nnz], ``codes`` uint8 (4-bit packed [ceil(nnz / 2)] when
    num_clusters <= 16, else [nnz]), ``codebook`` [num_clusters] (codebook[0] is the pruned
    zero, never read) and ``bias`` [out]. Nothing of size out * in or nnz is held in floating
    point. Inputs of the codebook's dtype (``.to(dtype)`` converts codebook and bias)."""

    def __init__(self, in_features: int, out_features: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 codes: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.num_clusters = int(codebook.numel())
        if tuple(row_ptr.shape) != (self.out_features + 1,) or row_ptr.dtype != torch.int32:
            raise ValueError(f"row_ptr must be int32 of shape ({self.out_features + 1},), got {row_ptr.dtype} "
                             f"of shape {tuple(row_ptr.shape)}")
        if col_idx.dim() != 1 or col_idx.dtype not in (torch.int16, torch.int32):
            raise ValueError(f"col_idx must be a 1-D int16/int32 tensor, got {col_idx.dtype} of shape {tuple(col_idx.shape)}")
        nnz = int(col_idx.shape[0])
        ncodes = (nnz + 1) // 2 if self.num_clusters <= 16 else nnz
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (ncodes,):
            raise ValueError(f"codes must be uint8 of shape ({ncodes},) ({'4-bit packed' if self.num_clusters <= 16 else 'one byte'} "
                             f"per kept weight, {self.num_clusters} clusters), got {codes.dtype} of shape {tuple(codes.shape)}")
        if codebook.dim() != 1 or not codebook.dtype.is_floating_point:
            raise ValueError(f"codebook must be a 1-D floating tensor, got {codebook.dtype} of shape {tuple(codebook.shape)}")
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.register_buffer("codes", codes)
        self.register_buffer("codebook", codebook)
        self.register_buffer("bias", bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    @property
    def nnz(self) -> int:
        return int(self.col_idx.shape[0])

    @property
    def density(self) -> float:
        n = self.in_features * self.out_features
        return self.nnz / n if n else 0.0

    def _dense_weight(self) -> torch.Tensor:
        from torchslim.ops.sparse_codebook_linear import sparse_codebook_unpack

        labels, keep = sparse_codebook_unpack(self.row_ptr, self.col_idx, self.codes, self.in_features)
        w = self.codebook.detach()[labels.long()]
        return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return _sc_op(input, self.row_ptr, self.col_idx, self.codes, self.codebook, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"K={self.num_clusters}, density={self.density:.4f}")


DEPLOYED_TYPES = (DeployedSparseLinear, DeployedDenseLinear, DeployedCodebookLinear, DeployedSparseCodebookLinear)


def deployed_sparse(in_features, out_features, row_ptr, col_idx, values, bias, dtype) -> nn.Module:
    """The deployed form of a sparse layer: DeployedSparseLinear, or DeployedDenseLinear when
    its density exceeds SPARSE_MAX_DENSITY (there the sparse kernel is slower)."""
    n = in_features * out_features
    if n and deploy_as_dense(col_idx.shape[0] / n):
        layer = DeployedSparseLinear(in_features, out_features, row_ptr, col_idx, values, None, dtype)
        return DeployedDenseLinear(layer._dense_weight(), bias)
    return DeployedSparseLinear(in_features, out_features, row_ptr, col_idx, values, bias, dtype)


# ----------------------------------------------------------------------------- fused runs

def _noop(m) -> bool:
    return type(m) is nn.Identity or type(m) is nn.Dropout


class DeployedSequential(nn.Sequential):
    """``nn.Sequential`` of deployed layers whose runs of CPU float32 / float64
    DeployedSparseLinear layers (each followed by at most one ``nn.ReLU``; ``nn.Identity`` and
    ``nn.Dropout`` anywhere, as a deployed model is inference-only) run as one fused
    ``_sparse_mlp`` call, and runs of such DeployedSparseCodebookLinear layers as one
    ``_sparse_codebook_mlp`` call (a run holds layers of one kind; a sparse layer next to a
    sparse-codebook one starts a new run). The run's concatenated arrays are built once (the
    layers' buffers become views into them, so nothing is held twice) and kept as
    non-persistent buffers; other children, and inputs on other devices, run as
    ``nn.Sequential`` does, except that DeployedSparseCodebookLinear layers outside a run
    (e.g. bfloat16 ones) run as op calls without the module-call overhead outside grad mode.
    Sparse-codebook runs fuse outside grad mode only (``torch.no_grad`` / ``inference_mode``);
    in grad mode their layers are module calls."""

    def __init__(self, *args):
        super().__init__(*args)
        self._runs: list[tuple[int, int, int, bool]] = []  # (start, stop, out_features, sparse-codebook run)
        self._build_runs()

    def _build_runs(self) -> None:
        for name in [n for n in self._buffers if n.startswith("_run")]:
            del self._buffers[name]
            self._non_persistent_buffers_set.discard(name)
        children = list(self._modules.values())
        runs, i, n = [], 0, len(children)
        while i < n:
            start, layers, relu = i, [], []
            while i < n and self._fusable(children[i], layers):
                layers.append(children[i])
                relu.append(False)
                i += 1
                while i < n and (_noop(children[i]) or (type(children[i]) is nn.ReLU and not relu[-1])):
                    relu[-1] |= type(children[i]) is nn.ReLU
                    i += 1
            if layers:
                runs.append((start, i, layers, relu))
            else:
                i += 1
        self._runs = []
        self.__dict__["_built_for"] = tuple(children)  # runs are valid for these children only
        for r, (start, stop, layers, relu) in enumerate(runs):
            codebook = type(layers[0]) is DeployedSparseCodebookLinear
            (self._pack_codebook if codebook else self._pack)(r, layers, relu)
            self._runs.append((start, stop, layers[-1].out_features, codebook))

    @staticmethod
    def _fusable(m, previous) -> bool:
        if type(m) is DeployedSparseLinear:
            data = m.values
        elif type(m) is DeployedSparseCodebookLinear:
            data = m.codebook
            if m.bias is not None and m.bias.dtype != m.dtype:
                return False
        else:
            return False
        if m.dtype not in (torch.float32, torch.float64) or data.device.type != "cpu":
            return False
        return not previous or (type(m) is type(previous[0]) and m.dtype == previous[0].dtype
                                and m.in_features == previous[-1].out_features)

    def _pack(self, r: int, layers, relu) -> None:
        index_dtype = torch.int16 if all(m.in_features <= 32767 for m in layers) else torch.int32
        plan, rp_off, nnz_off, bias_off = [], 0, 0, 0
        for m, act in zip(layers, relu):
            plan.append([m.in_features, m.out_features, rp_off, nnz_off, -1 if m.bias is None else bias_off, int(act)])
            rp_off += m.out_features + 1
            nnz_off += m.nnz
            bias_off += 0 if m.bias is None else m.out_features
        with torch.inference_mode(False), torch.no_grad():
            values = torch.cat([m.values for m in layers])
            row_ptr = torch.cat([m.row_ptr for m in layers])
            col_idx = torch.cat([m.col_idx.to(index_dtype) for m in layers])
            biases = [m.bias for m in layers if m.bias is not None]
            bias = torch.cat(biases) if biases else torch.empty(0, dtype=layers[0].dtype)
            rp = nz = b = 0
            for m in layers:  # the layers read views of the run's arrays: stored once
                m.values = values[nz:nz + m.nnz]
                m.col_idx = col_idx[nz:nz + m.nnz]
                m.row_ptr = row_ptr[rp:rp + m.out_features + 1]
                nz += m.nnz
                rp += m.out_features + 1
                if m.bias is not None:
                    m.bias = bias[b:b + m.out_features]
                    b += m.out_features
        for name, t in (("plan", torch.tensor(plan, dtype=torch.int64)), ("values", values), ("row_ptr", row_ptr),
                        ("col_idx", col_idx), ("bias", bias)):
            self.register_buffer(f"_run{r}_{name}", t, persistent=False)

    def _pack_codebook(self, r: int, layers, relu) -> None:
        """A sparse-codebook run: the plan of ``_sparse_codebook_mlp`` and the layers' arrays,
        concatenated (each layer's codes start on a byte)."""
        index_dtype = torch.int16 if all(m.in_features <= 32767 for m in layers) else torch.int32
        plan, rp_off, nnz_off, codes_off, cb_off, bias_off = [], 0, 0, 0, 0, 0
        for m, act in zip(layers, relu):
            plan.append([m.in_features, m.out_features, rp_off, nnz_off, codes_off, cb_off, m.num_clusters,
                         -1 if m.bias is None else bias_off, int(act)])
            rp_off += m.out_features + 1
            nnz_off += m.nnz
            codes_off += m.codes.numel()
            cb_off += m.num_clusters
            bias_off += 0 if m.bias is None else m.out_features
        with torch.inference_mode(False), torch.no_grad():
            codebooks = torch.cat([m.codebook for m in layers])
            row_ptr = torch.cat([m.row_ptr for m in layers])
            col_idx = torch.cat([m.col_idx.to(index_dtype) for m in layers])
            codes = torch.cat([m.codes for m in layers])
            biases = [m.bias for m in layers if m.bias is not None]
            bias = torch.cat(biases) if biases else torch.empty(0, dtype=layers[0].dtype)
            rp = nz = cd = cb = b = 0
            for m in layers:  # the layers read views of the run's arrays: stored once
                n, nc, k = m.nnz, m.codes.numel(), m.num_clusters
                m.col_idx, m.codes = col_idx[nz:nz + n], codes[cd:cd + nc]
                m.row_ptr, m.codebook = row_ptr[rp:rp + m.out_features + 1], codebooks[cb:cb + k]
                nz, cd, cb, rp = nz + n, cd + nc, cb + k, rp + m.out_features + 1
                if m.bias is not None:
                    m.bias = bias[b:b + m.out_features]
                    b += m.out_features
        for name, t in (("plan", torch.tensor(plan, dtype=torch.int64)), ("codebooks", codebooks),
                        ("row_ptr", row_ptr), ("col_idx", col_idx), ("codes", codes), ("bias", bias)):
            self.register_buffer(f"_run{r}_{name}", t, persistent=False)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._build_runs()  # (a new device or dtype: which layers fuse, and their packed arrays)
        return out

    def forward(self, input):
        runs = self._runs
        if not isinstance(input, torch.Tensor) or (_grad_enabled() and input.requires_grad) or (
                runs and input.device.type != "cpu"):
            return super().forward(input)
        children = tuple(self._modules.values())
        if children != self.__dict__.get("_built_for"):  # a child was replaced: the runs are stale
            return super().forward(input)
        x, i = input, 0
        for r, (start, stop, out_features, codebook) in enumerate(runs):
            x = _run_between(children[i:start], x)
            first = children[start]
            b = self._buffers
            row_ptr = b[f"_run{r}_row_ptr"]
            # (the codebook's dtype read from _buffers: the dtype property's module __getattr__
            # costs ~1 us, 10% of the whole fused call of a small MLP at batch 1)
            dtype = first._buffers["codebook"].dtype if codebook else first.dtype
            # (sparse-codebook runs fuse outside grad mode only: in grad mode their layers stay
            # module calls, hooks included, as they were before they fused)
            if (isinstance(x, torch.Tensor) and x.dtype == dtype and x.dim() > 0
                    and x.shape[-1] == first.in_features and row_ptr.device.type == "cpu"
                    and not (codebook and _grad_enabled())):
                if codebook:
                    x = _sc_mlp(x, b[f"_run{r}_plan"], b[f"_run{r}_codebooks"], row_ptr, b[f"_run{r}_col_idx"],
                                b[f"_run{r}_codes"], b[f"_run{r}_bias"], out_features)
                else:
                    x = _sparse_mlp(x, b[f"_run{r}_plan"], b[f"_run{r}_values"], row_ptr, b[f"_run{r}_col_idx"],
                                    b[f"_run{r}_bias"], out_features)
            else:  # the per-layer path (which also raises the clear errors)
                for m in children[start:stop]:
                    x = m(x)
            i = stop
        return _run_between(children[i:], x)


def _run_between(children, x):
    """The children outside the fused runs, in order. Outside grad mode a
    DeployedSparseCodebookLinear (and a ReLU right after it, in place on the op's fresh
    output) is run by its op directly, without the module call: at batch 1 a module call
    costs about as much as a small layer's kernel. (As for the fused layers, forward hooks
    of those children are not called.)"""
    lean = not _grad_enabled()
    after_op = False
    for m in children:
        if (lean and type(m) is DeployedSparseCodebookLinear and isinstance(x, torch.Tensor) and x.dim() > 0
                and x.shape[-1] == m.in_features and x.dtype == m.codebook.dtype):
            x = _sc_op(x, m.row_ptr, m.col_idx, m.codes, m.codebook, m.bias)
            after_op = True
        elif after_op and type(m) is nn.ReLU:
            x = torch.relu_(x)
            after_op = False
        else:  # (the module call, which also raises the clear errors)
            x = m(x)
            after_op = False
    return x


def fuse_sequential(seq: nn.Sequential) -> nn.Sequential:
    """A DeployedSequential with the children of ``seq`` when it holds a deployed sparse or
    sparse-codebook layer (plain ``nn.Sequential`` or SparseSequential only), else ``seq`` itself."""
    from torchslim.nn.sparse_sequential import SparseSequential

    if type(seq) in (nn.Sequential, SparseSequential) and any(
            type(m) in (DeployedSparseLinear, DeployedSparseCodebookLinear) for m in seq.children()):
        out = DeployedSequential(OrderedDict(seq._modules.items()))
        out.train(seq.training)
        return out
    return seq
