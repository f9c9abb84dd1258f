"""Model conversion: ``to_dense`` (plain nn.Linear everywhere, e.g. for ONNX export),
``to_sparse`` (training-capable sparse form, fused Sequential runs) and ``deploy``
(inference-only: compressed data only, no dense weight)."""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from torchslim.nn import MaskedSparseLinear
import torchslim.nn as _tsnn
from torchslim.nn.deployed import (DEPLOYED_TYPES, DeployedCodebookLinear, DeployedDenseLinear,
                                   DeployedSparseCodebookLinear, DeployedSparseLinear,
                                   deployed_sparse, fuse_sequential)

__all__ = ["to_dense", "to_sparse", "deploy"]


def _codebook_cls():
    # Looked up at call time so the module attribute is whatever torchslim.nn provides.
    return _tsnn.CodebookLinear


def _is_compressed_linear(module: nn.Module) -> bool:
    return isinstance(module, (MaskedSparseLinear, _codebook_cls(), *DEPLOYED_TYPES))


# --------------------------------------------------------------------------------------
# to_dense
# --------------------------------------------------------------------------------------

def _plain_sequential(module: nn.Module) -> nn.Module:
    """A DeployedSequential back to an nn.Sequential with the same children (after its
    layers were converted, its fused runs no longer apply)."""
    from torchslim.nn.deployed import DeployedSequential

    if type(module) is DeployedSequential:
        out = nn.Sequential(OrderedDict(module._modules.items()))
        out.train(module.training)
        return out
    return module


def _dense_linear(module: nn.Module) -> nn.Linear:
    linear = module.to_dense()
    linear.train(module.training)
    return linear


def to_dense(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every torchslim layer (MaskedSparseLinear, CodebookLinear,
    deployed forms) replaced by a plain ``nn.Linear`` computing the same function (masked
    weights are zero, codebook indices decoded). The input model is not modified. Useful for
    ONNX / TorchScript export and as the dense baseline of a compressed model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_dense expects an nn.Module, got {type(model).__name__}")
    if _is_compressed_linear(model):
        return _dense_linear(model)
    out = copy.deepcopy(model)

    def walk(module):
        for name, child in list(module.named_children()):
            if _is_compressed_linear(child):
                setattr(module, name, _dense_linear(child))
            else:
                walk(child)
                setattr(module, name, _plain_sequential(child))
    walk(out)
    return _plain_sequential(out)


# --------------------------------------------------------------------------------------
# to_sparse
# --------------------------------------------------------------------------------------

def _keeps_codebook(layer) -> bool:
    """A pruned + shared layer sparse enough that its own sparse-codebook path beats the
    decode to fp32 MaskedSparseLinear at batch 1."""
    from torchslim.nn.codebook_linear import SPARSE_CODEBOOK_MAX_DENSITY_SMALL_BATCH

    return (isinstance(layer, _codebook_cls()) and layer.zero_pinned
            and layer.density <= SPARSE_CODEBOOK_MAX_DENSITY_SMALL_BATCH)


def _sparse_from(layer) -> nn.Module:
    """A MaskedSparseLinear computing what ``layer`` (a CodebookLinear or a deployed form)
    does: masked where the weight is structurally zero (a copy of ``layer`` itself when it
    keeps its codebook, see to_sparse)."""
    if _keeps_codebook(layer):
        return copy.deepcopy(layer)
    dense = layer.to_dense()
    if isinstance(layer, DeployedSparseLinear):
        keep = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool, device=layer.values.device)
        rows = torch.repeat_interleave(torch.arange(layer.out_features, device=keep.device), layer.row_ptr.diff().long())
        keep[rows, layer.col_idx.long()] = True
    elif isinstance(layer, DeployedSparseCodebookLinear):  # (its stored positions, whatever their codes)
        from torchslim.ops.sparse_codebook_linear import sparse_codebook_unpack

        _, keep = sparse_codebook_unpack(layer.row_ptr, layer.col_idx, layer.codes, layer.in_features)
    elif isinstance(layer, DeployedDenseLinear):
        keep = dense.weight.detach() != 0
    else:
        idx = layer.labels()
        keep = idx != 0 if getattr(layer, "zero_pinned", False) else torch.ones_like(idx, dtype=torch.bool)
    sparse = MaskedSparseLinear.from_dense(dense, mask=keep.to(dense.weight.device))
    sparse.train(layer.training)
    return sparse


