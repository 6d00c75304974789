"""Image content keys: equal pixels (as the model sees them) and model, equal key."""

from __future__ import annotations

import numpy as np
from PIL import Image

from moondream_server.model.image_key import image_content_key


def test_content_key_follows_pixels_size_and_model() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a = Image.fromarray(pixels)
    same_pixels_rgba = Image.fromarray(np.dstack([pixels, np.full((20, 30), 255, np.uint8)]))
    changed = pixels.copy()
    changed[5, 5, 0] ^= 1
    b = Image.fromarray(changed)
    reshaped = Image.fromarray(pixels.reshape(30, 20, 3))  # same bytes, other size
    key = image_content_key(a, "m@1")
    assert key == image_content_key(a.copy(), "m@1")
    assert key == image_content_key(same_pixels_rgba, "m@1")  # the model sees RGB only
    assert key != image_content_key(b, "m@1")
    assert key != image_content_key(reshaped, "m@1")
    assert key != image_content_key(a, "m@2")
