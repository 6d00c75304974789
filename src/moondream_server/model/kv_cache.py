"""Per-sequence key/value cache, optionally held in a slot of a shared pool.

Every sequence owns its cache, so a batch may mix sequences at different positions, and a
sequence can join or leave a batch between any two steps. A private cache grows on demand
instead of reserving the whole context for every request. A pooled cache (``KVPool``) reserves
the whole context in one slot of a buffer shared by all slots, so the decode steps of many
sequences can attend in a single call (``text.py``); it costs memory, so the engine uses it on
GPUs, where per-call overhead, not arithmetic, bounds batched decoding.
"""

from __future__ import annotations

import weakref

import torch

_GROWTH_STEP = 256


class KVPool:
    """``n_slots`` full-context caches in one buffer, seen as [layers, slots, heads, context, head_dim].

    ``k[layer]`` is every slot's keys of one layer as one strided tensor (no copy). The memory
    is laid out [layers, slots, context, heads, head_dim] (``k_packed``): one layer's keys are
    then rows of ``heads x head_dim`` in slot-major order, which a varlen attention kernel can
    read in place, each sequence from its slot's first row (``cuda_graphs.py``).
    """

    def __init__(
        self,
        n_slots: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_context: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if n_slots < 1:
            raise ValueError("a KV pool needs at least one slot")
        shape = (n_layers, n_slots, max_context, n_kv_heads, head_dim)
        self.max_context = max_context
        self.k_packed = torch.zeros(shape, device=device, dtype=dtype)
        self.v_packed = torch.zeros(shape, device=device, dtype=dtype)
        self.k = self.k_packed.transpose(2, 3)  # [layers, slots, heads, context, head_dim] views
        self.v = self.v_packed.transpose(2, 3)
        self._free = list(range(n_slots - 1, -1, -1))

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_context: int,
        *,
        capacity: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pool: KVPool | None = None,
    ) -> None:
        """A private cache, or a pooled one when ``pool`` has a free slot (else private)."""
        self.max_context = max_context
        self.length = 0
        slot = pool.acquire() if pool is not None and pool.max_context == max_context else None
        self.pool = pool if slot is not None else None
        self.slot = -1
        if pool is not None and slot is not None:
            self.slot = slot
            self.k = pool.k[:, slot]  # views [layers, heads, context, head_dim]
            self.v = pool.v[:, slot]
            # The slot goes back when the last reference to this cache goes.
            weakref.finalize(self, pool.release, slot)
            return
        capacity = min(max(capacity, 1), max_context)
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes this cache holds (a pooled one: its slot)."""
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, length: int) -> None:
        """Make room for positions [0, length)."""
        if length > self.max_context:
            raise ValueError(
                f"sequence of {length} positions exceeds the model context of {self.max_context}"
            )
        if length <= self.capacity:
            return
        new_cap = min(self.max_context, max(length, self.capacity * 2, self.capacity + _GROWTH_STEP))
        n_layers, heads, _, head_dim = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(n_layers, heads, new_cap, head_dim)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def prefix(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first `length` positions, e.g. an encoded image to reuse."""
        return self.k[:, :, :length].clone(), self.v[:, :, :length].clone()

    @classmethod
    def from_prefix(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        max_context: int,
        extra_capacity: int = 0,
        pool: KVPool | None = None,
    ) -> KVCache:
        n_layers, heads, length, head_dim = k.shape
        cache = cls(
            n_layers,
            heads,
            head_dim,
            max_context,
            capacity=length + extra_capacity,
            device=k.device,
            dtype=k.dtype,
            pool=pool,
        )
        cache.k[:, :, :length] = k
        cache.v[:, :, :length] = v
        cache.length = length
        return cache
