"""A request's image, decoded on a worker thread (never on the event loop) under the app's pixel limit."""

from __future__ import annotations

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from moondream_server.api.app_state import app_settings
from moondream_server.api.images import decode_image_bytes, decode_image_string


async def image_from_string(request: Request, value: str, param: str) -> Image.Image:
    """From a data URL or bare base64; ImageError (400/413) names ``param``."""
    max_pixels = app_settings(request).max_image_pixels
    return await run_in_threadpool(decode_image_string, value, max_pixels=max_pixels, param=param)


async def image_from_bytes(request: Request, data: bytes, param: str) -> Image.Image:
    """From an uploaded file's bytes."""
    max_pixels = app_settings(request).max_image_pixels
    return await run_in_threadpool(decode_image_bytes, data, max_pixels=max_pixels, param=param)
