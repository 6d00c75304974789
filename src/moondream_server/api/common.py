"""What both route families share: engine access, image decoding off the loop, spatial refs."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from moondream_server.api.errors import ApiError
from moondream_server.api.images import decode_image_bytes, decode_image_string
from moondream_server.api.schemas import BoxOut, GroundingOut, MetricsOut, PointOut, ReasoningOut
from moondream_server.engine.base import Engine
from moondream_server.engine.errors import NotReadyError
from moondream_server.engine.types import Box, Metrics, Point, Reasoning, SpatialRef
from moondream_server.settings import Settings

log = logging.getLogger(__name__)

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Bad input: invalid base64, not an image, a truncated image, or invalid spatial_refs.",
    401: "API keys are configured and X-Moondream-Auth is missing or wrong.",
    413: "The request body or the image's pixel count is over the server's limit.",
    422: "A required field is missing or a field has the wrong type.",
    429: "The request queue is full; retry after the Retry-After seconds.",
    500: "Unexpected server error.",
    503: "The model is not loaded and warmed up yet; retry after the Retry-After seconds.",
    504: "The request did not finish within the server's deadline.",
}


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    if not engine.is_ready():
        # Checked here too so that a request is refused before its image is decoded.
        error = getattr(engine, "load_error", None)
        if error is not None:
            raise NotReadyError(f"the model failed to load: {error}", retry_after_s=60.0)
        raise NotReadyError()
    # Refuse before decoding the image when the queue is already full (the engine's own
    # admission stays the authority; this only saves the decoding work under overload).
    check_capacity = getattr(engine, "check_capacity", None)
    if callable(check_capacity):
        check_capacity()
    return engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def new_request_id(skill: str) -> str:
    return f"{time.strftime('%Y-%m-%d', time.gmtime())}_{skill}_{secrets.token_hex(8)}"


async def decode_string(request: Request, value: str, param: str) -> Image.Image:
    max_pixels = get_settings(request).max_image_pixels
    return await run_in_threadpool(decode_image_string, value, max_pixels=max_pixels, param=param)


async def decode_bytes(request: Request, data: bytes, param: str) -> Image.Image:
    max_pixels = get_settings(request).max_image_pixels
    return await run_in_threadpool(decode_image_bytes, data, max_pixels=max_pixels, param=param)


def check_spatial_refs(
    refs: Sequence[Sequence[float]] | None, *, has_image: bool, param: str = "spatial_refs"
) -> list[SpatialRef]:
    """2 values (a point) or 4 (a box), finite, in [0, 1], boxes not inverted; needs an image."""
    if not refs:
        return []
    if not has_image:
        raise ApiError(400, "spatial_refs need an image", code="invalid_spatial_refs", param=param)
    out: list[SpatialRef] = []
    for i, ref in enumerate(refs):
        where = f"{param}[{i}]"
        if len(ref) not in (2, 4):
            raise ApiError(
                400,
                f"{where} must be [x, y] or [x_min, y_min, x_max, y_max], got {len(ref)} values",
                code="invalid_spatial_refs",
                param=param,
            )
        values = [float(v) for v in ref]
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise ApiError(
                400,
                f"{where} values must be finite and within [0, 1]",
                code="invalid_spatial_refs",
                param=param,
            )
        if len(values) == 4:
            if values[0] > values[2] or values[1] > values[3]:
                raise ApiError(
                    400,
                    f"{where} is an inverted box (x_min > x_max or y_min > y_max)",
                    code="invalid_spatial_refs",
                    param=param,
                )
            out.append((values[0], values[1], values[2], values[3]))
        else:
            out.append((values[0], values[1]))
    return out


def metrics_out(m: Metrics) -> MetricsOut:
    return MetricsOut(
        input_tokens=m.input_tokens,
        output_tokens=m.output_tokens,
        prefill_time_ms=m.prefill_time_ms,
        decode_time_ms=m.decode_time_ms,
        ttft_ms=m.ttft_ms,
    )


def reasoning_out(r: Reasoning | None) -> ReasoningOut | None:
    if r is None:
        return None
    return ReasoningOut(
        text=r.text,
        grounding=[
            GroundingOut(
                start_idx=g.start_idx, end_idx=g.end_idx, points=[p for p in g.points if _finite(*p)]
            )
            for g in r.grounding
        ],
    )


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def boxes_out(boxes: Sequence[Box]) -> list[BoxOut]:
    """Boxes for the wire; a non-finite coordinate (JSON cannot carry it) drops that box."""
    out = [
        BoxOut(x_min=b.x_min, y_min=b.y_min, x_max=b.x_max, y_max=b.y_max)
        for b in boxes
        if _finite(b.x_min, b.y_min, b.x_max, b.y_max)
    ]
    if len(out) != len(boxes):
        log.warning("dropped %d box(es) with non-finite coordinates", len(boxes) - len(out))
    return out


def points_out(points: Sequence[Point]) -> list[PointOut]:
    """Points for the wire; a non-finite coordinate drops that point."""
    out = [PointOut(x=p.x, y=p.y) for p in points if _finite(p.x, p.y)]
    if len(out) != len(points):
        log.warning("dropped %d point(s) with non-finite coordinates", len(points) - len(out))
    return out


def error_responses(*statuses: int, model: Any) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": model, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "JSON, or with `stream: true` a `text/event-stream` of "
            '`data: {"chunk": "...", "completed": false}` events ending with '
            '`data: {"chunk": "", "completed": true, "request_id": "..."}`.'
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}
