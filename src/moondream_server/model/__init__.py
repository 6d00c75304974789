"""Moondream2 in plain PyTorch: loading, preprocessing, and the caption/query/detect/point API."""

from moondream_server.model.config import MoondreamConfig
from moondream_server.model.hub import ModelLoadError
from moondream_server.model.loading import load
from moondream_server.model.moondream import EncodedImage, Moondream

__all__ = ["EncodedImage", "ModelLoadError", "Moondream", "MoondreamConfig", "load"]
