"""codebook_linear (placeholder: pure PyTorch until the kernel lands)."""
from torchslim.ops._reference import ref_codebook_linear


def codebook_linear(input, indices, codebook, bias=None):
    """input @ codebook[indices].T + bias (indices uint8 [out, in] or packed 4-bit)."""
    return ref_codebook_linear(input, indices, codebook, bias)
