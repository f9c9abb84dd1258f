"""torchslim: make nn.Linear networks smaller and faster — prune, share weights, distil —
with fused C++/CUDA kernels behind autograd-aware PyTorch ops."""
from __future__ import annotations

import importlib

import torch

from torchslim._extension import _C

__version__ = "0.1.0"


def build_info() -> dict:
    """What the extension was built with, and what it picked at run time.

    Keys: version, torch_version_built, torch_version, cuda_built, cuda_available,
    simd (the SIMD level chosen for this CPU), threads, arch, compiler.
    """
    info = dict(_C.build_info())
    info["torch_version"] = torch.__version__
    info["cuda_available"] = bool(info["cuda_built"] and torch.cuda.is_available())
    info["threads"] = torch.get_num_threads()
    return info


from torchslim import ops, nn  # noqa: E402  (ops need the extension loaded first)

# The workflow modules are imported on first use: they pull optional dependencies.
_LAZY = {
    "prune": ("torchslim.prune", None),
    "share": ("torchslim.share", None),
    "distill": ("torchslim.distill", None),
    "report": ("torchslim.report", "report"),
    "CompressionReport": ("torchslim.report", "CompressionReport"),
    "save": ("torchslim.io", "save"),
    "load": ("torchslim.io", "load"),
    "to_dense": ("torchslim.io", "to_dense"),
    "to_sparse": ("torchslim.io", "to_sparse"),
    "deploy": ("torchslim.convert", "deploy"),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'torchslim' has no attribute {name!r}")


__all__ = ["build_info", "ops", "nn", *_LAZY]
