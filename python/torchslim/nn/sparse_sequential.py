"""SparseSequential: an nn.Sequential whose sparse layers run as one fused op at inference."""
from __future__ import annotations

import threading

import torch
from torch import nn

import torchslim.nn.masked_sparse_linear as _msl
from torchslim._path_rules import FUSE_ANY_DENSITY_NUMEL, FUSE_MAX_DENSITY, joins_fused_run  # noqa: F401
from torchslim.nn.masked_sparse_linear import MaskedSparseLinear, _version
from torchslim.ops.sparse_mlp import sparse_mlp

_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_LOCK = threading.Lock()

# A layer joins a fused run when the sparse kernel suits it at batch 1: sparse enough, or
# small enough that the dispatch saved outweighs the slower product (_path_rules.joins_fused_run).


class _Run:
    """A fused run: children [start, stop) of the container, computed by one _sparse_mlp call."""

    __slots__ = ("start", "stop", "layers", "relu", "state", "args")

    def __init__(self, start, stop, layers, relu):
        self.start, self.stop, self.layers, self.relu = start, stop, layers, relu
        self.state = None  # identity, version and storage of every mask, weight and bias packed
        self.args = None   # (plan, values, row_ptr, col_idx, bias, out_features), or None: not fusable now

    def arguments(self):
        """The op's arguments for the layers' current state (None when the run cannot be
        fused any more, e.g. after a change of dtype or mask). The packed arguments depend
        only on the masks, weights and biases, so they are reused while every one of those
        is the same tensor with the same version and storage."""
        state = self.state
        if state is None:
            return self._rebuild()
        for layer, w0, wv, wp, m0, mv, mp, b0, bv, bp in state:
            w, b, m = layer._parameters["weight"], layer._parameters["bias"], layer._buffers["mask"]
            # (a version of -1: an inference tensor, which has no version counter)
            if (w is not w0 or m is not m0 or b is not b0 or w.data_ptr() != wp or m.data_ptr() != mp
                    or (wv >= 0 and w._version != wv) or (mv >= 0 and m._version != mv)
                    or (b is not None and (b.data_ptr() != bp or (bv >= 0 and b._version != bv)))):
                return self._rebuild()
        return self.args

    def _rebuild(self):
        with _LOCK:
            state = []
            for layer in self.layers:
                w, b, m = layer._parameters["weight"], layer._parameters["bias"], layer._buffers["mask"]
                state.append((layer, w, _version(w), w.data_ptr(), m, _version(m), m.data_ptr(), b,
                              None if b is None else _version(b), None if b is None else b.data_ptr()))
            fusable = all(_fusable(m, self.layers[:i]) for i, m in enumerate(self.layers))
            with torch.inference_mode(False):  # versioned tensors: the op checks them once
                args = self._pack([layer._sparse_data() for layer in self.layers]) if fusable else None
            self.args, self.state = args, state
            return args

    def _pack(self, sparse_data):
        layers = self.layers
        index_dtype = torch.int16 if all(m.in_features <= 32767 for m in layers) else torch.int32
        plan, values, row_ptr, col_idx, bias = [], [], [], [], []
        rp_off = nnz_off = bias_off = 0
        for i, layer in enumerate(layers):
            st, vals = sparse_data[i]
            b = layer.bias
            plan.append([layer.in_features, layer.out_features, rp_off, nnz_off,
                         -1 if b is None else bias_off, 1 if self.relu[i] else 0])
            values.append(vals)
            row_ptr.append(st.row_ptr)
            col_idx.append(st.col_idx.to(index_dtype))
            rp_off += st.row_ptr.numel()
            nnz_off += st.nnz
            if b is not None:
                bias.append(b.detach())
                bias_off += layer.out_features
        dtype = values[0].dtype
        return (torch.tensor(plan, dtype=torch.int64), torch.cat(values), torch.cat(row_ptr), torch.cat(col_idx),
                torch.cat(bias) if bias else torch.empty(0, dtype=dtype), layers[-1].out_features)


def _fusable(m, previous) -> bool:
    """Whether layer m can join a fused run after the layers ``previous``."""
    if type(m) is not MaskedSparseLinear:
        return False
    w = m.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64):
        return False
    if previous and (w.dtype != previous[0].weight.dtype or m.in_features != previous[-1].out_features):
        return False
    bias = m.bias
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != w.dtype):
        return False
    if m.in_features == 0 or m.out_features == 0:  # (the sparse kernels need both)
        return False
    if _msl._FORCED_PATH is not None:  # torchslim.nn.force_path: "sparse" fuses any layer ("dense" fuses none)
        return _msl._FORCED_PATH == "sparse"
    return joins_fused_run(m.density, w.numel())


