"""Autograd-aware functional ops backed by torch.ops.torchslim.* (CPU and CUDA)."""
from torchslim.ops.masked_linear import masked_linear
from torchslim.ops.codebook_linear import codebook_linear
from torchslim.ops.kd_loss import kd_kl_div

__all__ = ["masked_linear", "codebook_linear", "kd_kl_div"]
