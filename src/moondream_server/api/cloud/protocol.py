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


class V1Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: ModelNameField = None
    variant: str | None = Field(
        None, max_length=256, description="A LoRA variant (client 0.1.x): refused with a 400."
    )
    settings: SettingsIn | None = None

    @property
    def requested_variant(self) -> object:
        """The top-level ``variant``, or one given inside ``settings`` (as the reference model takes it)."""
        if self.variant is not None:
            return self.variant
        return None if self.settings is None else (self.settings.model_extra or {}).get("variant")


class V1CaptionRequest(V1Request):
    image_url: str = Field(..., description=IMAGE_DOC)
    length: CaptionLengthField = "normal"
    stream: bool = False


class V1QueryRequest(V1Request):
    question: QuestionField
    image_url: str | None = Field(None, description=IMAGE_DOC + " Omit it for a text-only query.")
    stream: bool = False
    reasoning: bool = Field(False, description="Think first; adds `reasoning` to the answer (not streamed).")
    spatial_refs: SpatialRefsField = None


class V1DetectRequest(V1Request):
    image_url: str = Field(..., description=IMAGE_DOC)
    object: ObjectField


class V1PointRequest(V1Request):
    image_url: str = Field(..., description=IMAGE_DOC)
    object: ObjectField
    spatial_refs: SpatialRefsField = None


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
