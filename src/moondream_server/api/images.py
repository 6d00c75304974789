"""Turn what a client uploaded (data URL, bare base64 or raw bytes) into an RGB PIL image.

Two stages, so that a caller can decide between them whether the decode may happen (see
``api/decoder.py``): :func:`probe_image_bytes` reads only the header and checks the format, the
pixel count and the longest side; :func:`decode_probed` then decodes the pixels.

Every failure is an :class:`ImageError` with the HTTP status it deserves: 400 for input that is
not a (complete) image, 413 for images over the pixel cap or the side cap. Both caps are checked
from the header, before any pixel is decoded, so a decompression bomb costs nothing, and the side
cap bounds the per-row cost of a degenerate image (a 1×49,000,000 PNG is 49 M rows).
"""

from __future__ import annotations

import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a client may send. PIL can open more, but these are the ones we promise and test.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

_PILLOW_BLOCK_BYTES = 64 * 1024 * 1024
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?),", re.IGNORECASE)
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def configure_pillow(max_pixels: int) -> None:
    """Keep Pillow's own decompression-bomb guard above our cap; large blocks for image memory.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that, inside
    ``Image.open``. With the guard at or above our cap, an image Pillow objects to is always one
    we refuse too, and both paths (the warning, if warnings are errors, and the error) end as 413.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    # Pillow allocates image memory in blocks of 16 MiB by default; glibc serves blocks that size
    # from its heap once a first one was freed (its mmap threshold adapts upward, to 32 MiB at
    # most), and keeps them after the image is gone: every large decode left ~170 MiB of RSS
    # behind. Blocks above 32 MiB are always mapped on their own and returned on free.
    Image.core.set_block_size(_PILLOW_BLOCK_BYTES)  # type: ignore[attr-defined]


class ImageError(Exception):
    """A client-side image problem. ``status`` is 400 or 413; ``param`` names the field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


# Longest accepted side by default: far above any camera or scan the model can use (it resizes to
# at most 12 crops of 378 px), far below the rows that make a narrow image slow to decode.
DEFAULT_MAX_SIDE = 16_384


@dataclass(frozen=True)
class ProbedImage:
    """An opened image whose header passed the checks; no pixel is decoded yet."""

    image: Image.Image
    param: str
    max_pixels: int

    @property
    def pixels(self) -> int:
        return self.image.width * self.image.height


def decode_image_string(
    value: str, *, max_pixels: int, max_side: int = DEFAULT_MAX_SIDE, param: str = "image_url"
) -> Image.Image:
    """Decode ``data:<mime>;base64,<data>`` or bare base64 into an RGB image."""
    return decode_probed(probe_image_string(value, max_pixels=max_pixels, max_side=max_side, param=param))


def probe_image_string(
    value: str, *, max_pixels: int, max_side: int = DEFAULT_MAX_SIDE, param: str = "image_url"
) -> ProbedImage:
    """Base64-decode ``data:<mime>;base64,<data>`` or bare base64 and check the image's header."""
    text = value.strip()
    match = _DATA_URL.match(text)
    if match is not None:
        if ";base64" not in match.group("params").lower():
            raise ImageError("only base64 data URLs are supported (data:<mime>;base64,...)", param=param)
        mime = match.group("mime").lower()
        if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
            shown = mime if len(mime) <= 64 else mime[:64] + "…"  # never echo a megabyte back
            raise ImageError(f"the data URL's media type must be an image, not {shown!r}", param=param)
        text = text[match.end() :]
    elif text.lower().startswith(("http://", "https://")):
        raise ImageError("image URLs are not fetched; send the image as a base64 data URL", param=param)
    data = _b64decode(text, param=param)
    return probe_image_bytes(data, max_pixels=max_pixels, max_side=max_side, param=param)


def _b64decode(text: str, *, param: str) -> bytes:
    # Whole-buffer C calls only (no regex over the data): a 20 MB image string is decoded in a few
    # tens of ms, holding the GIL (and so the event loop) no longer than that.
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ImageError("the image is not valid base64", param=param) from None
    # Accept the URL-safe alphabet, whitespace and missing padding too; reject anything else.
    compact = raw.translate(_URL_SAFE_TO_STANDARD, b" \t\r\n\f\v")
    if not compact:
        raise ImageError("the image is empty", param=param)
    if len(compact) % 4:
        compact += b"=" * (-len(compact) % 4)
    try:
        return binascii.a2b_base64(compact, strict_mode=True)
    except binascii.Error:
        raise ImageError("the image is not valid base64", param=param) from None


def decode_image_bytes(
    data: bytes, *, max_pixels: int, max_side: int = DEFAULT_MAX_SIDE, param: str = "file"
) -> Image.Image:
    """Open, check the size, fully decode, apply EXIF orientation and convert to RGB."""
    return decode_probed(probe_image_bytes(data, max_pixels=max_pixels, max_side=max_side, param=param))


def probe_image_bytes(
    data: bytes, *, max_pixels: int, max_side: int = DEFAULT_MAX_SIDE, param: str = "file"
) -> ProbedImage:
    """Open the image and check its format, pixel count and longest side from the header."""
    if not data:
        raise ImageError("the image is empty", param=param)
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(_too_many_pixels_message(None, max_pixels), status=413, param=param) from None
    except UnidentifiedImageError:
        raise ImageError(
            "the data is not a recognised image (JPEG, PNG, WebP, GIF, BMP or TIFF)", param=param
        ) from None
    except Exception as exc:
        raise ImageError(f"the image could not be read: {exc}", param=param) from None

    if img.format not in ALLOWED_FORMATS:
        raise ImageError(
            f"unsupported image format {img.format}; use JPEG, PNG, WebP, GIF, BMP or TIFF", param=param
        )
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("the image has no pixels", param=param)
    if width * height > max_pixels:
        raise ImageError(_too_many_pixels_message((width, height), max_pixels), status=413, param=param)
    if max(width, height) > max_side:
        raise ImageError(
            f"the image is {width}×{height}; the longest side may be at most {max_side:,} pixels",
            status=413,
            param=param,
        )
    return ProbedImage(image=img, param=param, max_pixels=max_pixels)


def decode_probed(probed: ProbedImage) -> Image.Image:
    """Decode the first frame, apply EXIF orientation and convert to RGB."""
    img, param = probed.image, probed.param
    try:
        img.seek(0)  # GIF/TIFF/WebP animations: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")  # palette transparency: via RGBA, as Pillow asks
        rgb = img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        message = _too_many_pixels_message(None, probed.max_pixels)
        raise ImageError(message, status=413, param=param) from None
    except Exception as exc:
        raise ImageError(f"the image is truncated or corrupt: {exc}", param=param) from None
    if rgb.width * rgb.height != probed.pixels:  # a transpose swaps sides, never changes the count
        raise ImageError("the image's decoded size does not match its header", param=param)
    return rgb


def _too_many_pixels_message(size: tuple[int, int] | None, max_pixels: int) -> str:
    if size is None:
        return f"the image has too many pixels (the limit is {max_pixels:,})"
    w, h = size
    return f"the image is {w}×{h} = {w * h:,} pixels; the limit is {max_pixels:,}"
