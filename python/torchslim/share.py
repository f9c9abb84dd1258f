"""Weight sharing (Deep Compression, stage 2): k-means codebooks for the linear layers.

``cluster_weights`` turns every nn.Linear / transformers Conv1D / MaskedSparseLinear of a
model into a ``CodebookLinear`` (layers chosen by ``torchslim._layers.select_layers``); ``sharing_report`` tells, per layer, how many clusters and bits each
layer uses, its size before and after, and its reconstruction error. Fine-tuning the
centroids afterwards is ordinary training: the codebooks are the trainable Parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from torchslim._layers import is_conv1d, select_layers, torch_pruned_parts
from torchslim.kmeans import INITS, kmeans_1d
from torchslim.nn.codebook_linear import CodebookLinear, _check_num_clusters, _dense_parts
from torchslim.nn.masked_sparse_linear import MaskedSparseLinear

SCOPES = ("layer", "global")

__all__ = ["cluster_weights", "sharing_report", "SharingReport", "LayerSharing"]


def _linear_equivalent(name: str, module: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """(a layer CodebookLinear.from_dense reads, extra mask or None) computing what ``module``
    computes: nn.Linear / MaskedSparseLinear as they are; a transformers Conv1D as an
    nn.Linear holding its weight transposed to [out, in]; a layer pruned with
    torch.nn.utils.prune as an nn.Linear holding ``weight_orig * weight_mask``, with that
    mask (its pruned zeros stay zero, as a MaskedSparseLinear's do)."""
    if isinstance(module, MaskedSparseLinear):
        return module, None
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise ValueError(f"cluster_weights: layer {name!r} ({type(module).__name__}) is parametrized with "
                         "torch.nn.utils.parametrize (its weight is computed on every call) and cannot be taken over; call torch.nn.utils.parametrize.remove_parametrizations(layer, "
                         "'weight') first")
    pruned = torch_pruned_parts(module, "weight")
    bias_pruned = torch_pruned_parts(module, "bias")
    if pruned is None and bias_pruned is None and not is_conv1d(module):
        return module, None
    with torch.no_grad():
        weight = pruned[0] * pruned[1].to(pruned[0].dtype) if pruned is not None else module.weight
        mask = pruned[1] != 0 if pruned is not None else None
        bias = bias_pruned[0] * bias_pruned[1].to(bias_pruned[0].dtype) if bias_pruned is not None else module.bias
        if is_conv1d(module):
            weight = weight.t()
            mask = mask.t() if mask is not None else None
        out_f, in_f = weight.shape
        # skip_init: no random initialisation (it would move the user's RNG), overwritten below
        linear = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device=weight.device,
                                          dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear, mask


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def cluster_weights(model: nn.Module, num_clusters: int = 16, scope: str = "layer", init: str = "linear",
                    include=None, seed: int = 0, max_iter: int = 300, exclude=None) -> nn.Module:
    """Replace the linear layers of ``model`` by CodebookLinear layers, IN PLACE, and return
    ``model`` (like ``torchslim.prune.magnitude_prune``; deepcopy first to keep the
    original). When ``model`` itself is a single linear layer it cannot be replaced in place:
    the new CodebookLinear is returned, so always use the return value.

    - ``num_clusters``: codebook size K, 1..256 (<= 16 stores 4-bit packed indices, else 8-bit).
    - ``scope="layer"``: one codebook per layer, fitted to that layer's weights.
      ``scope="global"``: ONE codebook Parameter fitted to all converted layers' weights and
      held by every converted layer (the same object: its gradient sums over the layers, an
      optimizer step moves every layer, ``model.parameters()`` yields it once; deepcopy and
      pickling keep it shared; a state_dict stores it under each layer's key). The layers
      must then share one dtype and device.
    - ``init``: "linear" (Deep Compression's best), "density", "kmeans++", "random";
      ``seed`` fixes the random ones; ``max_iter`` bounds the Lloyd steps (torchslim.kmeans).
    - ``include`` / ``exclude``: which layers to convert, as in
      ``torchslim.prune.magnitude_prune`` (None, a module name or fnmatch pattern such as
      ``"*lm_head"``, a list of them, or a callable ``(name, module) -> bool``; rules in
      ``torchslim._layers``); default every nn.Linear, transformers Conv1D and
      MaskedSparseLinear, except an nn.MultiheadAttention's ``out_proj`` and tied layers
      (skipped with a warning; refused when ``include`` names them). Layers already
      converted are left alone. A Conv1D becomes a CodebookLinear with the weight ``[out,
      in]``; a layer pruned with torch.nn.utils.prune keeps its mask (zero-pinned).
    - Layers without weights (``in_features == 0`` or ``out_features == 0``) are left as
      they are, with a warning: there is nothing to cluster, and the layer computes
      ``bias`` (or an empty output) as it is.

    Pruning is read from masks only: a MaskedSparseLinear's pruned positions (mask False)
    stay exactly zero (they index a zero-pinned codebook[0] == 0.0 that gets no gradient)
    and stay out of the clustering, whose K-1 other centroids fit the kept weights. Exact
    zeros in a plain nn.Linear are ordinary weights and are clustered like the rest
    (make the layer a MaskedSparseLinear first to keep them). Under ``scope="global"`` one
    pruned layer makes the shared codebook zero-pinned for all layers.

    Raises ValueError for a bad num_clusters, scope, init, include or exclude, and for a
    model without linear layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_num_clusters(num_clusters)
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(repr(i) for i in INITS)}, got {init!r}")
    targets = select_layers(model, include, exclude, purpose="cluster")
    if not targets:  # every selected layer was skipped (tied, or without weights): warned already
        return model

    if scope == "layer":
        converted = []
        for name, m in targets:
            linear, mask = _linear_equivalent(name, m)
            converted.append((name, CodebookLinear.from_dense(linear, num_clusters, init=init, mask=mask, seed=seed,
                                                              max_iter=max_iter)))
    else:
        converted = _cluster_global(targets, num_clusters, init, seed, max_iter)

    originals = dict(targets)
    for name, layer in converted:
        orig = originals[name]
        if is_conv1d(orig) or getattr(orig, "from_conv1d", False):
            layer.from_conv1d = True  # saved as "from": "Conv1D", loads into the user's Conv1D skeleton
        if name == "":
            return layer
        _replace(model, name, layer)
    return model


def _cluster_global(targets, num_clusters, init, seed, max_iter):
    parts = [(name, linear, *_dense_parts(linear, mask)) for name, (linear, mask)
             in ((n, _linear_equivalent(n, m)) for n, m in targets)]
    kinds = {(w.dtype, w.device) for _, _, w, _, _ in parts}
    if len(kinds) > 1:
        raise ValueError("scope='global' shares one codebook Parameter, so the layers must have one dtype and "
                         f"device; got {sorted(f'{d} on {v}' for d, v in kinds)}")
    pinned = any(mask is not None for _, _, _, _, mask in parts)
    if pinned and num_clusters < 2:
        raise ValueError("num_clusters must be >= 2 when a layer is pruned (codebook[0] is the pinned zero)")
    kept = torch.cat([(w[mask] if mask is not None else w.reshape(-1)).cpu() for _, _, w, _, mask in parts])
    free = num_clusters - 1 if pinned else num_clusters
    if kept.numel() > 0:
        centroids = kmeans_1d(kept, free, init=init, seed=seed, max_iter=max_iter, return_labels=False).centroids
    else:
        centroids = torch.zeros(free, dtype=torch.float64)
    if pinned:
        centroids = torch.cat([torch.zeros(1, dtype=torch.float64), centroids])
    dtype, device = kinds.pop()
    shared = nn.Parameter(centroids.to(device=device, dtype=dtype))
    out = []
    for name, m, w, bias, mask in parts:
        layer = CodebookLinear._uninitialized(m.in_features, m.out_features, num_clusters, bias is not None,
                                              pinned, device, dtype)
        layer.codebook = shared
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        layer.assign_indices(w, mask)
        out.append((name, layer))
    return out


# ---- report --------------------------------------------------------------------------
@dataclass
class LayerSharing:
    """One CodebookLinear. bytes_before: dense weight and bias in the layer's dtype;
    bytes_after: indices + codebook + bias (the codebook counted in full even when shared;
    the report's totals count each codebook once)."""

    name: str
    in_features: int
    out_features: int
    num_clusters: int
    bits: int
    zero_pinned: bool
    shared_codebook: bool
    bytes_before: int
    bytes_after: int
    reconstruction_error: float | None

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")


@dataclass
class SharingReport:
    layers: list[LayerSharing] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    def to_dict(self) -> dict:
        return {"layers": [asdict(l) | {"compression_ratio": l.compression_ratio} for l in self.layers],
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "compression_ratio": self.compression_ratio}

    def to_markdown(self) -> str:
        rows = ["| layer | shape | K | bits | zero pinned | shared | bytes before | bytes after | ratio | rel. error |",
                "|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
        for l in self.layers:
            err = "n/a" if l.reconstruction_error is None else f"{l.reconstruction_error:.4f}"
            rows.append(f"| {l.name or '(model)'} | {l.out_features}x{l.in_features} | {l.num_clusters} | {l.bits} | "
                        f"{'yes' if l.zero_pinned else 'no'} | {'yes' if l.shared_codebook else 'no'} | "
                        f"{l.bytes_before} | {l.bytes_after} | {l.compression_ratio:.2f}x | {err} |")
        rows.append(f"| total | | | | | | {self.bytes_before} | {self.bytes_after} | {self.compression_ratio:.2f}x | |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.to_markdown()


def sharing_report(model: nn.Module) -> SharingReport:
    """Per CodebookLinear of ``model``: K, bits per index, bytes before (dense) and after
    (indices + codebook + bias), and the relative reconstruction error
    ||W - W_shared||_F / ||W||_F measured when the layer was clustered (None for a layer
    built otherwise; fine-tuning the codebook afterwards does not update it)."""
    counts: dict[int, int] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, CodebookLinear)]
    for _, m in layers:
        counts[id(m.codebook)] = counts.get(id(m.codebook), 0) + 1
    report = SharingReport()
    seen: set[int] = set()
    for name, m in layers:
        el = m.codebook.element_size()
        bias_bytes = m.bias.numel() * m.bias.element_size() if m.bias is not None else 0
        cb_bytes = m.codebook.numel() * el
        before = m.in_features * m.out_features * el + bias_bytes
        after = m.indices.numel() * m.indices.element_size() + cb_bytes + bias_bytes
        report.layers.append(LayerSharing(
            name=name, in_features=m.in_features, out_features=m.out_features, num_clusters=m.num_clusters,
            bits=m.bits, zero_pinned=m.zero_pinned, shared_codebook=counts[id(m.codebook)] > 1,
            bytes_before=before, bytes_after=after, reconstruction_error=m.reconstruction_error))
        report.bytes_before += before
        report.bytes_after += after - (cb_bytes if id(m.codebook) in seen else 0)
        seen.add(id(m.codebook))
    return report
