"""Sequence caches: private growable ones and slots of a shared pool."""

from __future__ import annotations

import gc

import pytest
import torch

from moondream_server.model.kv_cache import KVCache, KVPool


def test_pooled_caches_hold_slots_until_they_go() -> None:
    pool = KVPool(2, n_layers=2, n_kv_heads=1, head_dim=4, max_context=16)
    a = KVCache(2, 1, 4, 16, pool=pool)
    b = KVCache(2, 1, 4, 16, pool=pool)
    assert (a.pool, b.pool) == (pool, pool) and {a.slot, b.slot} == {0, 1}
    assert pool.free_slots == 0
    c = KVCache(2, 1, 4, 16, capacity=3, pool=pool)  # the pool is full: a private cache instead
    assert c.pool is None and c.capacity == 3
    del a
    gc.collect()
    assert pool.free_slots == 1
    d = KVCache(2, 1, 4, 16, pool=pool)
    assert d.pool is pool


def test_a_pooled_cache_is_a_view_of_its_slot() -> None:
    pool = KVPool(3, n_layers=2, n_kv_heads=1, head_dim=4, max_context=16)
    cache = KVCache(2, 1, 4, 16, pool=pool)
    assert cache.capacity == 16  # the whole context: it never grows
    cache.k[1, 0, 5] = 7.0
    assert torch.equal(pool.k[1, cache.slot, 0, 5], torch.full((4,), 7.0))
    cache.reserve(16)
    with pytest.raises(ValueError, match="context"):
        cache.reserve(17)


def test_from_prefix_copies_into_a_slot() -> None:
    pool = KVPool(1, n_layers=2, n_kv_heads=1, head_dim=4, max_context=16)
    k = torch.randn(2, 1, 5, 4)
    v = torch.randn(2, 1, 5, 4)
    cache = KVCache.from_prefix(k, v, 16, pool=pool)
    assert cache.pool is pool and cache.length == 5
    assert torch.equal(pool.k[:, 0, :, :5], k) and torch.equal(pool.v[:, 0, :, :5], v)
    k2, _ = cache.prefix(5)
    k2 += 1  # a snapshot is a copy, not a view of the slot
    assert torch.equal(pool.k[:, 0, :, :5], k)


def test_a_pool_for_another_context_is_not_used() -> None:
    pool = KVPool(1, n_layers=1, n_kv_heads=1, head_dim=4, max_context=8)
    cache = KVCache(1, 1, 4, 16, pool=pool)
    assert cache.pool is None and pool.free_slots == 1
