"""Text decoder: Phi-style parallel blocks with partial NeoX rotary embeddings.

``forward`` takes a *packed* batch: the tokens of several sequences concatenated along one
axis, each sequence with its own cache and start position. Linear layers run once over all
tokens; attention runs per sequence over that sequence's cache, except that the one-token decode
steps of sequences cached in one ``KVPool`` attend together in a single call. This serves the
reference's one-request-at-a-time loops and the batching engine with the same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moondream_server.model.config import TextConfig
from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.layers import MLP

ROTARY_DIM = 32  # the reference rotates the first 32 channels of every 64-channel head
ROPE_THETA = 10000.0

# On a GPU, PyTorch may pick cuDNN attention for bf16; it builds a plan per new key length, and
# every decode step has a new length: measured 2.4 ms of CPU per call on an H100, which made bf16
# decoding 2x slower than fp32. Flash / memory-efficient kernels need no plan.
_GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class SeqSlice:
    """One sequence's part of a packed forward pass."""

    cache: KVCache
    length: int  # tokens fed this step, written at positions cache.length ...
    prefix: int = 0  # positions < prefix attend to each other bidirectionally (the image prefix)


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim)
        self.proj = nn.Linear(config.dim, config.dim)


class TextBlock(nn.Module):
    ln: nn.LayerNorm
    attn: TextAttention
    mlp: MLP

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(config.dim)
        self.attn = TextAttention(config)
        self.mlp = MLP(config.dim, config.ff_dim)


