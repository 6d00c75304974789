"""Encoded-image cache: the image prefix's keys/values, keyed by image content and model.

A second request about an image the server has already seen skips the vision encoder and the
730-position image prefill. Keys are the model's (``ModelRuntime.image_key``: for Moondream2
the model id/revision plus a hash of the RGB pixels and the size). Entries are evicted
least-recently-used under a byte budget.

Only the scheduler thread touches the cache in the engine; a lock makes the statistics safe to
read from elsewhere.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    insertions: int = 0
    evictions: int = 0
    rejected: int = 0  # entries larger than the whole budget
    entries: int = 0
    bytes: int = 0


class ImageCache(Generic[V]):
    """LRU map under a byte budget; ``size_of(value)`` gives each value's bytes."""

    def __init__(self, budget_bytes: int, size_of: Callable[[V], int]) -> None:
        if budget_bytes < 0:
            raise ValueError("the cache budget must be >= 0")
        self.budget_bytes = budget_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = CacheStats()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._stats.misses += 1
                return None
            self._items.move_to_end(key)
            self._stats.hits += 1
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, key: Hashable, value: V) -> bool:
        """Insert (or refresh) an entry, evicting the least recently used ones to make room.

        Returns False (and stores nothing) when the value alone is larger than the budget.
        """
        size = self._size_of(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget_bytes:
                self._stats.rejected += 1
                return False
            while self._items and self._bytes + size > self.budget_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self._stats.evictions += 1
            self._items[key] = (value, size)
            self._bytes += size
            self._stats.insertions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> CacheStats:
        with self._lock:
            s = self._stats
            return CacheStats(
                hits=s.hits,
                misses=s.misses,
                insertions=s.insertions,
                evictions=s.evictions,
                rejected=s.rejected,
                entries=len(self._items),
                bytes=self._bytes,
            )
