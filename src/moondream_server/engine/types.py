"""Plain data exchanged between the API layer and an engine.

The API layer builds these from HTTP requests and renders them back; it never sees tensors.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Request parameters live in engine/params.py; importable from here too.
from moondream_server.engine.params import CaptionLength as CaptionLength
from moondream_server.engine.params import SamplingSettings as SamplingSettings
from moondream_server.engine.params import SpatialRef as SpatialRef

FinishReason = Literal["stop", "length"]


@dataclass
class Metrics:
    input_tokens: int = 0  # the text prompt's tokens
    output_tokens: int = 0
    prefill_time_ms: float = 0.0
    decode_time_ms: float = 0.0
    ttft_ms: float = 0.0
    image_tokens: int = 0  # context positions the image took (0 for a text-only query)
    queue_ms: float = 0.0  # from submission until the scheduler gave the request a slot


@dataclass
class GroundingSpan:
    start_idx: int
    end_idx: int
    points: list[tuple[float, float]]


@dataclass
class Reasoning:
    text: str
    grounding: list[GroundingSpan]

    @classmethod
    def from_model(cls, text: str, grounding: Iterable[Mapping[str, Any]]) -> Reasoning:
        """From the model's reasoning dict fields (``start_idx``, ``end_idx``, ``points``)."""
        spans = [
            GroundingSpan(
                start_idx=int(g["start_idx"]),
                end_idx=int(g["end_idx"]),
                points=[(float(p[0]), float(p[1])) for p in g.get("points", [])],
            )
            for g in grounding
        ]
        return cls(text=text, grounding=spans)


@dataclass
class TextResult:
    text: str
    finish_reason: FinishReason = "stop"
    metrics: Metrics = field(default_factory=Metrics)


@dataclass
class QueryResult(TextResult):
    reasoning: Reasoning | None = None


class TextStream:
    """A streamed generation: an async iterator of text pieces as they are generated.

    Once the last piece has been read, ``result`` holds the finish reason and metrics of the whole
    generation (its ``text`` is left empty: the consumer has the pieces); it stays None when the
    stream failed or was closed early. Closing the stream cancels the request.
    """

    def __init__(self, produce: Callable[[Callable[[TextResult], None]], AsyncGenerator[str, None]]) -> None:
        self.result: TextResult | None = None
        self._pieces = produce(self._finish)

    def _finish(self, result: TextResult) -> None:
        self.result = result

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        return await anext(self._pieces)

    async def aclose(self) -> None:
        await self._pieces.aclose()


@dataclass
class Box:
    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass
class Point:
    x: float
    y: float


@dataclass
class DetectResult:
    objects: list[Box]
    metrics: Metrics = field(default_factory=Metrics)


@dataclass
class PointResult:
    points: list[Point]
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    revision: str | None
    device: str
    dtype: str
    precision: str | None = None  # what the loader chose per phase (number formats, decode kernel)
