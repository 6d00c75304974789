"""Build the engine the settings ask for.

There is one engine (``batched.py``, over the scheduler); ``--engine serial`` is its preset for
one request at a time: one slot, no image cache, every crop of an image in one encoder pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moondream_server.engine.base import Engine
from moondream_server.engine.types import EngineInfo

if TYPE_CHECKING:
    from moondream_server.model.moondream import Moondream
    from moondream_server.settings import Settings


def model_loader(settings: Settings) -> Moondream:
    """Load the model as configured (called on a worker thread by the engine's ``start``)."""
    from moondream_server.model import load  # torch is imported here, not at server import

    return load(
        settings.model,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        cpu_weights=settings.cpu_weights,
        quantize=settings.quantize,
    )


# Enough crops per encoder chunk for any Moondream2 image (1 global + up to 12 local crops).
_ALL_CROPS = 64


def create_engine(settings: Settings) -> Engine:
    from moondream_server.engine.batched import BatchedEngine  # imports torch: not at server import

    info = EngineInfo(
        model_id=settings.model, revision=settings.revision, device=settings.device, dtype=settings.dtype
    )
    serial = settings.engine == "serial"
    return BatchedEngine(
        lambda: model_loader(settings),
        info=info,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        max_batch_size=1 if serial else settings.max_batch_size,
        image_cache_mb=0 if serial else settings.image_cache_mb,
        threads=settings.threads,
        # Alone on the model, a request has nothing to interleave its image encoding with.
        max_vision_crops=_ALL_CROPS if serial else None,
        decode_first_s=0.0 if serial else None,
        kv_pool=None if settings.kv_pool == "auto" else settings.kv_pool == "on",
        decode_graphs=None if settings.cuda_graphs == "auto" else settings.cuda_graphs == "on",
    )
