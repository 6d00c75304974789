"""Request and response schemas of the cloud surface (``/v1/...``).

Wire-compatible with Moondream Cloud and the official ``moondream`` client: ``image_url`` in,
``caption``/``answer``/``objects``/``points`` out, plus ``request_id``, ``metrics`` and
``finish_reason``; errors are ``{"error": {"message", "type", "param", "code"}}``.

Unknown request keys are accepted and ignored (clients send keys we have no use for).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moondream_server.api.moondream_wire import (
    IMAGE_DOC,
    BoxOut,
    CaptionLengthField,
    MetricsOut,
    ModelNameField,
    ObjectField,
    PointOut,
    QuestionField,
    ReasoningOut,
    SettingsIn,
    SpatialRefsField,
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class V1CaptionRequest(_Request):
    image_url: str = Field(..., description=IMAGE_DOC)
    length: CaptionLengthField = "normal"
    stream: bool = False
    settings: SettingsIn | None = None
    model: ModelNameField = None


class V1QueryRequest(_Request):
    question: QuestionField
    image_url: str | None = Field(None, description=IMAGE_DOC + " Omit it for a text-only query.")
    stream: bool = False
    reasoning: bool = Field(False, description="Think first; adds `reasoning` to the answer (not streamed).")
    spatial_refs: SpatialRefsField = None
    settings: SettingsIn | None = None
    model: ModelNameField = None


class V1DetectRequest(_Request):
    image_url: str = Field(..., description=IMAGE_DOC)
    object: ObjectField
    settings: SettingsIn | None = None
    model: ModelNameField = None


class V1PointRequest(_Request):
    image_url: str = Field(..., description=IMAGE_DOC)
    object: ObjectField
    spatial_refs: SpatialRefsField = None
    settings: SettingsIn | None = None
    model: ModelNameField = None


class V1Base(BaseModel):
    request_id: str
    metrics: MetricsOut


class V1CaptionResponse(V1Base):
    caption: str
    finish_reason: Literal["stop", "length"]


class V1QueryResponse(V1Base):
    answer: str
    reasoning: ReasoningOut | None = None
    finish_reason: Literal["stop", "length"]


class V1DetectResponse(V1Base):
    objects: list[BoxOut]


class V1PointResponse(V1Base):
    points: list[PointOut]
    count: int


class V1ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class V1ErrorBody(BaseModel):
    error: V1ErrorDetail
