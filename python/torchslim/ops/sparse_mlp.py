"""The fused sparse MLP inference op (``torch.ops.torchslim._sparse_mlp``, CPU).

A chain of sparse linear layers, each optionally followed by ReLU, in one call:
``torchslim.nn.SparseSequential`` builds its arguments from its MaskedSparseLinear layers
and calls it when no gradient is needed. Arguments (all CPU, contiguous):

- ``plan``: int64 ``[layers, 6]``, one row per layer: in_features, out_features, offset in
  ``row_ptr``, offset in ``values`` / ``col_idx``, offset in ``bias`` (-1: no bias),
  activation (0: none, 1: ReLU);
- ``values`` (the input's dtype, float32 or float64), ``col_idx`` (int16 or int32),
  ``row_ptr`` (int32; each layer's rows start at 0), ``bias``: the layers' CSR arrays and
  biases, concatenated;
- ``out_features``: the last layer's width (so that shapes are known without reading
  ``plan``, e.g. under torch.compile).

The op validates every layer's structure before reading it and has no autograd formula.

``torch.ops.torchslim._sparse_codebook_mlp(input, plan, codebooks, row_ptr, col_idx, codes,
bias, out_features)`` is the same chain for pruned + shared layers in the sparse-codebook
layout of ``sparse_codebook_linear`` (no fp32 values): ``plan`` is int64 ``[layers, 9]``:
in_features, out_features, offset in ``row_ptr``, offset in ``col_idx``, offset in ``codes``
(bytes; each layer's codes start on a byte), offset in ``codebooks``, num_clusters K (codes
4-bit packed when K <= 16, else one byte each), offset in ``bias`` (-1: no bias), activation.
It runs the per-layer op's kernels, so it returns what the per-layer calls (with ReLU
between them) return. ``torchslim.nn.DeployedSequential`` calls it.
"""
from __future__ import annotations

import torch

__all__ = ["sparse_mlp", "sparse_codebook_mlp"]

sparse_mlp = torch.ops.torchslim._sparse_mlp.default
sparse_codebook_mlp = torch.ops.torchslim._sparse_codebook_mlp.default


@torch.library.register_fake("torchslim::_sparse_mlp")
def _sparse_mlp_fake(input, plan, values, row_ptr, col_idx, bias, out_features):
    torch._check(input.dim() >= 1, lambda: "_sparse_mlp: input must have at least 1 dimension")
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("torchslim::_sparse_codebook_mlp")
def _sparse_codebook_mlp_fake(input, plan, codebooks, row_ptr, col_idx, codes, bias, out_features):
    torch._check(input.dim() >= 1, lambda: "_sparse_codebook_mlp: input must have at least 1 dimension")
    return input.new_empty((*input.shape[:-1], out_features))
