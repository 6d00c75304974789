"""Tiling selection and crop extraction (worked examples from the model spec, section 3.2)."""

from __future__ import annotations

import numpy as np
import pytest

from moondream_server.model.tiling import overlap_crops, select_tiling


@pytest.mark.parametrize(
    ("width", "height", "tiling", "resized_hw"),
    [
        (200, 300, (1, 1), (378, 378)),
        (378, 378, (1, 1), (378, 378)),
        (379, 379, (3, 3), (910, 910)),
        (640, 480, (2, 4), (644, 1176)),
        (600, 800, (4, 2), (1176, 644)),
        (1024, 1024, (3, 3), (910, 910)),
        (1920, 1080, (2, 4), (644, 1176)),
        (8000, 500, (1, 13), (378, 3570)),  # extreme aspect ratio: more tiles than max_crops
        (500, 8000, (13, 1), (3570, 378)),
    ],
)
def test_select_tiling_matches_spec(
    width: int, height: int, tiling: tuple[int, int], resized_hw: tuple[int, int]
) -> None:
    got = select_tiling(height - 112, width - 112, 266, 12)
    assert got == tiling
    assert (got[0] * 266 + 112, got[1] * 266 + 112) == resized_hw


@pytest.mark.parametrize(("width", "height"), [(1, 1), (3, 200), (113, 90), (50, 5000)])
def test_tiny_and_thin_images_give_one_tile_plus_global(width: int, height: int) -> None:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    for resampler in ("pil", "vips"):
        crops = overlap_crops(image, resampler=resampler)  # type: ignore[arg-type]
        expected_tiles = select_tiling(height - 112, width - 112, 266, 12)
        assert crops.tiling == expected_tiles
        assert crops.pixels.shape == (expected_tiles[0] * expected_tiles[1] + 1, 378, 378, 3)


def test_local_tiles_overlap_by_the_margin() -> None:
    """Adjacent tiles share 112 px: the right margin of tile (0,0) is the left of tile (0,1)."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (644, 1176, 3), dtype=np.uint8)  # already the target size: no resampling
    crops = overlap_crops(image, resampler="pil")
    assert crops.tiling == (2, 4)
    np.testing.assert_array_equal(crops.pixels[1], image[0:378, 0:378])
    np.testing.assert_array_equal(crops.pixels[2], image[0:378, 266:644])
    np.testing.assert_array_equal(crops.pixels[5], image[266:644, 0:378])
    np.testing.assert_array_equal(crops.pixels[1][:, 266:], crops.pixels[2][:, :112])


def test_single_tile_equals_global_crop() -> None:
    image = np.random.default_rng(2).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    crops = overlap_crops(image, resampler="pil")
    np.testing.assert_array_equal(crops.pixels[0], crops.pixels[1])
