"""The original (seed) routes: JSON ``POST /caption|query|detect|point`` and multipart
``POST /upload/caption|query|detect|point``.

Success: ``{"status": "success", "caption"|"answer"|"detections"|"coordinates": ...}``;
errors: ``{"detail": "..."}`` with a real 4xx/5xx status.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from PIL import Image
from pydantic import ValidationError

from moondream_server.api.auth import require_api_key
from moondream_server.api.common import (
    SSE_RESPONSE,
    boxes_out,
    check_spatial_refs,
    decode_bytes,
    decode_string,
    error_responses,
    get_engine,
    new_request_id,
    points_out,
    reasoning_out,
)
from moondream_server.api.schemas import (
    CaptionLengthField,
    CaptionRequest,
    CaptionResponse,
    Coordinates,
    DetectRequest,
    DetectResponse,
    PointRequest,
    PointResponse,
    QueryRequest,
    QueryResponse,
    SeedErrorBody,
    SettingsIn,
    engine_settings,
)
from moondream_server.api.sse import single_piece, stream_response
from moondream_server.engine.types import SpatialRef

router = APIRouter(tags=["seed"], dependencies=[Depends(require_api_key)])

_ERRORS = error_responses(400, 401, 413, 422, 429, 500, 503, 504, model=SeedErrorBody)


# --------------------------------------------------------------------------- shared bodies


async def _caption(
    request: Request,
    image: Image.Image,
    length: CaptionLengthField,
    stream: bool,
    settings: SettingsIn | None,
) -> CaptionResponse | Response:
    engine = get_engine(request)
    rid = new_request_id("caption")
    if stream:
        return await stream_response(engine.stream_caption(image, length, engine_settings(settings)), rid)
    result = await engine.caption(image, length, engine_settings(settings))
    return CaptionResponse(request_id=rid, caption=result.text)


async def _query(
    request: Request,
    image: Image.Image,
    question: str,
    stream: bool,
    reasoning: bool,
    refs: list[SpatialRef],
    settings: SettingsIn | None,
) -> QueryResponse | Response:
    engine = get_engine(request)
    rid = new_request_id("query")
    es = engine_settings(settings)
    if stream and not reasoning:
        return await stream_response(
            engine.stream_query(image, question, spatial_refs=refs, settings=es), rid
        )
    result = await engine.query(image, question, reasoning=reasoning, spatial_refs=refs, settings=es)
    if stream:
        return await stream_response(single_piece(result.text), rid)
    return QueryResponse(request_id=rid, answer=result.text, reasoning=reasoning_out(result.reasoning))


async def _detect(
    request: Request, image: Image.Image, obj: str, settings: SettingsIn | None
) -> DetectResponse:
    result = await get_engine(request).detect(image, obj, engine_settings(settings))
    return DetectResponse(
        request_id=new_request_id("detect"),
        detections=boxes_out(result.objects),
    )


async def _point(
    request: Request, image: Image.Image, obj: str, settings: SettingsIn | None
) -> PointResponse:
    result = await get_engine(request).point(image, obj, engine_settings(settings))
    points = points_out(result.points)
    return PointResponse(
        request_id=new_request_id("point"), coordinates=Coordinates(points=points, count=len(points))
    )


# --------------------------------------------------------------------------- JSON routes


@router.post(
    "/caption",
    response_model=CaptionResponse,
    responses={**SSE_RESPONSE, **_ERRORS},
    summary="Caption an image",
)
async def caption(body: CaptionRequest, request: Request) -> CaptionResponse | Response:
    get_engine(request)
    image = await decode_string(request, body.image, "image")
    return await _caption(request, image, body.length, body.stream, body.settings)


@router.post(
    "/query",
    response_model=QueryResponse,
    response_model_exclude_none=True,
    responses={**SSE_RESPONSE, **_ERRORS},
    summary="Answer a question about an image",
)
async def query(body: QueryRequest, request: Request) -> QueryResponse | Response:
    get_engine(request)
    refs = check_spatial_refs(body.spatial_refs, has_image=True)
    image = await decode_string(request, body.image, "image")
    return await _query(request, image, body.question, body.stream, body.reasoning, refs, body.settings)


@router.post(
    "/detect", response_model=DetectResponse, responses=_ERRORS, summary="Find bounding boxes of an object"
)
async def detect(body: DetectRequest, request: Request) -> DetectResponse:
    get_engine(request)
    image = await decode_string(request, body.image, "image")
    return await _detect(request, image, body.object, body.settings)


@router.post("/point", response_model=PointResponse, responses=_ERRORS, summary="Find points on an object")
async def point(body: PointRequest, request: Request) -> PointResponse:
    get_engine(request)
    check_spatial_refs(body.spatial_refs, has_image=True)
    image = await decode_string(request, body.image, "image")
    return await _point(request, image, body.object, body.settings)


# --------------------------------------------------------------------------- multipart routes

_FileField = Annotated[UploadFile, File(description="The image file (JPEG, PNG, WebP, GIF, BMP, TIFF).")]
_SettingsField = Annotated[
    str | None,
    Form(description='Sampling settings as a JSON object, e.g. {"temperature": 0, "max_tokens": 64}.'),
]


def _parse_settings(raw: str | None) -> SettingsIn | None:
    if raw is None or not raw.strip():
        return None
    try:
        return SettingsIn.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", "settings", *e["loc"])} for e in exc.errors(include_input=False)]
        raise RequestValidationError(errors) from None


def _parse_refs(raw: str | None) -> list[SpatialRef]:
    if raw is None or not raw.strip():
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(
        isinstance(r, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in r)
        for r in value
    ):
        raise RequestValidationError(
            [
                {
                    "type": "list_type",
                    "loc": ("body", "spatial_refs"),
                    "msg": "must be a JSON list of number lists",
                }
            ]
        )
    return check_spatial_refs(value, has_image=True)


async def _read_upload(request: Request, file: UploadFile) -> Image.Image:
    get_engine(request)
    data = await file.read()
    return await decode_bytes(request, data, "file")


@router.post(
    "/upload/caption",
    response_model=CaptionResponse,
    responses={**SSE_RESPONSE, **_ERRORS},
    summary="Caption an uploaded image (multipart)",
)
async def upload_caption(
    request: Request,
    file: _FileField,
    length: Annotated[CaptionLengthField, Form()] = "normal",
    stream: Annotated[bool, Form()] = False,
    settings: _SettingsField = None,
) -> CaptionResponse | Response:
    parsed = _parse_settings(settings)
    image = await _read_upload(request, file)
    return await _caption(request, image, length, stream, parsed)


@router.post(
    "/upload/query",
    response_model=QueryResponse,
    response_model_exclude_none=True,
    responses={**SSE_RESPONSE, **_ERRORS},
    summary="Answer a question about an uploaded image (multipart)",
)
async def upload_query(
    request: Request,
    file: _FileField,
    question: Annotated[str, Form(min_length=1)],
    stream: Annotated[bool, Form()] = False,
    reasoning: Annotated[bool, Form()] = False,
    spatial_refs: Annotated[str | None, Form(description="JSON list, e.g. [[0.5, 0.5]].")] = None,
    settings: _SettingsField = None,
) -> QueryResponse | Response:
    parsed = _parse_settings(settings)
    refs = _parse_refs(spatial_refs)
    image = await _read_upload(request, file)
    return await _query(request, image, question, stream, reasoning, refs, parsed)


@router.post(
    "/upload/detect", response_model=DetectResponse, responses=_ERRORS, summary="Detect in an uploaded image"
)
async def upload_detect(
    request: Request,
    file: _FileField,
    object: Annotated[str, Form(min_length=1)],
    settings: _SettingsField = None,
) -> DetectResponse:
    parsed = _parse_settings(settings)
    image = await _read_upload(request, file)
    return await _detect(request, image, object, parsed)


@router.post(
    "/upload/point", response_model=PointResponse, responses=_ERRORS, summary="Point in an uploaded image"
)
async def upload_point(
    request: Request,
    file: _FileField,
    object: Annotated[str, Form(min_length=1)],
    settings: _SettingsField = None,
) -> PointResponse:
    parsed = _parse_settings(settings)
    image = await _read_upload(request, file)
    return await _point(request, image, object, parsed)
