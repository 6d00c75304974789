"""The interface the API layer programs against: everything it asks of an engine, typed.

``engine/batched.py`` implements it (one request at a time is a preset of it); tests may
implement it with fakes. Routes never know which one serves them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from PIL import Image

from moondream_server.engine.params import CaptionLength, SamplingSettings, SpatialRef
from moondream_server.engine.types import (
    DetectResult,
    EngineInfo,
    PointResult,
    QueryResult,
    TextResult,
    TextStream,
)


class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    def is_ready(self) -> bool:
        """True once the model is loaded and warmed up."""
        ...

    async def start(self) -> None:
        """Load the model (off the event loop) and warm it up."""
        ...

    async def stop(self) -> None: ...

    @property
    def load_error(self) -> BaseException | None:
        """Why loading (or warming up) failed; None while loading and once ready."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        ...

    @property
    def stats(self) -> Mapping[str, int]:
        """Request counters for /health and /metrics: at least completed, failed, interrupted
        (consumer gone or deadline passed) and expired_in_queue."""
        ...

    def check_capacity(self) -> None:
        """Raise what admission would raise now (NotReadyError, QueueFullError), so the API can
        refuse a request before decoding its image."""
        ...

    def retry_after_s(self) -> float:
        """Seconds a client refused for overload should wait before trying again."""
        ...

    async def caption(
        self, image: Image.Image, length: CaptionLength, settings: SamplingSettings
    ) -> TextResult: ...

    def stream_caption(
        self, image: Image.Image, length: CaptionLength, settings: SamplingSettings
    ) -> TextStream:
        """Text pieces as they are generated; closing the stream cancels the request."""
        ...

    async def query(
        self,
        image: Image.Image | None,
        question: str,
        *,
        reasoning: bool,
        spatial_refs: Sequence[SpatialRef],
        settings: SamplingSettings,
    ) -> QueryResult: ...

    def stream_query(
        self,
        image: Image.Image | None,
        question: str,
        *,
        spatial_refs: Sequence[SpatialRef],
        settings: SamplingSettings,
    ) -> TextStream: ...

    async def detect(self, image: Image.Image, obj: str, settings: SamplingSettings) -> DetectResult: ...

    async def point(self, image: Image.Image, obj: str, settings: SamplingSettings) -> PointResult: ...
