"""Wire shapes that Moondream's own surfaces (cloud ``/v1`` and seed) share: the ``settings``
object a request carries, and boxes, points, reasoning and metrics in answers, with their
conversions from the engine's result types.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from moondream_server.engine.params import (
    MAX_OBJECT_CHARS,
    MAX_OBJECTS,
    MAX_QUESTION_CHARS,
    MAX_TOKENS,
    TEMPERATURE,
    TOP_P,
    SamplingSettings,
)
from moondream_server.engine.types import Box, Metrics, Point, Reasoning

log = logging.getLogger(__name__)

CaptionLengthField = Literal["short", "normal", "long"]

# Limits on what a client sends, in the schema so that validation (422) refuses more before any
# work: lengths are in characters (what JSON Schema's maxLength counts; at most 4 UTF-8 bytes
# each). Token counts are checked by the engine before anything is embedded (400): a question
# must leave room in the 2,048-token context for the image (730), the prompt and an answer.
MAX_SPATIAL_REFS = 64
MAX_MODEL_NAME_CHARS = 256

SPATIAL_REFS_DOC = (
    "Normalised hints: [x, y] points or [x_min, y_min, x_max, y_max] boxes, each value in [0, 1]; "
    f"at most {MAX_SPATIAL_REFS}."
)
SpatialRefsField = Annotated[
    list[Annotated[list[float], Field(max_length=4)]] | None,
    Field(max_length=MAX_SPATIAL_REFS, description=SPATIAL_REFS_DOC),
]
QuestionField = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_QUESTION_CHARS,
        description=f"At most {MAX_QUESTION_CHARS:,} characters, and as many tokens as fit the context.",
    ),
]
ObjectField = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_OBJECT_CHARS,
        description=f"What to find. At most {MAX_OBJECT_CHARS:,} characters.",
    ),
]
ModelNameField = Annotated[
    str | None,
    Field(
        max_length=MAX_MODEL_NAME_CHARS,
        description="The served model or an alias (see GET /v1/models); another model is a 404.",
    ),
]
IMAGE_DOC = "The image as a data URL (data:image/<any>;base64,...) or bare base64."


class SettingsIn(BaseModel):
    """Sampling settings. Unset keys take the model's defaults; unknown keys are ignored."""

    model_config = ConfigDict(extra="allow")

    # The bounds are the engine's (one set, from the model): validated here and shown in OpenAPI.
    temperature: float | None = Field(
        None, ge=TEMPERATURE.ge, gt=TEMPERATURE.gt, le=TEMPERATURE.le, description="0 = greedy decoding."
    )
    top_p: float | None = Field(None, ge=TOP_P.ge, gt=TOP_P.gt, le=TOP_P.le)
    max_tokens: int | None = Field(
        None, ge=MAX_TOKENS.ge, gt=MAX_TOKENS.gt, le=MAX_TOKENS.le, description="Most tokens to generate."
    )
    max_objects: int | None = Field(
        None,
        ge=MAX_OBJECTS.ge,
        gt=MAX_OBJECTS.gt,
        le=MAX_OBJECTS.le,
        description="detect/point: most objects.",
    )

    def to_engine(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            max_objects=self.max_objects,
        )


def engine_settings(settings: SettingsIn | None) -> SamplingSettings:
    return settings.to_engine() if settings is not None else SamplingSettings()


class MetricsOut(BaseModel):
    input_tokens: int
    output_tokens: int
    prefill_time_ms: float
    decode_time_ms: float
    ttft_ms: float


class BoxOut(BaseModel):
    """A box normalised to [0, 1]; origin top-left."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


class PointOut(BaseModel):
    """A point normalised to [0, 1]; origin top-left."""

    x: float
    y: float


class GroundingOut(BaseModel):
    start_idx: int = Field(..., description="Character offset into reasoning.text (inclusive).")
    end_idx: int = Field(..., description="Character offset into reasoning.text (exclusive).")
    points: list[tuple[float, float]]


class ReasoningOut(BaseModel):
    text: str
    grounding: list[GroundingOut]


def metrics_out(m: Metrics) -> MetricsOut:
    return MetricsOut(
        input_tokens=m.input_tokens,
        output_tokens=m.output_tokens,
        prefill_time_ms=m.prefill_time_ms,
        decode_time_ms=m.decode_time_ms,
        ttft_ms=m.ttft_ms,
    )


def reasoning_out(r: Reasoning | None) -> ReasoningOut | None:
    if r is None:
        return None
    return ReasoningOut(
        text=r.text,
        grounding=[
            GroundingOut(
                start_idx=g.start_idx, end_idx=g.end_idx, points=[p for p in g.points if _finite(*p)]
            )
            for g in r.grounding
        ],
    )


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def boxes_out(boxes: Sequence[Box]) -> list[BoxOut]:
    """Boxes for the wire; a non-finite coordinate (JSON cannot carry it) drops that box."""
    out = [
        BoxOut(x_min=b.x_min, y_min=b.y_min, x_max=b.x_max, y_max=b.y_max)
        for b in boxes
        if _finite(b.x_min, b.y_min, b.x_max, b.y_max)
    ]
    if len(out) != len(boxes):
        log.warning("dropped %d box(es) with non-finite coordinates", len(boxes) - len(out))
    return out


def points_out(points: Sequence[Point]) -> list[PointOut]:
    """Points for the wire; a non-finite coordinate drops that point."""
    out = [PointOut(x=p.x, y=p.y) for p in points if _finite(p.x, p.y)]
    if len(out) != len(points):
        log.warning("dropped %d point(s) with non-finite coordinates", len(points) - len(out))
    return out
