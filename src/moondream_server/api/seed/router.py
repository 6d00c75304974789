"""Routes of the seed surface: JSON ``POST /caption|query|detect|point`` and multipart
``POST /upload/caption|query|detect|point``.

Success: ``{"status": "success", "caption"|"answer"|"detections"|"coordinates": ...}``;
errors: ``{"detail": "..."}`` with a real 4xx/5xx status.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from PIL import Image

from moondream_server.api import serving
from moondream_server.api.app_state import ready_engine
from moondream_server.api.auth import require_api_key
from moondream_server.api.image_input import image_from_bytes, image_from_string
from moondream_server.api.json_body import BoundedJSONRoute
from moondream_server.api.moondream_sse import SSE_RESPONSE, chunk_stream
from moondream_server.api.moondream_wire import (
    MAX_SPATIAL_REFS,
    CaptionLengthField,
    SettingsIn,
    boxes_out,
    engine_settings,
    points_out,
    reasoning_out,
)
from moondream_server.api.openapi_docs import error_responses
from moondream_server.api.seed.forms import parse_settings, parse_spatial_refs
from moondream_server.api.seed.protocol import (
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
)
from moondream_server.api.spatial_refs import check_spatial_refs
from moondream_server.engine.params import MAX_OBJECT_CHARS, MAX_QUESTION_CHARS
from moondream_server.engine.types import SpatialRef

router = APIRouter(tags=["seed"], dependencies=[Depends(require_api_key)], route_class=BoundedJSONRoute)

_ERRORS = error_responses(400, 401, 413, 422, 429, 500, 503, 504, model=SeedErrorBody)


# --------------------------------------------------------------------------- shared bodies


async def _caption(
    request: Request,
    image: Image.Image,
    length: CaptionLengthField,
    stream: bool,
    settings: SettingsIn | None,
) -> CaptionResponse | Response:
    engine = ready_engine(request)
    job = serving.CaptionJob(image, length, engine_settings(settings))
    rid = serving.new_request_id("caption")
    if stream:
        return chunk_stream(await serving.stream(engine, job), rid)
    result = await serving.run(engine, job)
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
    engine = ready_engine(request)
    job = serving.QueryJob(image, question, reasoning, refs, engine_settings(settings))
    rid = serving.new_request_id("query")
    if stream:
        return chunk_stream(await serving.stream(engine, job), rid)
    result = await serving.run(engine, job)
    return QueryResponse(request_id=rid, answer=result.text, reasoning=reasoning_out(result.reasoning))


async def _detect(
    request: Request, image: Image.Image, obj: str, settings: SettingsIn | None
) -> DetectResponse:
    job = serving.DetectJob(image, obj, engine_settings(settings))
    result = await serving.run(ready_engine(request), job)
    return DetectResponse(request_id=serving.new_request_id("detect"), detections=boxes_out(result.objects))


async def _point(
    request: Request, image: Image.Image, obj: str, settings: SettingsIn | None
) -> PointResponse:
    job = serving.PointJob(image, obj, engine_settings(settings))
    result = await serving.run(ready_engine(request), job)
    points = points_out(result.points)
    return PointResponse(
        request_id=serving.new_request_id("point"), coordinates=Coordinates(points=points, count=len(points))
    )


# --------------------------------------------------------------------------- JSON routes


@router.post(
    "/caption",
    response_model=CaptionResponse,
    responses={**SSE_RESPONSE, **_ERRORS},
    summary="Caption an image",
)
async def caption(body: CaptionRequest, request: Request) -> CaptionResponse | Response:
    ready_engine(request)
    image = await image_from_string(request, body.image, "image")
    return await _caption(request, image, body.length, body.stream, body.settings)


@router.post(
    "/query",
    response_model=QueryResponse,
    response_model_exclude_none=True,
    responses={**SSE_RESPONSE, **_ERRORS},
    summary="Answer a question about an image",
)
async def query(body: QueryRequest, request: Request) -> QueryResponse | Response:
    ready_engine(request)
    refs = check_spatial_refs(body.spatial_refs, has_image=True)
    image = await image_from_string(request, body.image, "image")
    return await _query(request, image, body.question, body.stream, body.reasoning, refs, body.settings)


@router.post(
    "/detect", response_model=DetectResponse, responses=_ERRORS, summary="Find bounding boxes of an object"
)
async def detect(body: DetectRequest, request: Request) -> DetectResponse:
    ready_engine(request)
    image = await image_from_string(request, body.image, "image")
    return await _detect(request, image, body.object, body.settings)


@router.post("/point", response_model=PointResponse, responses=_ERRORS, summary="Find points on an object")
async def point(body: PointRequest, request: Request) -> PointResponse:
    ready_engine(request)
    check_spatial_refs(body.spatial_refs, has_image=True)
    image = await image_from_string(request, body.image, "image")
    return await _point(request, image, body.object, body.settings)


# --------------------------------------------------------------------------- multipart routes

_REFS_FORM_DOC = f"JSON list, e.g. [[0.5, 0.5]]; at most {MAX_SPATIAL_REFS} entries."
_FileField = Annotated[UploadFile, File(description="The image file (JPEG, PNG, WebP, GIF, BMP, TIFF).")]
_SettingsField = Annotated[
    str | None,
    Form(description='Sampling settings as a JSON object, e.g. {"temperature": 0, "max_tokens": 64}.'),
]


async def _read_upload(request: Request, file: UploadFile) -> Image.Image:
    ready_engine(request)
    data = await file.read()
    return await image_from_bytes(request, data, "file")


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
    parsed = parse_settings(settings)
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
    question: Annotated[str, Form(min_length=1, max_length=MAX_QUESTION_CHARS)],
    stream: Annotated[bool, Form()] = False,
    reasoning: Annotated[bool, Form()] = False,
    spatial_refs: Annotated[str | None, Form(description=_REFS_FORM_DOC)] = None,
    settings: _SettingsField = None,
) -> QueryResponse | Response:
    parsed = parse_settings(settings)
    refs = parse_spatial_refs(spatial_refs)
    image = await _read_upload(request, file)
    return await _query(request, image, question, stream, reasoning, refs, parsed)


@router.post(
    "/upload/detect", response_model=DetectResponse, responses=_ERRORS, summary="Detect in an uploaded image"
)
async def upload_detect(
    request: Request,
    file: _FileField,
    object: Annotated[str, Form(min_length=1, max_length=MAX_OBJECT_CHARS)],
    settings: _SettingsField = None,
) -> DetectResponse:
    parsed = parse_settings(settings)
    image = await _read_upload(request, file)
    return await _detect(request, image, object, parsed)


@router.post(
    "/upload/point", response_model=PointResponse, responses=_ERRORS, summary="Point in an uploaded image"
)
async def upload_point(
    request: Request,
    file: _FileField,
    object: Annotated[str, Form(min_length=1, max_length=MAX_OBJECT_CHARS)],
    settings: _SettingsField = None,
) -> PointResponse:
    parsed = parse_settings(settings)
    image = await _read_upload(request, file)
    return await _point(request, image, object, parsed)