class TextModel(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Parameter(torch.zeros(config.vocab_size, config.dim))
        self.blocks = nn.ModuleList(TextBlock(config) for _ in range(config.n_layers))
        self.post_ln = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.init_rope(None)

    def init_rope(self, device: torch.device | None) -> None:
        """(Re)build the float32 rotary tables, e.g. after loading weights onto a meta-built model."""
        if (torch.get_default_device() if device is None else torch.device(device)).type == "meta":
            # Only shapes exist on meta; computing there runs PyTorch's Python reference ops,
            # whose first use imports torch._dynamo: ~1 s of every load.
            shape = (self.config.max_context, ROTARY_DIM // 2)
            self.register_buffer("rope_cos", torch.empty(shape, device="meta"), persistent=False)
            self.register_buffer("rope_sin", torch.empty(shape, device="meta"), persistent=False)
            return
        rot = torch.arange(0, ROTARY_DIM, 2, device=device)[: ROTARY_DIM // 2].float()
        inv_freq = 1.0 / (ROPE_THETA ** (rot / ROTARY_DIM))
        t = torch.arange(self.config.max_context, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def new_cache(self, capacity: int = 0, pool: KVPool | None = None) -> KVCache:
        """A sequence cache: a slot of ``pool`` if one is free, else a private, growable one."""
        c = self.config
        return KVCache(
            c.n_layers,
            c.n_kv_heads,
            c.head_dim,
            c.max_context,
            capacity=capacity,
            device=self.wte.device,
            dtype=self.wte.dtype,
            pool=pool,
        )

    def new_pool(self, n_slots: int) -> KVPool:
        """Full-context caches for ``n_slots`` sequences that decode together (see ``KVPool``)."""
        c = self.config
        return KVPool(
            n_slots,
            c.n_layers,
            c.n_kv_heads,
            c.head_dim,
            c.max_context,
            device=self.wte.device,
            dtype=self.wte.dtype,
        )

    def embed(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.wte.device)
        return F.embedding(ids, self.wte)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on raw hidden states [..., dim] -> [..., vocab]."""
        return self.lm_head(self.post_ln(hidden))  # type: ignore[no-any-return]

    def forward(
        self, x: torch.Tensor, seqs: Sequence[SeqSlice], rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Packed embeddings [T, dim] -> raw last-block hidden states [T, dim], or [len(rows), dim]
        for just those rows of the packed input.

        Writes each sequence's keys/values at its positions and advances its cache length. With
        ``rows``, the last block's output projection and MLP run on those rows alone: the other
        rows' keys and values are all a later step reads (an image prefill needs no row at all,
        which saves ~3 % of its work).
        """
        if sum(s.length for s in seqs) != x.shape[0]:
            raise ValueError("packed input length does not match the sequence slices")
        for s in seqs:
            s.cache.reserve(s.cache.length + s.length)
        positions = torch.cat(
            [torch.arange(s.cache.length, s.cache.length + s.length, device=x.device) for s in seqs]
        )
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [T, 16] float32
        masks = [_attention_mask(s, x.device) for s in seqs]
        pooled = _PooledDecode.build(seqs, masks, self.config.n_heads, x)
        last = len(self.blocks) - 1
        keep = None if rows is None else torch.tensor(list(rows), dtype=torch.long, device=x.device)
        with sdpa_kernel(_GPU_ATTENTION) if x.is_cuda else contextlib.nullcontext():
            for layer, block in enumerate(self.blocks):
                assert isinstance(block, TextBlock)
                h = block.ln(x)
                only = keep if layer == last else None
                attn = self._attention(block.attn, h, layer, seqs, masks, cos, sin, pooled, only)
                if only is not None:
                    x, h = x[only], h[only]
                    if not len(only):
                        break
                x = x + attn + block.mlp(h)
        for s in seqs:
            s.cache.length += s.length
        return x

    def _attention(
        self,
        attn: TextAttention,
        h: torch.Tensor,
        layer: int,
        seqs: Sequence[SeqSlice],
        masks: Sequence[torch.Tensor | None],
        cos: torch.Tensor,
        sin: torch.Tensor,
        pooled: _PooledDecode | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention sublayer's output for every row of ``h``, or for ``rows`` only (the keys
        and values of every row are written either way); empty for no rows."""
        t = h.shape[0]
        hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
        q, k, v = attn.qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = _rotate(q.view(t, nh, hd), cos, sin)
        k = _rotate(k.view(t, nkv, hd), cos, sin)
        v = v.view(t, nkv, hd)
        out = torch.empty(t, nh, hd, dtype=h.dtype, device=h.device)
        if pooled is not None:
            pooled.attend(layer, q, k, v, out)
        offset = 0
        for i, (s, mask) in enumerate(zip(seqs, masks, strict=True)):
            if pooled is not None and i in pooled.members:
                offset += s.length
                continue
            start, end = s.cache.length, s.cache.length + s.length
            keys, values = s.cache.k[layer], s.cache.v[layer]
            keys[:, start:end] = k[offset : offset + s.length].transpose(0, 1)
            values[:, start:end] = v[offset : offset + s.length].transpose(0, 1)
            if s.length == 1 and mask is None and nh == nkv and not h.is_cuda:
                out[offset] = _one_query_attention(q[offset], keys, values, end)
                offset += 1
                continue
            # 4-D (batch of one): CPU SDPA only takes its fused (flash) kernel for 4-D inputs;
            # 3-D ones fall back to the unfused math path (~20 % of a decode step on a CPU).
            o = F.scaled_dot_product_attention(
                q[None, offset : offset + s.length].transpose(1, 2),
                keys[None, :, :end],
                values[None, :, :end],
                attn_mask=mask,
                enable_gqa=nh != nkv,
            )
            out[offset : offset + s.length] = o[0].transpose(0, 1)
            offset += s.length
        flat = out.view(t, nh * hd)
        if rows is not None:
            if not len(rows):
                return flat[:0]
            flat = flat[rows]
        return attn.proj(flat)  # type: ignore[no-any-return]


class _PooledDecode:
    """One attention call for the one-token decode steps of sequences cached in the same pool.

    Attention runs over every slot of the pool (``pool.k[layer]`` is one strided tensor, so
    nothing is gathered or copied), each slot masked to its own length; rows of idle slots are
    computed and ignored. That turns 2-3 small calls per sequence and layer into a few per layer.
    """

    # Below this many decoding sequences the per-sequence path is as cheap.
    MIN_SEQUENCES = 2

    def __init__(
        self, pool: KVPool, members: dict[int, int], seqs: Sequence[SeqSlice], n_heads: int, x: torch.Tensor
    ) -> None:
        self.pool = pool
        self.members = members  # index in seqs -> row in the packed input
        chosen = [seqs[i] for i in members]
        dev = x.device
        self.rows = torch.tensor(list(members.values()), dtype=torch.long, device=dev)
        self.slots = torch.tensor([s.cache.slot for s in chosen], dtype=torch.long, device=dev)
        positions = [s.cache.length for s in chosen]
        self.pos = torch.tensor(positions, dtype=torch.long, device=dev)
        # Keys up to the longest member, rounded up so the fused kernels' alignment holds.
        self.span = min(pool.max_context, -(-(max(positions) + 1) // 16) * 16)
        lengths = torch.ones(pool.n_slots, dtype=torch.long, device=dev)  # idle slots see position 0
        lengths[self.slots] = self.pos + 1
        cols = torch.arange(self.span, device=dev)
        self.mask = (cols[None, :] < lengths[:, None])[:, None, None, :]  # [slots, 1, 1, span]
        self.q = torch.zeros(pool.n_slots, n_heads, 1, x.shape[-1] // n_heads, dtype=x.dtype, device=dev)

    @classmethod
    def build(
        cls, seqs: Sequence[SeqSlice], masks: Sequence[torch.Tensor | None], n_heads: int, x: torch.Tensor
    ) -> _PooledDecode | None:
        pool: KVPool | None = None
        members: dict[int, int] = {}
        offset = 0
        for i, (s, mask) in enumerate(zip(seqs, masks, strict=True)):
            if s.length == 1 and mask is None and s.cache.pool is not None:
                if pool is None:
                    pool = s.cache.pool
                if s.cache.pool is pool:
                    members[i] = offset
            offset += s.length
        if pool is None or len(members) < cls.MIN_SEQUENCES:
            return None
        return cls(pool, members, seqs, n_heads, x)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor
    ) -> None:
        keys, values = self.pool.k[layer], self.pool.v[layer]  # [slots, heads, context, head_dim]
        keys[self.slots, :, self.pos] = k[self.rows]
        values[self.slots, :, self.pos] = v[self.rows]
        self.q[self.slots, :, 0] = q[self.rows]
        o = F.scaled_dot_product_attention(
            self.q,
            keys[:, :, : self.span],
            values[:, :, : self.span],
            attn_mask=self.mask,
            enable_gqa=self.q.shape[1] != keys.shape[1],
        )
        out[self.rows] = o[self.slots, :, 0]


def _one_query_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int
) -> torch.Tensor:
    """A decode step's attention on the CPU: q [heads, head_dim] over the first `length`
    positions of one layer's cache, keys/values [heads, capacity, head_dim].

    Two batched matrix-vector products with the keys as the left operand (K @ q, read in place
    row by row) and a float32 softmax between them: 3-4x faster than the fused SDPA kernel for a
    single query (~1.9 against ~0.5 ms per layer at 750 keys on a Zen 4), which splits one row
    into blocks built for many. The scores are rounded once to the compute dtype before the
    float32 softmax (SDPA keeps them in float32), a difference within the dtype's own noise.

    The products take whole contiguous batches only: a slice of the cache is copied first, two
    3 MB copies per layer at 750 positions, 0.15-0.8 ms each (the slow end when the copy lands
    in freshly mapped memory: ~30 ms of an int8 decode step measured). While at least three
    quarters of the cache is in use they read all of it instead: the unused positions' scores
    are dropped and their weights are zero, so the result is the same.
    """
    whole = keys.is_contiguous() and values.is_contiguous() and 4 * length >= 3 * keys.shape[1]
    if not whole:
        keys, values = keys[:, :length], values[:, :length]
    scores = torch.bmm(keys, q[:, :, None]).squeeze(-1)[:, :length].float().mul_(q.shape[-1] ** -0.5)
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    if weights.shape[1] < values.shape[1]:
        weights = F.pad(weights, (0, values.shape[1] - weights.shape[1]))
    return torch.bmm(weights[:, None], values).squeeze(1)


def _attention_mask(s: SeqSlice, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [length, start+length] (True = may attend): causal, bidirectional in the prefix."""
    start = s.cache.length
    end = start + s.length
    if s.length == 1 and not (start < s.prefix):
        return None  # one new token sees everything before it
    if end <= s.prefix:
        # Wholly inside the bidirectional prefix (the image): every position sees every other.
        # No mask at all, because the CPU's fused kernel adds even an all-true mask to every block.
        return None
    rows = torch.arange(start, end, device=device)[:, None]
    cols = torch.arange(end, device=device)[None, :]
    mask = cols <= rows
    if s.prefix:
        mask |= (rows < s.prefix) & (cols < s.prefix)
    return mask


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial NeoX rotary: channel i pairs with i + 16 within the first 32 of each head.

    Computed in float32 and cast back once, as the reference does.
    """
    half = ROTARY_DIM // 2
    a = x[..., :half].float()
    b = x[..., half:ROTARY_DIM].float()
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat([a * c - b * s, a * s + b * c], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., ROTARY_DIM:]], dim=-1)
