"""Loads the compiled extension ``torchslim._C`` with one clear message when it cannot be used."""
from __future__ import annotations

import importlib

import torch

REBUILD_HINT = (
    "Rebuild torchslim against the torch you run: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` in the torchslim source tree "
    "(or `make setup`)."
)


def _same_release(built: str, running: str) -> bool:
    # "2.13.0+cpu" and "2.13.0" share an ABI; a different release does not.
    return built.split("+")[0] == running.split("+")[0]


def load():
    try:
        config = importlib.import_module("torchslim._build_config")
    except ImportError:
        config = None
    if config is None:
        raise ImportError(
            "torchslim's compiled extension is missing (no torchslim/_build_config.py): the package was "
            "not built. " + REBUILD_HINT
        )
    if not _same_release(config.TORCH_VERSION, torch.__version__):
        raise ImportError(
            f"torchslim was built against torch {config.TORCH_VERSION} but torch {torch.__version__} is "
            f"running; the C++ extension would not load or would misbehave. " + REBUILD_HINT
        )
    try:
        return importlib.import_module("torchslim._C")
    except ImportError as exc:
        raise ImportError(
            f"torchslim's compiled extension failed to load ({exc}). It was built against torch "
            f"{config.TORCH_VERSION}; torch {torch.__version__} is running. " + REBUILD_HINT
        ) from exc


_C = load()
