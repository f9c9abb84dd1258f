"""Autograd-aware functional ops backed by torch.ops.torchslim.* (CPU and CUDA)."""
from torchslim.ops.masked_linear import masked_linear
from torchslim.ops.codebook_linear import codebook_linear
from torchslim.ops.kd_loss import kd_kl_div
from torchslim.ops.sparse_codebook_linear import sparse_codebook_linear, sparse_codebook_pack, sparse_codebook_unpack

__all__ = ["masked_linear", "codebook_linear", "kd_kl_div", "sparse_codebook_linear", "sparse_codebook_pack",
           "sparse_codebook_unpack"]
