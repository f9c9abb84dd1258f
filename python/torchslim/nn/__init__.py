"""Drop-in nn.Linear replacements and the distillation loss module."""
from torchslim.nn.masked_sparse_linear import MaskedSparseLinear
from torchslim.nn.codebook_linear import CodebookLinear
from torchslim.nn.kd_loss import KDLoss

__all__ = ["MaskedSparseLinear", "CodebookLinear", "KDLoss"]