def to_sparse(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` prepared for fast inference by the sparse kernels, still
    trainable:

    - a pruned + shared ``CodebookLinear`` (``zero_pinned``) of density <= 0.15 stays a
      ``CodebookLinear`` (copied): it runs its sparse-codebook path by itself (CSR + 4-bit
      codes, faster there than decoded fp32 sparse values at batch 1, and smaller);
    - every other ``CodebookLinear`` becomes a ``MaskedSparseLinear`` holding the decoded
      weights, masked where the index is the pinned zero (denser ``zero_pinned`` layers, where
      the fp32 sparse kernel is faster at batch 1; other layers keep every weight): same
      function, run by the sparse kernels instead of the codebook kernel (deployed forms
      become MaskedSparseLinear layers too);
    - every ``nn.Sequential`` holding a ``MaskedSparseLinear`` becomes a
      ``torchslim.nn.SparseSequential`` (same children and state_dict keys), which runs its
      sparse layers and the ReLUs between them as one fused call when no gradient is needed.

    For an inference-only copy that holds no dense weight at all, use ``deploy``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_sparse expects an nn.Module, got {type(model).__name__}")
    convertible = (_codebook_cls(), *DEPLOYED_TYPES)
    if isinstance(model, convertible):
        return _sparse_from(model)
    from torchslim.nn import SparseSequential

    def fused(seq):
        seq = _plain_sequential(seq)
        if type(seq) is nn.Sequential and any(isinstance(m, MaskedSparseLinear) for m in seq.children()):
            out = SparseSequential(OrderedDict(seq._modules.items()))
            out.train(seq.training)
            return out
        return seq

    def walk(module):
        for name, child in list(module.named_children()):
            if isinstance(child, convertible) and not _keeps_codebook(child):  # (kept: shared codebooks stay shared)
                setattr(module, name, _sparse_from(child))
            else:
                walk(child)
                setattr(module, name, fused(child))
    out = copy.deepcopy(model)
    walk(out)
    return fused(out)


# --------------------------------------------------------------------------------------
# deploy
# --------------------------------------------------------------------------------------

def _deploy_layer(layer: nn.Module) -> nn.Module:
    from torchslim import _format as fmt

    if isinstance(layer, DEPLOYED_TYPES):
        return copy.deepcopy(layer)
    with torch.inference_mode(False), torch.no_grad():
        bias = None if layer.bias is None else layer.bias.detach().clone()
        if isinstance(layer, MaskedSparseLinear):
            st, values = layer._sparse_data()
            return deployed_sparse(layer.in_features, layer.out_features, st.row_ptr.clone(), st.col_idx.clone(),
                                   values.detach().clone(), bias, layer.weight.dtype)
        if not layer.zero_pinned:
            return DeployedCodebookLinear.from_codebook(layer)
        device = layer.codebook.device
        out = fmt.deploy_pinned_codebook(layer.in_features, layer.out_features, layer.labels().cpu(),
                                         layer.effective_codebook().detach().cpu(),
                                         None if bias is None else bias.cpu(), layer.codebook.dtype)
        return out.to(device)  # (DeployedSparseCodebookLinear where the path rule says so, see deploy())


def _fuse_deployed(model: nn.Module) -> nn.Module:
    """Sequential containers holding deployed sparse layers -> DeployedSequential (fused)."""
    def walk(module):
        for name, child in list(module.named_children()):
            walk(child)
            if isinstance(child, nn.Sequential):
                setattr(module, name, fuse_sequential(child))
    walk(model)
    return fuse_sequential(model) if isinstance(model, nn.Sequential) else model


def _finish_deploy(model: nn.Module) -> nn.Module:
    model = _fuse_deployed(model)
    for p in model.parameters():  # the rest of the model (embeddings, norms) is inference-only too
        p.requires_grad_(False)
    return model.eval()


def deploy(model: nn.Module) -> nn.Module:
    """An inference-only copy of ``model`` (in eval mode) in which every compressed layer holds
    only its compressed data, as buffers, and no dense weight:

    - ``MaskedSparseLinear`` -> ``DeployedSparseLinear`` (packed kept values + CSR ``row_ptr`` /
      ``col_idx``, run by the sparse kernel), or ``DeployedDenseLinear`` (the masked dense
      weight) for layers denser than 0.4, where the sparse kernel is slower;
    - ``CodebookLinear`` -> ``DeployedCodebookLinear`` (indices + codebook, the codebook
      kernel); a pruned + shared (``zero_pinned``) one of density <= 0.15, or a small one
      (<= 65536 weights) of density <= 0.4 (``_path_rules.deploy_as_sparse_codebook``) ->
      ``DeployedSparseCodebookLinear`` (CSR positions + 4-bit codes + codebook, run from that
      compressed form by ``sparse_codebook_linear``, at least as fast as the other forms at
      batch 1 there, and small layers then join a pure sparse-codebook fused run); another
      zero_pinned one -> ``DeployedSparseLinear`` holding the
      decoded values (``DeployedDenseLinear`` above density 0.4);
    - Sequential runs of deployed sparse layers (with ReLUs) -> ``DeployedSequential``: one
      fused call on the CPU.

    The other parameters (embeddings, norms, ...) are copied with ``requires_grad=False``.
    Deployed layers refuse gradients, ``.requires_grad_()`` and ``.weight`` with a clear
    error; use ``to_sparse`` for a trainable copy. The dense weights of the compressed layers
    are never copied (only their compressed data is)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy expects an nn.Module, got {type(model).__name__}")
    memo = {}
    for m in model.modules():
        if _is_compressed_linear(m) and id(m) not in memo:
            new = _deploy_layer(m)
            new.train(False)
            memo[id(m)] = new
    out = memo[id(model)] if id(model) in memo else copy.deepcopy(model, memo)
    return _finish_deploy(out)
