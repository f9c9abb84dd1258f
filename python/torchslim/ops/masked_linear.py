"""masked_linear (placeholder: pure PyTorch until the kernel lands)."""
from torchslim.ops._reference import ref_masked_linear


def masked_linear(input, weight, mask, bias=None):
    """input @ (weight*mask).T + bias; the weight gradient is zero where mask is False."""
    return ref_masked_linear(input, weight, mask, bias)
