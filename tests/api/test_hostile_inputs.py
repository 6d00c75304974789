"""Hostile input against a real server process whose text model has the real width (2,048).

Every case gets its documented answer (docs/api.md, "Limits" and "Errors"), never a 5xx; while it
is served, ``/health`` keeps answering within 1 s (probed concurrently); and the server's RSS
after the answer is at most ``RSS_BOUND`` above what it was before. The width matters: the cost
the limits exist to prevent (a prompt embedded before its length is checked) is ``tokens × 2,048
× 4`` bytes at this width, 8 KiB per token, so a check that came too late would show here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from moondream_server.model import MoondreamConfig
from moondream_server.model.random_weights import write_checkpoint
from tests.api.hostile import ServerProcess, png_of_zeros, raw_post
from tests.api.support import TINY, encode

MiB = 1024 * 1024
MAX_PIXELS = 16_000_000  # the suite's pixel cap: a 4000x4000 bomb is just under it
# RSS growth allowed per case, after its answer (anonymous memory: see ServerProcess.rss).
# Legitimate work leaves some behind: memory the allocator keeps for reuse (measured, 2 cores AMD
# EPYC Zen 4: at most ~80 MiB, after a 16 MB base64 body, and ~60 MiB after a 16 MP decode;
# Pillow's large blocks keep decoded images out of it). What the limits prevent would not fit: a
# 16k-character question of emoji is ~64,000 tokens, 500 MiB once embedded at this width; 19 MB
# of JSON objects parse into ~0.5 GB; a 7000x7000 bomb decodes to ~150 MB and more per decode
# before the fix.
RSS_BOUND = 128 * MiB
HEALTH_BOUND_S = 1.0
FEW = {"temperature": 0.0, "max_tokens": 2, "max_objects": 2}


# ------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's shapes, except the text model's width: 2,048 as in Moondream2."""
    raw = json.loads((TINY / "config.json").read_text())
    raw["text"].update(dim=2048, ff_dim=64, n_layers=1, n_heads=32, n_kv_heads=32)
    raw["region"].update(dim=2048)
    raw["vision"].update(proj_out_dim=2048)
    folder = tmp_path_factory.mktemp("wide")
    return write_checkpoint(folder, MoondreamConfig.from_dict(raw), TINY / "tokenizer.json")


@pytest.fixture(scope="module")
def server(wide_checkpoint: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        [
            *("--model", str(wide_checkpoint), "--device", "cpu", "--dtype", "float32"),
            *("--cpu-weights", "float32", "--threads", "1", "--log-level", "warning"),
            *("--max-image-pixels", str(MAX_PIXELS)),
        ],
        env={"MOONDREAM_REVISION": ""},
    ).wait_ready()
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------- payloads


