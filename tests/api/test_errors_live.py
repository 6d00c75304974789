"""Every client error class against the live server: real statuses, the family's body shape, and
the server keeps serving afterwards."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.api.support import GREEDY, IMAGES, MAX_BODY, MAX_PIXELS, data_url, encode, file_data_url

IMG1 = IMAGES[0]


def assert_v1_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param
    return err


def assert_seed_error(r: httpx.Response, status: int) -> Any:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"}
    return body["detail"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height and stops after its header (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # the start of the first row only
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def truncated_png() -> bytes:
    img = Image.effect_noise((200, 200), 64).convert("RGB")
    data = encode(img, "PNG")
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    img = Image.effect_noise((200, 200), 64).convert("RGB")
    data = encode(img, "JPEG", quality=90)
    return data[: len(data) // 2]


# ------------------------------------------------------------------------------ 400: bad image

BAD_IMAGES = {
    "bad-base64": "data:image/png;base64,@@@not base64@@@",
    "bare-bad-base64": "!!!!",
    "not-an-image": data_url(b"hello, this is text and not an image at all", "image/png"),
    "truncated-png": data_url(truncated_png()),
    "truncated-jpeg": data_url(truncated_jpeg(), "image/jpeg"),
    "empty": "data:image/png;base64,",
    "text-mime": "data:text/plain;base64," + base64.b64encode(b"hi").decode(),
    "http-url": "https://example.com/cat.jpg",
}


@pytest.mark.parametrize("image", list(BAD_IMAGES.values()), ids=list(BAD_IMAGES))
def test_bad_image_is_400_on_v1(client: httpx.Client, image: str) -> None:
    r = client.post("/v1/caption", json={"image_url": image, "settings": GREEDY})
    err = assert_v1_error(r, 400, param="image_url")
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("name", ["bad-base64", "not-an-image", "truncated-png"])
def test_bad_image_is_400_on_seed(client: httpx.Client, name: str) -> None:
    r = client.post("/detect", json={"image": BAD_IMAGES[name], "object": "cat"})
    detail = assert_seed_error(r, 400)
    assert isinstance(detail, str) and detail


def test_bad_image_messages_say_what_is_wrong(client: httpx.Client) -> None:
    def message(key: str) -> str:
        r = client.post("/v1/point", json={"image_url": BAD_IMAGES[key], "object": "x"})
        return str(r.json()["error"]["message"])

    assert "base64" in message("bad-base64")
    assert "not a recognised image" in message("not-an-image")
    assert "truncated" in message("truncated-png")


@pytest.mark.parametrize("data", [b"GIF89a garbage", truncated_png()], ids=["garbage", "truncated"])
def test_bad_upload_is_400(client: httpx.Client, data: bytes) -> None:
    r = client.post("/upload/caption", files={"file": ("x.png", data, "image/png")})
    assert_seed_error(r, 400)


# ------------------------------------------------------------------------------ 413


def test_body_over_limit_by_content_length_is_413(client: httpx.Client) -> None:
    big = "A" * (MAX_BODY + 10)
    r = client.post("/v1/caption", json={"image_url": big})
    err = assert_v1_error(r, 413)
    assert str(MAX_BODY) in err["message"].replace(",", "")
    assert_seed_error(client.post("/caption", json={"image": big}), 413)


def test_streamed_body_over_limit_is_413(client: httpx.Client) -> None:
    """No Content-Length (chunked upload): the bytes are counted as they arrive."""

    def chunks() -> Iterator[bytes]:
        yield b'{"image_url": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"A" * 65536
        yield b'"}'

    r = client.post("/v1/caption", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_v1_error(r, 413)

    def multipart() -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n"
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"\x89" * 65536
        yield b"\r\n--x--\r\n"

    r = client.post(
        "/upload/caption", content=multipart(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert_seed_error(r, 413)


def test_too_many_pixels_is_413(client: httpx.Client) -> None:
    # Real, complete image just over the cap (small file: one colour).
    img = Image.new("RGB", (2000, MAX_PIXELS // 2000 + 1), (10, 200, 30))
    r = client.post("/v1/caption", json={"image_url": data_url(encode(img))})
    err = assert_v1_error(r, 413, param="image_url")
    assert "pixels" in err["message"]
    r = client.post(
        "/upload/detect", files={"file": ("big.png", encode(img), "image/png")}, data={"object": "x"}
    )
    assert_seed_error(r, 413)


@pytest.mark.parametrize(
    "size", [(2001, 1000), (10_000, 10_000), (30_000, 30_000)], ids=["cap", "warn", "bomb"]
)
def test_pixel_count_is_checked_from_the_header(client: httpx.Client, size: tuple[int, int]) -> None:
    """Header-only files: refused before decoding, including Pillow's own bomb limits."""
    r = client.post("/v1/detect", json={"image_url": data_url(png_header(*size)), "object": "x"})
    assert_v1_error(r, 413, param="image_url")


