"""The content key of an image: equal for images the model cannot tell apart, per model."""

from __future__ import annotations

import hashlib

from PIL import Image

ImageKey = tuple[str, str]


def image_content_key(image: Image.Image, model_key: str) -> ImageKey:
    """(model key, hash of the RGB pixel bytes and the size): what the model actually sees.

    Two files holding the same pixels share a key; a new model revision never reuses old keys.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return (model_key, digest.hexdigest())
