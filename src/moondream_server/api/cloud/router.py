"""Routes of the cloud surface: ``POST /v1/caption|query|detect|point``.

Wire-compatible with Moondream Cloud, so ``moondream.vl(endpoint="http://host:port/v1")`` works.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from moondream_server.api import serving
from moondream_server.api.app_state import ready_engine
from moondream_server.api.auth import require_api_key
from moondream_server.api.cloud.protocol import (
    V1CaptionRequest,
    V1CaptionResponse,
    V1DetectRequest,
    V1DetectResponse,
    V1ErrorBody,
    V1PointRequest,
    V1PointResponse,
    V1QueryRequest,
    V1QueryResponse,
    V1Request,
)
from moondream_server.api.errors import ApiError
from moondream_server.api.image_input import image_from_string
from moondream_server.api.json_body import BoundedJSONRoute
from moondream_server.api.moondream_sse import SSE_RESPONSE, chunk_stream
from moondream_server.api.moondream_wire import (
    boxes_out,
    engine_settings,
    metrics_out,
    points_out,
    reasoning_out,
)
from moondream_server.api.openapi_docs import error_responses
from moondream_server.api.served_model import check_model, check_variant
from moondream_server.api.spatial_refs import check_spatial_refs
from moondream_server.engine.base import Engine

router = APIRouter(
    prefix="/v1",
    tags=["cloud-compatible (/v1)"],
    dependencies=[Depends(require_api_key)],
    route_class=BoundedJSONRoute,
)

_COMMON = (401, 404, 413, 422, 429, 500, 503, 504)


def _admit(request: Request, body: V1Request) -> Engine:
    """Refuse another model or a variant, then a full queue, before the image is decoded."""
    check_model(request, body.model)
    check_variant(body.requested_variant, param="variant" if body.variant is not None else "settings.variant")
    return ready_engine(request)


@router.post(
    "/caption",
    response_model=V1CaptionResponse,
    responses={**SSE_RESPONSE, **error_responses(400, *_COMMON, model=V1ErrorBody)},
    summary="Caption an image",
)
async def caption(body: V1CaptionRequest, request: Request) -> V1CaptionResponse | Response:
    engine = _admit(request, body)
    image = await image_from_string(request, body.image_url, "image_url")
    job = serving.CaptionJob(image, body.length, engine_settings(body.settings))
    rid = serving.new_request_id("caption")
    if body.stream:
        return chunk_stream(await serving.stream(engine, job), rid)
    result = await serving.run(engine, job)
    return V1CaptionResponse(
        request_id=rid,
        caption=result.text,
        finish_reason=result.finish_reason,
        metrics=metrics_out(result.metrics),
    )


@router.post(
    "/query",
    response_model=V1QueryResponse,
    response_model_exclude_none=True,
    responses={**SSE_RESPONSE, **error_responses(400, *_COMMON, model=V1ErrorBody)},
    summary="Answer a question about an image (or a text-only question)",
)
async def query(body: V1QueryRequest, request: Request) -> V1QueryResponse | Response:
    engine = _admit(request, body)
    refs = check_spatial_refs(body.spatial_refs, has_image=body.image_url is not None)
    image = None if body.image_url is None else await image_from_string(request, body.image_url, "image_url")
    job = serving.QueryJob(image, body.question, body.reasoning, refs, engine_settings(body.settings))
    rid = serving.new_request_id("query")
    if body.stream:
        return chunk_stream(await serving.stream(engine, job), rid)
    result = await serving.run(engine, job)
    return V1QueryResponse(
        request_id=rid,
        answer=result.text,
        reasoning=reasoning_out(result.reasoning),
        finish_reason=result.finish_reason,
        metrics=metrics_out(result.metrics),
    )


@router.post(
    "/detect",
    response_model=V1DetectResponse,
    responses=error_responses(400, *_COMMON, model=V1ErrorBody),
    summary="Find bounding boxes of an object",
)
async def detect(body: V1DetectRequest, request: Request) -> V1DetectResponse:
    engine = _admit(request, body)
    image = await image_from_string(request, body.image_url, "image_url")
    result = await serving.run(engine, serving.DetectJob(image, body.object, engine_settings(body.settings)))
    return V1DetectResponse(
        request_id=serving.new_request_id("detect"),
        objects=boxes_out(result.objects),
        metrics=metrics_out(result.metrics),
    )


@router.post(
    "/point",
    response_model=V1PointResponse,
    responses=error_responses(400, *_COMMON, model=V1ErrorBody),
    summary="Find points on an object",
)
async def point(body: V1PointRequest, request: Request) -> V1PointResponse:
    engine = _admit(request, body)
    check_spatial_refs(body.spatial_refs, has_image=True)
    image = await image_from_string(request, body.image_url, "image_url")
    result = await serving.run(engine, serving.PointJob(image, body.object, engine_settings(body.settings)))
    points = points_out(result.points)
    return V1PointResponse(
        request_id=serving.new_request_id("point"),
        points=points,
        count=len(points),
        metrics=metrics_out(result.metrics),
    )


@router.post(
    "/segment",
    status_code=501,
    responses=error_responses(401, 501, model=V1ErrorBody),
    summary="Segment an object (not available: Moondream2 has no segmentation skill)",
)
async def segment() -> None:
    """Always 501: the official client's ``segment()`` targets Moondream 3's skill."""
    raise ApiError(
        501,
        "Moondream2 has no segmentation skill: /v1/segment needs Moondream 3, which this server does "
        "not serve. Use /v1/detect for boxes or /v1/point for points.",
        code="skill_not_available",
    )