def test_image_at_the_pixel_cap_is_fine(client: httpx.Client) -> None:
    img = Image.new("RGB", (2000, MAX_PIXELS // 2000), (10, 200, 30))
    r = client.post("/v1/detect", json={"image_url": data_url(encode(img)), "object": "x"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ 422

V1_INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/caption", {}, "image_url"),
    ("/v1/caption", {"image_url": 123}, "image_url"),
    ("/v1/caption", {"image_url": "x", "length": "medium"}, "length"),
    ("/v1/caption", {"image_url": "x", "stream": "sometimes"}, "stream"),
    ("/v1/caption", {"image_url": "x", "settings": {"max_tokens": "lots"}}, "settings.max_tokens"),
    ("/v1/caption", {"image_url": "x", "settings": {"temperature": -1}}, "settings.temperature"),
    ("/v1/caption", {"image_url": "x", "settings": "hot"}, "settings"),
    ("/v1/query", {"image_url": "x"}, "question"),
    ("/v1/query", {"question": ["a"]}, "question"),
    ("/v1/query", {"question": "q", "reasoning": "maybe"}, "reasoning"),
    ("/v1/query", {"question": "q", "spatial_refs": "center"}, "spatial_refs"),
    ("/v1/detect", {"image_url": "x"}, "object"),
    ("/v1/detect", {"object": "cat"}, "image_url"),
    ("/v1/point", {"image_url": "x", "object": None}, "object"),
    (
        "/v1/point",
        {"image_url": "x", "object": "cat", "settings": {"max_objects": 0}},
        "settings.max_objects",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), V1_INVALID)
def test_v1_validation_is_422(client: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    err = assert_v1_error(client.post(path, json=body), 422, param=param)
    assert param in err["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/caption", {}),
        ("/caption", {"image": "x", "length": 5}),
        ("/query", {"image": "x"}),
        ("/detect", {"image": "x"}),
        ("/point", {"object": "cat"}),
    ],
)
def test_seed_validation_is_422(client: httpx.Client, path: str, body: dict[str, Any]) -> None:
    detail = assert_seed_error(client.post(path, json=body), 422)
    assert isinstance(detail, list) and detail and {"loc", "msg", "type"} <= set(detail[0])


def test_not_json_is_422(client: httpx.Client) -> None:
    r = client.post("/v1/caption", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_v1_error(r, 422)


def test_upload_validation_is_422(client: httpx.Client) -> None:
    png = IMG1.read_bytes()
    assert_seed_error(client.post("/upload/caption", data={"length": "normal"}), 422)  # no file
    assert_seed_error(client.post("/upload/query", files={"file": ("a.png", png)}), 422)  # no question
    assert_seed_error(client.post("/upload/detect", files={"file": ("a.png", png)}), 422)  # no object
    r = client.post("/upload/caption", files={"file": ("a.png", png)}, data={"settings": "{bad json"})
    assert_seed_error(r, 422)
    r = client.post(
        "/upload/caption", files={"file": ("a.png", png)}, data={"settings": '{"max_tokens": "x"}'}
    )
    assert_seed_error(r, 422)
    r = client.post(
        "/upload/query", files={"file": ("a.png", png)}, data={"question": "q", "spatial_refs": "[1,"}
    )
    assert_seed_error(r, 422)


def test_validation_errors_do_not_echo_the_image(client: httpx.Client) -> None:
    url = file_data_url(IMG1)
    r = client.post("/caption", json={"image": url, "length": "medium"})
    assert r.status_code == 422
    assert url[40:80] not in r.text


# ------------------------------------------------------------------------------ 400: spatial refs

BAD_REFS: dict[str, list[Any]] = {
    "three-values": [[0.1, 0.2, 0.3]],
    "one-value": [[0.1]],
    "out-of-range": [[0.5, 1.5]],
    "negative": [[-0.1, 0.5]],
    "inverted-box": [[0.6, 0.2, 0.1, 0.7]],
    "inverted-box-y": [[0.1, 0.7, 0.6, 0.2]],
}


@pytest.mark.parametrize("refs", list(BAD_REFS.values()), ids=list(BAD_REFS))
def test_bad_spatial_refs_are_400(client: httpx.Client, refs: list[Any]) -> None:
    url = file_data_url(IMG1)
    r = client.post("/v1/query", json={"image_url": url, "question": "q", "spatial_refs": refs})
    assert_v1_error(r, 400, param="spatial_refs")
    r = client.post("/v1/point", json={"image_url": url, "object": "cat", "spatial_refs": refs})
    assert_v1_error(r, 400, param="spatial_refs")
    assert_seed_error(client.post("/query", json={"image": url, "question": "q", "spatial_refs": refs}), 400)


def test_non_finite_spatial_refs_are_400(client: httpx.Client) -> None:
    url = file_data_url(IMG1)
    raw = '{"image_url": "' + url + '", "question": "q", "spatial_refs": [[NaN, 0.5]]}'
    r = client.post("/v1/query", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert_v1_error(r, 400, param="spatial_refs")
    raw = raw.replace("NaN", "Infinity")
    r = client.post("/v1/query", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert_v1_error(r, 400, param="spatial_refs")


def test_spatial_refs_without_image_are_400(client: httpx.Client) -> None:
    r = client.post("/v1/query", json={"question": "q", "spatial_refs": [[0.5, 0.5]]})
    err = assert_v1_error(r, 400, param="spatial_refs")
    assert "image" in err["message"]


def test_spatial_refs_bad_upload_is_400(client: httpx.Client) -> None:
    data = {"question": "q", "spatial_refs": json.dumps([[0.9, 0.9, 0.1, 0.1]])}
    r = client.post("/upload/query", files={"file": ("a.png", IMG1.read_bytes())}, data=data)
    assert_seed_error(r, 400)


# ------------------------------------------------------------------------------ 400: model limits


def test_prompt_longer_than_the_context_is_400(client: httpx.Client) -> None:
    body = {"question": "word " * 3000, "settings": GREEDY}
    err = assert_v1_error(client.post("/v1/query", json=body), 400)
    assert "context" in err["message"]
    r = client.post("/v1/query", json={**body, "stream": True})  # known before the stream starts
    assert_v1_error(r, 400)
    r = client.post("/detect", json={"image": file_data_url(IMG1), "object": "🦄" * 500})
    assert "context" in assert_seed_error(r, 400)


# ------------------------------------------------------------------------------ routing


def test_unknown_route_is_404_in_family_shape(client: httpx.Client) -> None:
    assert_v1_error(client.post("/v1/no-such-skill", json={}), 404)
    assert_v1_error(client.post("/v1/segment", json={}), 501)  # Moondream2 has no segmentation skill
    assert_seed_error(client.post("/nope", json={}), 404)


def test_wrong_method_is_405(client: httpx.Client) -> None:
    assert_v1_error(client.get("/v1/caption"), 405)


def test_server_still_serves_after_bad_input(client: httpx.Client) -> None:
    for image in BAD_IMAGES.values():
        client.post("/v1/caption", json={"image_url": image})
    r = client.post("/v1/caption", json={"image_url": file_data_url(IMG1), "settings": GREEDY})
    assert r.status_code == 200
    health = client.get("/health").json()
    assert health["ready"] is True


def test_png_header_helper_declares_the_size() -> None:
    with Image.open(io.BytesIO(png_header(123, 45))) as img:
        assert img.size == (123, 45)
