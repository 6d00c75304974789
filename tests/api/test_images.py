"""Image decoding: formats, EXIF orientation, first GIF frame, modes, data-URL forms and limits."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image, ImageChops

from moondream_server.api.images import ImageError, decode_image_bytes, decode_image_string
from tests.api.support import data_url, encode

CAP = 1_000_000


def gradient(w: int = 48, h: int = 32) -> Image.Image:
    img = Image.new("RGB", (w, h))
    img.putdata([(x * 255 // w, y * 255 // h, (x + y) % 256) for y in range(h) for x in range(w)])
    return img


def max_diff(a: Image.Image, b: Image.Image) -> int:
    extrema: Any = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getextrema()
    return max(int(hi) for _, hi in extrema)


@pytest.mark.parametrize(
    ("fmt", "tolerance"), [("PNG", 0), ("BMP", 0), ("TIFF", 0), ("WEBP", 0), ("JPEG", 40), ("GIF", 80)]
)
def test_formats_decode_to_rgb(fmt: str, tolerance: int) -> None:
    src = gradient()
    save = {"lossless": True} if fmt == "WEBP" else {}
    img = decode_image_bytes(encode(src, fmt, **save), max_pixels=CAP)
    assert img.mode == "RGB"
    assert img.size == src.size
    assert max_diff(img, src) <= tolerance


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    src = gradient().convert(mode) if mode != "I;16" else gradient().convert("L").convert("I;16")
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    img = decode_image_bytes(encode(src, fmt), max_pixels=CAP)
    assert img.mode == "RGB" and img.size == src.size


def test_palette_with_transparency_becomes_rgb() -> None:
    src = gradient().convert("P")
    buf = io.BytesIO()
    src.save(buf, format="PNG", transparency=0)
    img = decode_image_bytes(buf.getvalue(), max_pixels=CAP)
    assert img.mode == "RGB"


def test_rgba_alpha_is_dropped_like_the_client_does() -> None:
    src = gradient().convert("RGBA")
    src.putalpha(0)
    img = decode_image_bytes(encode(src), max_pixels=CAP)
    assert max_diff(img, src.convert("RGB")) == 0


@pytest.mark.parametrize(
    ("orientation", "size"), [(1, (48, 32)), (3, (48, 32)), (6, (32, 48)), (8, (32, 48))]
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]) -> None:
    src = gradient()
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode_image_bytes(encode(src, "JPEG", quality=95, exif=exif), max_pixels=CAP)
    assert img.size == size
    expected = {1: src, 3: src.rotate(180), 6: src.rotate(-90, expand=True), 8: src.rotate(90, expand=True)}
    assert max_diff(img, expected[orientation]) <= 40


def test_gif_first_frame() -> None:
    red = Image.new("RGB", (20, 20), (255, 0, 0))
    blue = Image.new("RGB", (20, 20), (0, 0, 255))
    buf = io.BytesIO()
    red.save(buf, format="GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    img = decode_image_bytes(buf.getvalue(), max_pixels=CAP)
    assert img.getpixel((10, 10)) == (255, 0, 0)


def test_unsupported_format_is_400() -> None:
    with pytest.raises(ImageError) as caught:
        decode_image_bytes(encode(gradient(), "PPM"), max_pixels=CAP)
    assert caught.value.status == 400
    assert "PPM" in caught.value.message


@pytest.mark.parametrize(
    "value",
    ["", "   ", "data:image/png;base64,", "data:image/png,rawnotbase64", "@@@", "data:text/html;base64,aGk="],
)
def test_bad_strings_are_400(value: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image_string(value, max_pixels=CAP)
    assert caught.value.status == 400
    assert caught.value.param == "image_url"


def test_data_url_variants() -> None:
    raw = encode(gradient())
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    for value in (
        data_url(raw),
        "DATA:IMAGE/PNG;BASE64," + b64,
        "data:image/png;charset=binary;base64," + b64,
        "data:;base64," + b64,
        b64,
        b64.rstrip("="),
        wrapped,
        base64.urlsafe_b64encode(raw).decode(),
    ):
        assert decode_image_string(value, max_pixels=CAP).size == (48, 32), value[:40]


def test_pixel_cap() -> None:
    raw = encode(gradient(100, 100))
    assert decode_image_bytes(raw, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError) as caught:
        decode_image_bytes(raw, max_pixels=9_999)
    assert caught.value.status == 413
    assert "10,000" in caught.value.message


def test_truncated_is_400() -> None:
    raw = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageError) as caught:
        decode_image_bytes(raw[: len(raw) // 2], max_pixels=CAP)
    assert caught.value.status == 400
    assert "truncated" in caught.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"])
def test_damaged_files_are_400_never_another_error(fmt: str) -> None:
    """Cut and corrupt real files in many places: every failure is an ImageError with status 400."""
    import random

    rng = random.Random(fmt)
    good = encode(Image.effect_noise((40, 30), 80).convert("RGB"), fmt)
    outcomes = {"ok": 0, "400": 0}
    for i in range(60):
        data = bytearray(good)
        if i % 2:
            data = data[: rng.randrange(1, len(data))]
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            img = decode_image_bytes(bytes(data), max_pixels=CAP)
        except ImageError as exc:
            assert exc.status in (400, 413), exc.message
            outcomes["400"] += 1
        else:
            assert img.mode == "RGB"
            outcomes["ok"] += 1
    assert outcomes["400"] > 0


def test_random_bytes_are_400() -> None:
    import random

    rng = random.Random(0)
    for n in (1, 2, 8, 100, 5000):
        with pytest.raises(ImageError) as caught:
            decode_image_bytes(rng.randbytes(n), max_pixels=CAP)
        assert caught.value.status == 400
