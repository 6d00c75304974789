"""The interface the API layer programs against.

Two implementations exist: a one-request-at-a-time engine (the baseline) and the batching
scheduler. Routes never know which one serves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from moondream_server.engine.types import (
    CaptionLength,
    DetectResult,
    EngineInfo,
    PointResult,
    QueryResult,
    SamplingSettings,
    SpatialRef,
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