def noise(w: int = 64, h: int = 48) -> Image.Image:
    return Image.effect_noise((w, h), 60).convert("RGB")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupted(data: bytes) -> bytes:
    out = bytearray(data)
    for i in range(len(out) // 3, len(out) // 3 + 16):
        out[i] ^= 0xA5
    return bytes(out)


def gif_bomb() -> bytes:
    """A one-pixel GIF whose logical screen declares 65535 x 65535."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = (65535).to_bytes(2, "little") * 2
    return bytes(data)


def jpeg_bomb() -> bytes:
    """A small JPEG whose frame header (SOF0) declares 60000 x 60000."""
    data = bytearray(encode(noise(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


def bmp_bomb() -> bytes:
    data = bytearray(encode(noise(4, 4), "BMP"))
    data[18:26] = (100_000).to_bytes(4, "little") * 2
    return bytes(data)


def palette_transparent() -> bytes:
    buf = io.BytesIO()
    noise().convert("P").save(buf, "PNG", transparency=0)
    return buf.getvalue()


def animated(fmt: str, frames: int = 4, size: tuple[int, int] = (64, 48)) -> bytes:
    images = [noise(*size) for _ in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=True, append_images=images[1:], duration=50, loop=0)
    return buf.getvalue()


def many_frame_gif() -> bytes:
    """600 frames of 1000 x 1000 (600 M pixels in all): only the first may be decoded."""
    frame = Image.new("P", (1000, 1000))
    buf = io.BytesIO()
    frame.save(buf, "GIF", save_all=True, append_images=[frame] * 599, duration=10)
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    return encode(noise().convert("CMYK"), "JPEG")


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise(), "JPEG", exif=exif)


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------- cases


Send = Callable[[], tuple[int, str]]  # sends the prepared request: (status, body)


@dataclass(frozen=True)
class Case:
    name: str
    prepare: Callable[[ServerProcess], Send]  # builds (encodes) the request, not timed
    status: int
    says: str = ""  # a fragment the error message must contain


def post(path: str, **kwargs: Any) -> Callable[[ServerProcess], Send]:
    """An httpx request, encoded before the case starts: the test process's own JSON encoding
    (a million spatial_refs take it ~1 s) must not be measured as the server's /health delay."""

    def prepare(srv: ServerProcess) -> Send:
        args = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
        client = httpx.Client(base_url=srv.base_url, timeout=120, trust_env=False)
        request = client.build_request("POST", path, **args)
        request.read()

        def send() -> tuple[int, str]:
            with client:
                r = client.send(request)
                return r.status_code, r.text

        return send

    return prepare


JSON = {"content-type": "application/json"}

# Images on each of the three ways in: cloud JSON, seed JSON, multipart upload.
IMAGE_CASES: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("truncated-png", lambda: truncated(encode(noise(), "PNG")), 400, "truncated"),
    ("truncated-jpeg", lambda: truncated(encode(noise(256, 256), "JPEG")), 400, ""),
    ("corrupt-png", lambda: corrupted(encode(noise(), "PNG")), 400, ""),
    ("random-bytes", lambda: os.urandom(5000), 400, "not a recognised image"),
    ("png-bomb-over-cap", lambda: png_of_zeros(7000, 7000), 413, "16,000,000"),
    ("png-bomb-under-cap", lambda: png_of_zeros(4000, 4000), 200, ""),
    ("png-1x1000000", lambda: png_of_zeros(1, 1_000_000), 413, "longest side"),
]
ONE_ROUTE_IMAGES: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("png-20000x1", lambda: png_of_zeros(20_000, 1), 413, "longest side"),
    ("empty-file", lambda: b"", 400, "empty"),
    ("gif-bomb-65535", gif_bomb, 413, "pixels"),
    ("jpeg-bomb-60000", jpeg_bomb, 413, "pixels"),
    ("bmp-bomb-100000", bmp_bomb, 413, "pixels"),
    ("cmyk-jpeg", cmyk_jpeg, 200, ""),
    ("png-16bit-gray", lambda: png_of_zeros(300, 200, depth=16, color_type=0), 200, ""),
    ("png-16bit-rgba", lambda: png_of_zeros(300, 200, depth=16, color_type=6), 200, ""),
    ("palette-transparency", palette_transparent, 200, ""),
    ("la-png", lambda: encode(noise().convert("LA"), "PNG"), 200, ""),
    ("one-bit-png", lambda: encode(noise().convert("1"), "PNG"), 200, ""),
    ("animated-gif", lambda: animated("GIF"), 200, ""),
    ("animated-png", lambda: animated("PNG"), 200, ""),
    ("animated-webp", lambda: animated("WEBP"), 200, ""),
    ("gif-600-frames-of-1mp", many_frame_gif, 200, ""),
    ("exif-rotated-jpeg", exif_rotated, 200, ""),
    ("ppm", lambda: encode(noise(), "PPM"), 400, ""),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>', 400, ""),
    ("pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 400, ""),
]
ROUTES = ("v1", "seed", "upload")


def image_case(name: str, make: Callable[[], bytes], status: int, says: str, route: str) -> Case:
    if route == "v1":
        prepare = post("/v1/caption", json=lambda: {"image_url": b64(make()), "settings": FEW})
    elif route == "seed":
        prepare = post("/caption", json=lambda: {"image": b64(make()), "settings": FEW})
    else:
        prepare = post(
            "/upload/caption", files=lambda: {"file": ("x", make())}, data={"settings": json.dumps(FEW)}
        )
    return Case(f"{route}-{name}", prepare, status, says)


