"""Which kernel runs: every measured path rule of torchslim, in one place.

Each layer type picks between kernels by density and batch. The rules were measured on an
AMD EPYC (Zen 4, AVX-512) with float32 (benchmarks/RESULTS.md, "Path rules"); a re-measured
rule changes here only:

- masked sparse linear (``MaskedSparseLinear``, the functional ``masked_linear`` op, the
  deployed sparse layers): the numbers live in the C++ header ``csrc/ops/path_rules.h``, which
  the op's C++ glue decides with, and are read from the extension here, so both sides use
  one rule;
- sparse-codebook vs codebook (``CodebookLinear`` with pinned zeros);
- the forms ``deploy`` gives and which layers join a fused run (``SparseSequential``,
  ``DeployedSequential``).

The functional ``masked_linear`` op decides per kernel (its forward cannot see whether a
gradient will follow, so it uses the inference rule; its gradient kernels use the training
rule); ``MaskedSparseLinear`` knows, and takes one path for the whole step (the training
rule whenever a gradient is needed).
"""
from __future__ import annotations

from torchslim._extension import _C

_MASKED = _C.path_rules()

# ---------------------------------------------------------------- masked sparse linear
SMALL_WEIGHT_NUMEL: int = _MASKED["masked_small_weight_numel"]                 # batch 1: dense up to this many weights
SPARSE_MAX_DENSITY_BATCH1: float = _MASKED["masked_batch1_max_density"]        # batch 1, dense weight in cache
SPARSE_MAX_DENSITY_BATCH1_LARGE: float = _MASKED["masked_batch1_large_max_density"]  # batch 1, weight > LARGE_WEIGHT_BYTES
LARGE_WEIGHT_BYTES: int = _MASKED["masked_large_weight_bytes"]
SPARSE_MAX_DENSITY: float = _MASKED["masked_max_density"]                      # inference, batch > 1
SPARSE_MAX_DENSITY_LOW_PRECISION: float = _MASKED["masked_max_density_low_precision"]  # the same, bf16 / fp16
SPARSE_MAX_DENSITY_TRAIN: float = _MASKED["masked_train_max_density"]          # training, batch >= TRAIN_MIN_BATCH
SPARSE_MAX_DENSITY_TRAIN_SMALL: float = _MASKED["masked_train_small_max_density"]  # training, smaller batches
TRAIN_MIN_BATCH: int = _MASKED["masked_train_min_batch"]


# masked_sparse_faster(density, batch, weight_numel, training=False, low_precision=False) -> bool:
# does the sparse kernel beat the dense product (low_precision: a bf16 / fp16 layer)? The C++ function itself (called once per structure build,
# never per call), so that the glue and the modules cannot disagree.
masked_sparse_faster = _C.masked_sparse_faster


# ---------------------------------------------------------------- sparse-codebook vs codebook
# For zero_pinned layers, against codebook_linear with 15 clusters + the pinned zero, packed,
# fp32 (benchmarks/notes/sparse_codebook.md).
SPARSE_CODEBOOK_MAX_DENSITY_SMALL_BATCH = 0.15
SPARSE_CODEBOOK_MAX_DENSITY = 0.4
SPARSE_CODEBOOK_MIN_BATCH = 32


def sparse_codebook_faster(density: float, batch: int) -> bool:
    """Does the sparse-codebook kernel beat codebook_linear (fp32) for a zero_pinned layer?"""
    limit = SPARSE_CODEBOOK_MAX_DENSITY if batch >= SPARSE_CODEBOOK_MIN_BATCH else SPARSE_CODEBOOK_MAX_DENSITY_SMALL_BATCH
    return density <= limit


# ---------------------------------------------------------------- fused runs
# A layer joins a fused run (one op call for the chain) when the sparse kernel suits it at
# batch 1, or when it is small enough that the call saved outweighs a slower product.
FUSE_MAX_DENSITY = SPARSE_MAX_DENSITY_BATCH1_LARGE
FUSE_ANY_DENSITY_NUMEL = 2 * SMALL_WEIGHT_NUMEL


def joins_fused_run(density: float, weight_numel: int) -> bool:
    return density <= FUSE_MAX_DENSITY or weight_numel <= FUSE_ANY_DENSITY_NUMEL


# ---------------------------------------------------------------- deployed forms

def deploy_as_dense(density: float) -> bool:
    """A pruned layer denser than this deploys as its masked dense weight (the sparse kernel
    is slower there at every batch size)."""
    return density > SPARSE_MAX_DENSITY


def deploy_as_sparse_codebook(density: float, weight_numel: int) -> bool:
    """A pruned + shared layer deploys in the sparse-codebook layout (codes, no fp32 values)
    where that kernel is at least as fast at batch 1, and, up to the batch > 1 limit, when the
    layer is small enough to join a fused run whatever its density: then a pruned + shared
    MLP is one sparse-codebook chain instead of runs of two kinds (the small layer's slower
    product costs less than a second call)."""
    if density <= SPARSE_CODEBOOK_MAX_DENSITY_SMALL_BATCH:
        return True
    return weight_numel <= FUSE_ANY_DENSITY_NUMEL and density <= SPARSE_CODEBOOK_MAX_DENSITY
