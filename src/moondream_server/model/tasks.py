"""What a request asks the model to do: one typed task per skill, valid once built.

The engine builds these from the API's typed parameters; the model's dict API (shaped like the
official model's) builds them from its arguments. Either way the decode programs receive a task
whose settings, spatial references and caption length have been checked here, once.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moondream_server.model.params import (
    CAPTION_LENGTHS,
    CaptionLength,
    SpatialRef,
    TextSettings,
    refs_need_image,
)

RegionSkill = Literal["detect", "point"]


@dataclass(frozen=True)
class CaptionTask:
    length: CaptionLength = "normal"
    settings: TextSettings = field(default_factory=TextSettings)

    def __post_init__(self) -> None:
        if self.length not in CAPTION_LENGTHS:
            raise ValueError(
                f"unsupported caption length {self.length!r}; use one of {list(CAPTION_LENGTHS)}"
            )

    @property
    def with_image(self) -> bool:
        return True


@dataclass(frozen=True)
class QueryTask:
    question: str
    with_image: bool
    reasoning: bool = False
    spatial_refs: tuple[SpatialRef, ...] = ()  # checked by params.spatial_refs
    settings: TextSettings = field(default_factory=TextSettings)

    def __post_init__(self) -> None:
        refs_need_image(self.spatial_refs, self.with_image)


@dataclass(frozen=True)
class RegionTask:
    """detect (boxes) or point; ``settings.max_objects`` bounds the answer."""

    skill: RegionSkill
    object: str
    settings: TextSettings = field(default_factory=TextSettings)

    @property
    def with_image(self) -> bool:
        return True


Task = CaptionTask | QueryTask | RegionTask
