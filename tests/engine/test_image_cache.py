"""The LRU byte-budget cache and its content keys."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moondream_server.engine.image_cache import ImageCache, image_content_key


def sized(n: int) -> bytes:
    return b"x" * n


def test_lru_eviction_under_a_byte_budget() -> None:
    cache: ImageCache[bytes] = ImageCache(250, len)
    assert cache.put("a", sized(100)) and cache.put("b", sized(100))
    assert cache.get("a") is not None  # a is now the most recently used
    assert cache.put("c", sized(100))  # 300 > 250: evicts b, the least recently used
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.nbytes == 200
    stats = cache.stats()
    assert (stats.hits, stats.evictions, stats.entries, stats.bytes) == (1, 1, 2, 200)


def test_too_large_entries_are_rejected_and_refreshing_replaces() -> None:
    cache: ImageCache[bytes] = ImageCache(150, len)
    assert not cache.put("big", sized(151))
    assert len(cache) == 0 and cache.stats().rejected == 1
    cache.put("k", sized(100))
    cache.put("k", sized(120))  # same key: replaces, no double counting
    assert cache.nbytes == 120 and len(cache) == 1
    assert cache.get("missing") is None and cache.stats().misses == 1


def test_zero_budget_stores_nothing() -> None:
    cache: ImageCache[bytes] = ImageCache(0, len)
    assert not cache.put("a", sized(1))
    assert cache.get("a") is None
    with pytest.raises(ValueError):
        ImageCache(-1, len)


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
