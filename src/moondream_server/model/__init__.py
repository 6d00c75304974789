"""Moondream2 in plain PyTorch: loading, preprocessing, and the caption/query/detect/point API.

The names below are imported on first use, so that torch-free modules of this package (e.g.
``params``) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moondream_server.model.config import MoondreamConfig
    from moondream_server.model.hub import ModelLoadError
    from moondream_server.model.loading import load
    from moondream_server.model.moondream import Moondream
    from moondream_server.model.moondream_runtime import EncodedImage

__all__ = ["EncodedImage", "ModelLoadError", "Moondream", "MoondreamConfig", "load"]

_HOMES = {
    "EncodedImage": "moondream_runtime",
    "ModelLoadError": "hub",
    "Moondream": "moondream",
    "MoondreamConfig": "config",
    "load": "loading",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
