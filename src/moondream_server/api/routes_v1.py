"""Cloud-compatible routes: ``POST /v1/caption|query|detect|point``.

Wire-compatible with Moondream Cloud, so ``moondream.vl(endpoint="http://host:port/v1")`` works.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from moondream_server.api.auth import require_api_key
from moondream_server.api.common import (
    SSE_RESPONSE,
    boxes_out,
    check_spatial_refs,
    decode_string,
    error_responses,
    get_engine,
    metrics_out,
    new_request_id,
    points_out,
    reasoning_out,
)
from moondream_server.api.schemas import (
    V1CaptionRequest,
    V1CaptionResponse,
    V1DetectRequest,
    V1DetectResponse,
    V1ErrorBody,
    V1PointRequest,
    V1PointResponse,
    V1QueryRequest,
    V1QueryResponse,
    engine_settings,
)
from moondream_server.api.sse import single_piece, stream_response

router = APIRouter(prefix="/v1", tags=["cloud-compatible (/v1)"], dependencies=[Depends(require_api_key)])

_COMMON = (401, 413, 422, 429, 500, 503, 504)


@router.post(
    "/caption",
    response_model=V1CaptionResponse,
    responses={**SSE_RESPONSE, **error_responses(400, *_COMMON, model=V1ErrorBody)},
    summary="Caption an image",
)
async def caption(body: V1CaptionRequest, request: Request) -> V1CaptionResponse | Response:
    engine = get_engine(request)
    image = await decode_string(request, body.image_url, "image_url")
    settings = engine_settings(body.settings)
    rid = new_request_id("caption")
    if body.stream:
        return await stream_response(engine.stream_caption(image, body.length, settings), rid)
    result = await engine.caption(image, body.length, settings)
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
    engine = get_engine(request)
    refs = check_spatial_refs(body.spatial_refs, has_image=body.image_url is not None)
    image = await decode_string(request, body.image_url, "image_url") if body.image_url is not None else None
    settings = engine_settings(body.settings)
    rid = new_request_id("query")
    if body.stream and not body.reasoning:
        pieces = engine.stream_query(image, body.question, spatial_refs=refs, settings=settings)
        return await stream_response(pieces, rid)
    result = await engine.query(
        image, body.question, reasoning=body.reasoning, spatial_refs=refs, settings=settings
    )
    if body.stream:
        # Reasoning is not streamed (as in the cloud): send the answer as one piece.
        return await stream_response(single_piece(result.text), rid)
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
    engine = get_engine(request)
    image = await decode_string(request, body.image_url, "image_url")
    result = await engine.detect(image, body.object, engine_settings(body.settings))
    return V1DetectResponse(
        request_id=new_request_id("detect"),
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
    engine = get_engine(request)
    check_spatial_refs(body.spatial_refs, has_image=True)
    image = await decode_string(request, body.image_url, "image_url")
    result = await engine.point(image, body.object, engine_settings(body.settings))
    points = points_out(result.points)
    return V1PointResponse(
        request_id=new_request_id("point"),
        points=points,
        count=len(points),
        metrics=metrics_out(result.metrics),
    )
