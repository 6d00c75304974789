"""Per-sequence key/value cache.

Every sequence owns its cache, so a batch may mix sequences at different positions, and a
sequence can join or leave a batch between any two steps. Capacity grows on demand instead of
reserving the whole context for every request.
"""

from __future__ import annotations

import torch

_GROWTH_STEP = 256


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
    ) -> None:
        self.max_context = max_context
        self.length = 0
        capacity = min(max(capacity, 1), max_context)
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
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
        cls, k: torch.Tensor, v: torch.Tensor, max_context: int, extra_capacity: int = 0
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
        )
        cache.k[:, :, :length] = k
        cache.v[:, :, :length] = v
        cache.length = length
        return cache
