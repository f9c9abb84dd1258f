"""Shared test fixtures.

- ``masked_path``: runs a test once with every MaskedSparseLinear forced onto the sparse
  kernels and once forced onto the dense fallback (``torchslim.nn.force_path``). Small
  layers (< 32,768 weights) at batch 1 otherwise always take the dense fallback, so a test
  comparing them with F.linear would pass even with a broken sparse kernel. Tests assert
  the path that ran with ``layer.last_path == masked_path``.
- ``ops_ran``: the names of the operators (``aten::mm``, ``torchslim::...``) a call ran,
  from the profiler; for asserting which path a functional op took, or that a backward
  kernel did not run for a gradient nobody asked for.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["sparse", "dense"])
def masked_path(request):
    """"sparse" or "dense": every MaskedSparseLinear takes that path during the test."""
    from torchslim.nn import force_path

    with force_path(request.param):
        yield request.param


@pytest.fixture
def ops_ran():
    """``ops_ran(fn) -> set[str]``: the operator names recorded while ``fn()`` ran."""

    def record(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {event.name for event in prof.events()}

    return record
