"""Request and response models of both route families.

* The seed family (``/caption``, ``/query``, ``/detect``, ``/point`` and ``/upload/*``) takes
  ``image`` and answers ``{"status": "success", ...}``; errors are ``{"detail": "..."}``.
* The cloud family (``/v1/...``) is wire-compatible with Moondream Cloud and the official
  ``moondream`` client: ``image_url`` in, ``caption``/``answer``/``objects``/``points`` out,
  plus ``request_id``, ``metrics`` and ``finish_reason``; errors are
  ``{"error": {"message", "type", "param", "code"}}``.

Unknown request keys are accepted and ignored (the client may send ``model`` or ``variant``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moondream_server.engine.types import SamplingSettings

CaptionLengthField = Literal["short", "normal", "long"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SettingsIn(BaseModel):
    """Sampling settings. Unset keys take the model's defaults; unknown keys are ignored."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(None, ge=0.0, le=10.0, description="0 = greedy decoding.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=8192, description="Most tokens to generate.")
    max_objects: int | None = Field(None, ge=1, le=1000, description="detect/point: most objects.")

    def to_engine(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            max_objects=self.max_objects,
        )


def engine_settings(settings: SettingsIn | None) -> SamplingSettings:
    return settings.to_engine() if settings is not None else SamplingSettings()


SpatialRefsField = list[list[float]] | None
_SPATIAL_DOC = "Normalised hints: [x, y] points or [x_min, y_min, x_max, y_max] boxes, each value in [0, 1]."
_IMAGE_URL_DOC = "The image as a data URL (data:image/<any>;base64,...) or bare base64."


# --------------------------------------------------------------------------- cloud family (/v1)


class V1CaptionRequest(_Request):
    image_url: str = Field(..., description=_IMAGE_URL_DOC)
    length: CaptionLengthField = "normal"
    stream: bool = False
    settings: SettingsIn | None = None
    model: str | None = Field(None, description="Accepted and ignored.")


class V1QueryRequest(_Request):
    question: str = Field(..., min_length=1)
    image_url: str | None = Field(None, description=_IMAGE_URL_DOC + " Omit it for a text-only query.")
    stream: bool = False
    reasoning: bool = Field(False, description="Think first; adds `reasoning` to the answer (not streamed).")
    spatial_refs: SpatialRefsField = Field(None, description=_SPATIAL_DOC)
    settings: SettingsIn | None = None
    model: str | None = Field(None, description="Accepted and ignored.")


class V1DetectRequest(_Request):
    image_url: str = Field(..., description=_IMAGE_URL_DOC)
    object: str = Field(..., min_length=1)
    settings: SettingsIn | None = None
    model: str | None = Field(None, description="Accepted and ignored.")


class V1PointRequest(_Request):
    image_url: str = Field(..., description=_IMAGE_URL_DOC)
    object: str = Field(..., min_length=1)
    spatial_refs: SpatialRefsField = Field(None, description=_SPATIAL_DOC)
    settings: SettingsIn | None = None
    model: str | None = Field(None, description="Accepted and ignored.")


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


# --------------------------------------------------------------------------- seed family


class CaptionRequest(_Request):
    image: str = Field(..., description=_IMAGE_URL_DOC)
    length: CaptionLengthField = "normal"
    stream: bool = False
    settings: SettingsIn | None = None


class QueryRequest(_Request):
    image: str = Field(..., description=_IMAGE_URL_DOC)
    question: str = Field(..., min_length=1)
    stream: bool = False
    reasoning: bool = False
    spatial_refs: SpatialRefsField = Field(None, description=_SPATIAL_DOC)
    settings: SettingsIn | None = None


class DetectRequest(_Request):
    image: str = Field(..., description=_IMAGE_URL_DOC)
    object: str = Field(..., min_length=1)
    settings: SettingsIn | None = None


class PointRequest(_Request):
    image: str = Field(..., description=_IMAGE_URL_DOC)
    object: str = Field(..., min_length=1)
    spatial_refs: SpatialRefsField = Field(None, description=_SPATIAL_DOC)
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


# --------------------------------------------------------------------------- health


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    ready: bool
    model_loaded: bool
    model: str
    revision: str | None
    device: str
    dtype: str
    engine: str
    queue_depth: int | None = Field(None, description="Requests waiting for the model.")
    requests: dict[str, int] | None = Field(
        None,
        description="Engine counters: completed, failed, interrupted (cancelled/deadline), expired_in_queue.",
    )
    error: str | None = Field(None, description="Why loading failed, if it did.")


class ReadyResponse(BaseModel):
    ready: bool
    detail: str | None = None