# Exact types: a subclass of nn.ReLU / nn.Dropout may compute something else (its forward is
# not the fused op's ReLU or identity), so it ends a fused run like any other module.
def _is_relu(m) -> bool:
    return type(m) is nn.ReLU


def _is_noop(m) -> bool:
    return type(m) is nn.Identity or (type(m) is nn.Dropout and not m.training)


class SparseSequential(nn.Sequential):
    """``nn.Sequential`` that runs its MaskedSparseLinear layers, and the ReLUs between
    them, as one fused C++ call when no gradient is needed.

    Same children, same ``state_dict`` keys and the same results as the ``nn.Sequential``
    it replaces (``torchslim.to_sparse`` makes one from a model's Sequential containers).
    At batch 1 a small pruned MLP spends most of its time in per-layer dispatch (about 5 µs
    for each module call and each op); the fused call pays it once.

    A fused run is a maximal sequence of float32 / float64 CPU MaskedSparseLinear layers of
    one dtype, each followed by at most one ``nn.ReLU``, with ``nn.Identity`` and eval-mode
    ``nn.Dropout`` anywhere in it (exactly those types: a subclass may compute something
    else, so it runs as itself), and each layer sparse enough for the sparse kernel
    (density <= 0.45, or at most 65536 weights; ``torchslim.nn.force_path("sparse")`` fuses
    every such layer whatever its density, ``force_path("dense")`` none). Fused layers report
    ``last_path == "fused"``. Everything else (other modules, training
    with gradients, CUDA, torch.compile, bfloat16/float16) runs as ``nn.Sequential`` does.
    The fused arguments are cached and rebuilt when a layer's mask, weight or bias changes
    (as MaskedSparseLinear's own caches are).
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.__dict__["_fuse"] = None  # (children key, runs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fuse"] = None  # caches hold tensors derived from the layers: rebuilt on use
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__["_fuse"] = None

    # ------------------------------------------------------------ plan

    def _runs(self, children):
        """The fused runs of this container for its current children and modes."""
        runs, i, n = [], 0, len(children)
        while i < n:
            start, layers, relu = i, [], []
            while i < n and _fusable(children[i], layers):
                layers.append(children[i])
                relu.append(False)
                i += 1
                while i < n and (_is_noop(children[i]) or (_is_relu(children[i]) and not relu[-1])):
                    relu[-1] |= _is_relu(children[i])
                    i += 1
            if layers:
                runs.append(_Run(start, i, layers, relu))
            else:
                i += 1
        return runs

    def _plan(self):
        """(children, dropout layers, their modes, runs), recomputed when the children or
        the dropout modes change. Which layers fuse is decided then; a later change of a
        layer's dtype or mask is seen by _Run.arguments."""
        children = tuple(self._modules.values())
        fuse = self._fuse
        forced = _msl._FORCED_PATH
        if (fuse is None or fuse[0] != children or fuse[4] != forced
                or (fuse[1] and tuple(d.training for d in fuse[1]) != fuse[2])):
            dropouts = tuple(m for m in children if type(m) is nn.Dropout)
            fuse = (children, dropouts, tuple(d.training for d in dropouts), self._runs(children), forced)
            self.__dict__["_fuse"] = fuse
        return fuse

    # ------------------------------------------------------------ forward

    def forward(self, input):
        if _is_compiling() or type(input) is not torch.Tensor and not isinstance(input, torch.Tensor):
            return super().forward(input)
        children, _, _, runs, _ = self._plan()
        if not runs or input.device.type != "cpu":
            return super().forward(input)
        if _grad_enabled() and (input.requires_grad or any(p.requires_grad for p in self.parameters())):
            return super().forward(input)
        x, i = input, 0
        for run in runs:
            for m in children[i:run.start]:
                x = m(x)
            first = run.layers[0]
            args = None
            if (isinstance(x, torch.Tensor) and x.dtype == first.weight.dtype and x.dim() > 0
                    and x.shape[-1] == first.in_features and x.device.type == "cpu"):
                args = run.arguments()
            if args is None:  # not fusable for this input or any more: the plain path
                for m in children[run.start:run.stop]:  # (which also raises the clear errors)
                    x = m(x)
            else:
                x = sparse_mlp(x, *args)
                for layer in run.layers:
                    layer.__dict__["_last_path"] = "fused"
            i = run.stop
        for m in children[i:]:
            x = m(x)
        return x
