"""The LRU byte-budget cache and its content keys."""

from __future__ import annotations

import pytest

from moondream_server.engine.image_cache import ImageCache


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
