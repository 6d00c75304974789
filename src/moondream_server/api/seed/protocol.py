"""Request and response schemas of the seed surface (``/caption``, ``/query``, ``/detect``,
``/point`` and their multipart ``/upload/*`` twins).

Requests take ``image`` (JSON) or a ``file`` part (multipart); answers are
``{"status": "success", ...}``; errors are ``{"detail": "..."}``. Unknown request keys are
accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moondream_server.api.moondream_wire import (
    IMAGE_DOC,
    BoxOut,
    CaptionLengthField,
    ObjectField,
    PointOut,
    QuestionField,
    ReasoningOut,
    SettingsIn,
    SpatialRefsField,
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CaptionRequest(_Request):
    image: str = Field(..., description=IMAGE_DOC)
    length: CaptionLengthField = "normal"
    stream: bool = False
    settings: SettingsIn | None = None


class QueryRequest(_Request):
    image: str = Field(..., description=IMAGE_DOC)
    question: QuestionField
    stream: bool = False
    reasoning: bool = False
    spatial_refs: SpatialRefsField = None
    settings: SettingsIn | None = None


class DetectRequest(_Request):
    image: str = Field(..., description=IMAGE_DOC)
    object: ObjectField
    settings: SettingsIn | None = None


class PointRequest(_Request):
    image: str = Field(..., description=IMAGE_DOC)
    object: ObjectField
    spatial_refs: SpatialRefsField = None
    settings: SettingsIn | None = None


class SeedBase(BaseModel):
    status: Literal["success"] = "success"
    request_id: str


class CaptionResponse(SeedBase):
    caption: str


class QueryResponse(SeedBase):
    answer: str
    reasoning: ReasoningOut | None = None


class DetectResponse(SeedBase):
    detections: list[BoxOut]


class Coordinates(BaseModel):
    points: list[PointOut]
    count: int


class PointResponse(SeedBase):
    coordinates: Coordinates


class SeedErrorBody(BaseModel):
    detail: Any = Field(..., description="A message, or for 422 the list of validation problems.")
