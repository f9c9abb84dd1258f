"""CodebookLinear (placeholder until the weight-sharing work lands)."""
from torch import nn


class CodebookLinear(nn.Module):
    """Linear layer whose weights are indices into a shared codebook (not yet implemented)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("CodebookLinear is not implemented yet")
