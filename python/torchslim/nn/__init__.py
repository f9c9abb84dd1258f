"""Drop-in nn.Linear replacements and the distillation loss module."""
from torchslim.nn.masked_sparse_linear import MaskedSparseLinear, force_path, forced_path
from torchslim.nn.codebook_linear import CodebookLinear
from torchslim.nn.kd_loss import KDLoss
from torchslim.nn.sparse_sequential import SparseSequential
from torchslim.nn.deployed import (DeployedCodebookLinear, DeployedDenseLinear, DeployedSequential,
                                   DeployedSparseCodebookLinear, DeployedSparseLinear)

__all__ = ["MaskedSparseLinear", "CodebookLinear", "KDLoss", "SparseSequential", "DeployedSparseLinear",
           "DeployedDenseLinear", "DeployedCodebookLinear", "DeployedSparseCodebookLinear",
           "DeployedSequential", "force_path", "forced_path"]
