"""Image tiling: how an image becomes one global crop plus overlapping local crops.

Follows the reference's ``overlap_crop_image``: the image is resized to an exact multiple of the
crop window (plus a margin), cut into row-major 378x378 tiles that overlap by the margin, and a
stretched 378x378 resize of the whole image goes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

try:  # libvips is what the official model's users run; Pillow is the fallback.
    import pyvips

    HAS_VIPS = True
except (ImportError, OSError):  # OSError: the binding imports but libvips itself is missing
    pyvips = None
    HAS_VIPS = False

Resampler = Literal["vips", "pil"]


@dataclass(frozen=True)
class Crops:
    """uint8 crops [N, S, S, 3], index 0 the global view, then local tiles in row-major order."""

    pixels: NDArray[np.uint8]
    tiling: tuple[int, int]  # (rows, cols) of local tiles


def default_resampler() -> Resampler:
    return "vips" if HAS_VIPS else "pil"


def select_tiling(height: int, width: int, crop_size: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of local tiles for a usable area of height x width pixels."""
    if height <= crop_size or width <= crop_size:
        return (1, 1)
    min_h = math.ceil(height / crop_size)
    min_w = math.ceil(width / crop_size)
    if min_h * min_w > max_crops:
        ratio = math.sqrt(max_crops / (min_h * min_w))
        return (max(1, math.floor(min_h * ratio)), max(1, math.floor(min_w * ratio)))
    rows = max(math.floor(math.sqrt(max_crops * height / width)), min_h)
    cols = max(math.floor(math.sqrt(max_crops * width / height)), min_w)
    if rows * cols > max_crops:
        if cols > rows:
            cols = math.floor(max_crops / rows)
        else:
            rows = math.floor(max_crops / cols)
    return (max(1, rows), max(1, cols))


def resize(image: NDArray[np.uint8], height: int, width: int, resampler: Resampler) -> NDArray[np.uint8]:
    """Resize an H x W x 3 uint8 array (aspect ratio not kept), as the reference does."""
    src_h, src_w = image.shape[:2]
    if resampler == "vips":
        if pyvips is None:
            raise RuntimeError("the libvips resampler was asked for but pyvips cannot be imported")
        vimg = pyvips.Image.new_from_array(image)
        out = vimg.resize(width / src_w, vscale=height / src_h).numpy()
        return np.ascontiguousarray(out, dtype=np.uint8).reshape(out.shape[0], out.shape[1], -1)
    pil = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.uint8)


def overlap_crops(
    image: NDArray[np.uint8],
    *,
    crop_size: int = 378,
    patch_size: int = 14,
    overlap_margin: int = 4,
    max_crops: int = 12,
    resampler: Resampler | None = None,
) -> Crops:
    """Cut an RGB uint8 array into the global crop and the overlapping local crops."""
    resampler = resampler or default_resampler()
    src_h, src_w = image.shape[:2]
    margin = patch_size * overlap_margin
    window = (crop_size // patch_size - 2 * overlap_margin) * patch_size
    rows, cols = select_tiling(src_h - 2 * margin, src_w - 2 * margin, window, max_crops)

    crops = np.zeros((rows * cols + 1, crop_size, crop_size, 3), dtype=np.uint8)
    crops[0] = _fit(resize(image, crop_size, crop_size, resampler), crop_size, crop_size)

    target_h, target_w = rows * window + 2 * margin, cols * window + 2 * margin
    tiled = resize(image, target_h, target_w, resampler)
    out_h, out_w = tiled.shape[:2]  # libvips may round a size; clip rather than assume
    for i in range(rows):
        for j in range(cols):
            y0, x0 = i * window, j * window
            y1, x1 = min(y0 + crop_size, out_h), min(x0 + crop_size, out_w)
            crops[1 + i * cols + j, : y1 - y0, : x1 - x0] = tiled[y0:y1, x0:x1]
    return Crops(pixels=crops, tiling=(rows, cols))


def _fit(image: NDArray[np.uint8], height: int, width: int) -> NDArray[np.uint8]:
    """Pad or clip to exactly height x width (only matters if a resampler rounds sizes)."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    out = np.zeros((height, width, 3), dtype=np.uint8)
    h, w = min(height, image.shape[0]), min(width, image.shape[1])
    out[:h, :w] = image[:h, :w]
    return out
