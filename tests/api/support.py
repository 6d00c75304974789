"""Helpers of the API tests: a live uvicorn server in a thread, the tiny checkpoint, images.

Each server runs in a background thread of the test process (so a test can hand it a gated or
slowed-down loader), bound to a free port picked by the OS.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from PIL import Image

from moondream_server.api.app import create_app
from moondream_server.api.server import server
from moondream_server.engine.base import Engine
from moondream_server.settings import Settings

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "moondream2-tiny"
IMAGES = sorted((TINY / "images").glob("img*.png"))
GREEDY = {"temperature": 0.0, "max_tokens": 12}

# Limits of the shared server: small enough that the 413 tests stay cheap.
MAX_BODY = 3 * 1024 * 1024
MAX_PIXELS = 2_000_000


def tiny_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": str(TINY),
        "revision": None,
        "device": "cpu",
        "dtype": "float32",
        "max_body_bytes": MAX_BODY,
        "max_image_pixels": MAX_PIXELS,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)


class LiveServer:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, engine)
        self.engine: Engine = self.app.state.engine
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        # The console script's own server (protocol, connection timeouts, drain on shutdown).
        self._server: uvicorn.Server = server(self.app, settings)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready(timeout=deadline - time.monotonic())
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.base_url + "/health/ready", trust_env=False).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, trust_env=False, **kwargs)


# ------------------------------------------------------------------------------- images


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


_ENCODED: dict[tuple[int, Path], Any] = {}


def encoded(model: Any, path: Path) -> Any:
    """The model's encoding of a test image, computed once per model: direct calls then skip the
    vision tower (the reference API takes an encoded image in place of a PIL image)."""
    key = (id(model), path)
    if key not in _ENCODED:
        _ENCODED[key] = model.encode_image(open_rgb(path))
    return _ENCODED[key]


def file_data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
