"""cellvi: single-cell variational inference, from AnnData to latent spaces and DE.

Submodules are imported on first use so that ``import cellvi`` stays fast.
"""

from __future__ import annotations

import importlib
import logging

from ._settings import settings

__all__ = ["settings", "__version__", "data", "dataloaders", "model", "train", "errors"]
__version__ = "0.1.0"

logging.getLogger("cellvi").addHandler(logging.NullHandler())

_LAZY = {
    "data",
    "dataloaders",
    "distributions",
    "nn",
    "module",
    "train",
    "model",
    "io",
    "analysis",
    "simulate",
    "cli",
    "errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cellvi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