def hundred_mib(path: str, *, chunked: bool, content_type: str = "application/json") -> Case:
    total = 100 * MiB

    def prepare(srv: ServerProcess) -> Send:
        block = b"0" * MiB
        if chunked:
            headers = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
            chunk = b"%x\r\n" % len(block) + block + b"\r\n"
            chunks = (chunk for _ in range(total // MiB))
        else:
            headers = {"Content-Type": content_type, "Content-Length": str(total)}
            chunks = (block for _ in range(total // MiB))

        def send() -> tuple[int, str]:
            status, raw = raw_post(srv.port, path, headers, chunks)
            return status, raw.decode(errors="replace")

        return send

    name = f"100mib-{'chunked' if chunked else 'declared'}-{path.strip('/').replace('/', '-')}"
    return Case(name, prepare, 413)


PNG = encode(noise(), "PNG")
EMOJI_QUESTION = "🦄" * 16_000  # within the character limit, ~64,000 tokens: far over the context
REF = [0.5, 0.5]

CASES: list[Case] = [
    *(image_case(n, m, s, w, route) for n, m, s, w in IMAGE_CASES for route in ROUTES),
    *(image_case(n, m, s, w, ROUTES[i % 3]) for i, (n, m, s, w) in enumerate(ONE_ROUTE_IMAGES)),
    # base64 and data URLs
    Case("v1-bad-base64", post("/v1/caption", json={"image_url": "@@@not base64@@@"}), 400, "base64"),
    Case("seed-bad-base64", post("/caption", json={"image": "data:image/png;base64,%%%%"}), 400, "base64"),
    Case(
        "v1-text-mime",
        post("/v1/caption", json={"image_url": "data:text/plain;base64,aGk="}),
        400,
        "text/plain",
    ),
    Case("v1-no-base64-flag", post("/v1/caption", json={"image_url": "data:image/png,abc"}), 400, "base64"),
    Case(
        "v1-http-url", post("/v1/caption", json={"image_url": "http://169.254.169.254/"}), 400, "not fetched"
    ),
    Case(
        "v1-megabyte-mime",
        post("/v1/caption", json={"image_url": "data:" + "a" * MiB + ";base64,AA=="}),
        400,
        "",
    ),
    Case(
        "v1-12mb-random-base64",
        post("/v1/caption", json=lambda: {"image_url": b64(os.urandom(12 * MiB))}),
        400,
        "",
    ),
    # text fields
    Case("v1-question-19mb", post("/v1/query", json={"question": "x" * (19 * MiB)}), 422, "16384"),
    Case(
        "seed-question-19mb",
        post("/query", json={"image": b64(PNG), "question": "x" * (19 * MiB)}),
        422,
        "16384",
    ),
    Case("v1-question-over-context", post("/v1/query", json={"question": EMOJI_QUESTION}), 400, "tokens fit"),
    Case(
        "upload-question-over-context",
        post("/upload/query", files={"file": ("a.png", PNG)}, data={"question": EMOJI_QUESTION}),
        400,
        "tokens fit",
    ),
    Case(
        "upload-question-20k-chars",
        post("/upload/query", files={"file": ("a.png", PNG)}, data={"question": "q" * 20_000}),
        422,
        "16384",
    ),
    Case("v1-object-1mb", post("/v1/detect", json={"image_url": b64(PNG), "object": "o" * MiB}), 422, "2048"),
    Case(
        "seed-object-over-context",
        post("/detect", json={"image": b64(PNG), "object": "🦄" * 2000}),
        400,
        "tokens fit",
    ),
    Case("v1-model-1mb", post("/v1/query", json={"question": "q", "model": "m" * MiB}), 422, "256"),
    # the OpenAI and Ollama surfaces carry text in their own fields: refused before tokenizing
    Case(
        "openai-content-19mb",
        post(
            "/v1/chat/completions",
            json={"model": "moondream2", "messages": [{"role": "user", "content": "x" * (19 * MiB)}]},
        ),
        400,
        "16,384",
    ),
    Case(
        "ollama-prompt-19mb",
        post("/api/generate", json={"model": "moondream2", "prompt": "x" * (19 * MiB)}),
        400,
        "16,384",
    ),
    Case(
        "openai-5000-messages",
        post(
            "/v1/chat/completions",
            json={"model": "moondream2", "messages": [{"role": "user", "content": "q"}] * 5000},
        ),
        413,
        "4,096",
    ),
    # spatial_refs
    Case(
        "v1-refs-1m",
        post(
            "/v1/query",
            json=lambda: {"image_url": b64(PNG), "question": "q", "spatial_refs": [REF] * 1_000_000},
        ),
        413,
        "4,096",
    ),
    Case(
        "v1-refs-65",
        post("/v1/point", json={"image_url": b64(PNG), "object": "o", "spatial_refs": [REF] * 65}),
        422,
        "64",
    ),
    Case(
        "seed-ref-of-100k-numbers",
        post("/query", json={"image": b64(PNG), "question": "q", "spatial_refs": [[0.5] * 100_000]}),
        422,
        "4",
    ),
    Case(
        "upload-refs-65",
        post(
            "/upload/query",
            files={"file": ("a.png", PNG)},
            data={"question": "q", "spatial_refs": json.dumps([REF] * 65)},
        ),
        422,
        "64",
    ),
    Case(
        "upload-refs-2mb",
        post(
            "/upload/query",
            files={"file": ("a.png", PNG)},
            data={"question": "q", "spatial_refs": json.dumps([REF] * 200_000)},
        ),
        400,
        "maximum size",
    ),
    # wrong types and shapes
    Case("v1-question-number", post("/v1/query", json={"question": 42}), 422, "question"),
    Case("v1-image-url-list", post("/v1/caption", json={"image_url": ["a"]}), 422, "image_url"),
    Case(
        "v1-max-tokens-huge",
        post("/v1/query", json={"question": "q", "settings": {"max_tokens": 10**12}}),
        422,
        "max_tokens",
    ),
    Case(
        "seed-max-tokens-negative",
        post("/query", json={"image": b64(PNG), "question": "q", "settings": {"max_tokens": -1}}),
        422,
        "max_tokens",
    ),
    Case(
        "v1-max-objects-zero",
        post("/v1/detect", json={"image_url": b64(PNG), "object": "o", "settings": {"max_objects": 0}}),
        422,
        "max_objects",
    ),
    Case(
        "v1-temperature-nan",
        post("/v1/query", content='{"question": "q", "settings": {"temperature": NaN}}', headers=JSON),
        422,
        "temperature",
    ),
    Case("v1-stream-maybe", post("/v1/query", json={"question": "q", "stream": "maybe"}), 422, "stream"),
    Case("v1-body-a-list", post("/v1/query", json=["question"]), 422, ""),
    Case("v1-invalid-json", post("/v1/query", content='{"question": "q",', headers=JSON), 422, "JSON"),
    Case(
        "v1-nested-100k", post("/v1/query", content="[" * 100_000 + "]" * 100_000, headers=JSON), 413, "4,096"
    ),
    Case(
        "seed-19mb-of-empty-objects",
        post("/query", content=lambda: b"[" + b"{}," * (6 * MiB) + b"{}]", headers=JSON),
        413,
        "4,096",
    ),
    Case("upload-no-file", post("/upload/caption", data={"length": "short"}), 422, "file"),
    Case(
        "upload-file-as-text", post("/upload/detect", data={"file": "not a file", "object": "o"}), 422, "file"
    ),
    Case("seed-image-missing", post("/point", json={"object": "o"}), 422, "image"),
    # bodies
    hundred_mib("/v1/caption", chunked=False),
    hundred_mib("/caption", chunked=True),
    hundred_mib("/upload/caption", chunked=False, content_type="multipart/form-data; boundary=x"),
]


# ------------------------------------------------------------------------------- the test


class HealthProbe:
    """Polls /health from a thread while a case runs; the slowest answer it saw."""

    def __init__(self, srv: ServerProcess) -> None:
        self._srv = srv
        self._stop = threading.Event()
        self.slowest = 0.0
        self.failures: list[str] = []
        self.peak_rss = srv.rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self._srv.base_url, timeout=10, trust_env=False) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    status = c.get("/health").status_code
                    if status != 200:
                        self.failures.append(f"/health answered {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - t0)
                self.peak_rss = max(self.peak_rss, self._srv.rss)
                self._stop.wait(0.05)


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(server: ServerProcess, case: Case) -> None:
    send = case.prepare(server)
    before = server.rss
    with HealthProbe(server) as probe:
        status, body = send()
    assert server.alive()
    assert status == case.status, body[:500]
    if status != 200:
        assert case.says in body, body[:500]
        assert len(body) < 4096  # an error never echoes what was sent
    assert not probe.failures, probe.failures[:3]
    assert probe.slowest < HEALTH_BOUND_S, f"/health took {probe.slowest:.2f} s during the case"
    growth = settled_growth(server, before)
    assert growth < RSS_BOUND, (
        f"RSS grew {growth / MiB:.0f} MiB (peak +{(probe.peak_rss - before) / MiB:.0f})"
    )


def settled_growth(srv: ServerProcess, before: int, settle_s: float = 3.0) -> int:
    """RSS growth once the server has let go of the case's memory: a read right at the answer
    may still see memory being released (a 16 MP case peaks ~180 MiB above its start, measured),
    so a read over the bound is repeated for ``settle_s``; memory still held then counts."""
    deadline = time.monotonic() + settle_s
    while (growth := srv.rss - before) >= RSS_BOUND and time.monotonic() < deadline:
        time.sleep(0.1)
    return growth
