"""Build the engine the settings ask for."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from moondream_server.engine.base import Engine
from moondream_server.engine.serial import ModelLike, SerialEngine
from moondream_server.engine.types import EngineInfo

if TYPE_CHECKING:
    from moondream_server.settings import Settings

log = logging.getLogger(__name__)


def model_loader(settings: Settings) -> ModelLike:
    """Load the model as configured (called on the engine's worker thread)."""
    from moondream_server.model import load  # torch is imported here, not at server import

    model: ModelLike = load(
        settings.model,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        cpu_weights=settings.cpu_weights,
    )
    return model


def create_engine(settings: Settings) -> Engine:
    info = EngineInfo(
        model_id=settings.model, revision=settings.revision, device=settings.device, dtype=settings.dtype
    )
    if settings.engine == "batched":
        try:
            batched = importlib.import_module("moondream_server.engine.batched")
        except ImportError:
            log.warning("the batched engine is not available in this build; using the serial engine")
        else:
            engine: Engine = batched.create_engine(settings)
            return engine
    return SerialEngine(
        lambda: model_loader(settings),
        info=info,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        threads=settings.threads,
    )
