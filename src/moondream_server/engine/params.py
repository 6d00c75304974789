"""A request's parameters as the API hands them to an engine, and the bounds they must keep.

The bounds are the model's own (``model/params.py``); the API's schemas take them from here, so
its OpenAPI schema shows exactly what the model accepts. ``SamplingSettings`` leaves unset
values as None: the engine fills them with the serving model's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from moondream_server.model.params import (
    BOUNDS,
    CAPTION_LENGTHS,
    MAX_OBJECT_CHARS,
    MAX_OBJECTS,
    MAX_QUESTION_CHARS,
    MAX_TOKENS,
    TEMPERATURE,
    TOP_P,
    Bound,
    BoxRef,
    CaptionLength,
    PointRef,
    SpatialRef,
    TextSettings,
    spatial_ref,
    spatial_refs,
)

__all__ = [
    "BOUNDS",
    "CAPTION_LENGTHS",
    "MAX_OBJECTS",
    "MAX_OBJECT_CHARS",
    "MAX_QUESTION_CHARS",
    "MAX_TOKENS",
    "TEMPERATURE",
    "TOP_P",
    "Bound",
    "BoxRef",
    "CaptionLength",
    "PointRef",
    "SamplingSettings",
    "SpatialRef",
    "spatial_ref",
    "spatial_refs",
]


@dataclass(frozen=True)
class SamplingSettings:
    """Per-request generation settings; None means the model's default. Checked when built."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_objects: int | None = None

    def __post_init__(self) -> None:
        for bound in BOUNDS:
            value = getattr(self, bound.name)
            if value is not None:
                bound.check(value)

    def resolve(self, defaults: TextSettings) -> TextSettings:
        """The settings a program runs with: these over the model's defaults."""
        return defaults.override(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            max_objects=self.max_objects,
        )
