"""A request's image, decoded by the app's bounded decoder (``api/decoder.py``), never on the event loop.

The engine's capacity is checked again right before the decode: a request the queue cannot take
is refused (429) before its image costs anything.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from PIL import Image

from moondream_server.api.decoder import ImageDecoder
from moondream_server.engine.base import Engine


def _decoder(request: Request) -> ImageDecoder:
    decoder: ImageDecoder = request.app.state.image_decoder
    return decoder


def _admission(request: Request) -> Callable[[], None]:
    engine: Engine = request.app.state.engine
    return engine.check_capacity


async def image_from_string(request: Request, value: str, param: str) -> Image.Image:
    """From a data URL or bare base64; ImageError (400/413/429) names ``param``."""
    return await _decoder(request).decode_string(value, param=param, admit=_admission(request))


async def image_from_bytes(request: Request, data: bytes, param: str) -> Image.Image:
    """From an uploaded file's bytes."""
    return await _decoder(request).decode_bytes(data, param=param, admit=_admission(request))
