"""Decode steps of pooled sequences as static-shape calls, replayed from CUDA graphs on a GPU.

An eager decode step launches ~650 small kernels from Python (~20 ms of CPU on an H100) for
~5 ms of GPU work. Here the step of ``b`` sequences whose caches live in one ``KVPool`` is one
function of static buffers (inputs, slot and position indices, outputs) with the pool as the
static cache, so it can be captured once per shape and replayed with a single launch.

Shapes are bucketed: the batch is padded up to a power of two (padding rows write into a scratch
slot of the pool that no sequence owns), and attention reads the first ``span`` positions of
each member's slot, ``span`` rounded up to ``SPAN_STEP`` and masked per row. One graph per
(batch bucket, span) is captured on first use (``warm`` captures some ahead); all share one
memory pool, which is safe because they replay one after another on one stream.

On a CPU (or with ``capture=False``) the same static function runs eagerly: that is how the
CPU tests check it against the regular forward pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.attention import sdpa_kernel

from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.text import _GPU_ATTENTION, ROTARY_DIM, TextAttention, TextBlock, TextModel

log = logging.getLogger(__name__)

SPAN_STEP = 128  # keys are read in multiples of this (also keeps the fused kernels' alignment)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch`` itself."""
    out: list[int] = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class DecodeGraphs:
    """One-token decode steps of sequences cached in ``pool``, optionally as CUDA graphs."""

    def __init__(
        self,
        text: TextModel,
        pool: KVPool,
        *,
        max_batch: int,
        capture: bool | None = None,
        flash: bool | None = None,
    ) -> None:
        """Takes one slot of ``pool`` as the padding rows' scratch slot (raises if none is free)."""
        scratch = pool.acquire()
        if scratch is None:
            raise ValueError("the KV pool has no free slot for the decode graphs' scratch rows")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.text = text
        self.pool = pool
        self.scratch = scratch
        self.buckets = batch_buckets(max_batch)
        dev, dtype = text.wte.device, text.wte.dtype
        self.capture = dev.type == "cuda" if capture is None else capture
        dim, vocab = text.config.dim, text.config.vocab_size
        n = self.buckets[-1]
        # Static buffers: every captured graph reads and writes these addresses.
        self._x = torch.zeros(n, dim, dtype=dtype, device=dev)
        self._index = torch.zeros(2, n, dtype=torch.long, device=dev)  # [slots; positions]
        self._hidden = torch.zeros(n, dim, dtype=dtype, device=dev)
        self._logits = torch.zeros(n, vocab, dtype=torch.float32, device=dev)
        self._graphs: dict[tuple[int, int], Any] = {}
        # Varlen flash attention over the pool in place (GPU, half precision), else masked SDPA.
        self.flash = flash_decode_works(dev, dtype) if flash is None else flash
        self._mempool: Any = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0  # counters, read by tests and logs
        self.eager_steps = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def accepts(self, cache: KVCache, length: int, prefix: int) -> bool:
        """True for a one-token step of a sequence of this pool, past its bidirectional prefix."""
        return (
            length == 1
            and cache.pool is self.pool
            and cache.length >= prefix
            and cache.length < self.pool.max_context
        )

    def span_for(self, positions: Iterable[int]) -> int:
        """Keys read per row, rounded up (the flash path reads each row's own count: one span)."""
        if self.flash:
            return self.pool.max_context
        need = max(positions) + 1
        return min(self.pool.max_context, -(-need // SPAN_STEP) * SPAN_STEP)

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"{n} sequences exceed the decode graphs' largest batch ({self.max_batch})")

    def step(self, x: torch.Tensor, caches: Sequence[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token for each cache: x [n, dim] -> (raw hidden [n, dim], float32 logits [n, vocab]).

        Writes each sequence's keys/values at its next position and advances its length. The
        outputs are copies (the static buffers are overwritten by the next step).
        """
        n = len(caches)
        if x.shape[0] != n:
            raise ValueError("one input row per cache is needed")
        positions = [c.length for c in caches]
        b, span = self.bucket_for(n), self.span_for(positions)
        if self.capture and (b, span) not in self._graphs:
            self._capture(b, span)
        slots = [c.slot for c in caches] + [self.scratch] * (b - n)
        index = torch.tensor([slots, positions + [0] * (b - n)], dtype=torch.long)
        self._index[:, :b].copy_(index, non_blocking=True)
        self._x[:n].copy_(x)
        graph = self._graphs.get((b, span))
        if graph is not None:
            graph.replay()
            self.replays += 1
        else:
            self._run(b, span)
            self.eager_steps += 1
        for c in caches:
            c.length += 1
        return self._hidden[:n].clone(), self._logits[:n].clone()

    def warm(self, batches: Iterable[int] | None = None, spans: Iterable[int] = ()) -> None:
        """Capture the graphs of these batch buckets and spans ahead of traffic (GPU only)."""
        if not self.capture:
            return
        # Largest first: later, smaller captures reuse the shared memory pool's blocks.
        for b in sorted(batches or self.buckets, reverse=True):
            for span in spans:
                key = (self.bucket_for(b), self.span_for([span - 1]))
                if key not in self._graphs:
                    self._capture(*key)

    # -- the static step -----------------------------------------------------------------------
    def _run(self, b: int, span: int) -> None:
        """The step of the first ``b`` rows of the static buffers, keys over ``span`` positions."""
        text = self.text
        x = self._x[:b]
        slots, pos = self._index[0, :b], self._index[1, :b]
        # cos | cos and sin | sin over the 32 rotated channels of every head: [b, 1, 32] float32
        cos = torch.cat([text.rope_cos[pos]] * 2, dim=-1)[:, None, :]
        sin = torch.cat([text.rope_sin[pos]] * 2, dim=-1)[:, None, :]
        attend = self._attention(b, span, slots, pos)
        with sdpa_kernel(_GPU_ATTENTION) if x.is_cuda else contextlib.nullcontext():
            for layer, block in enumerate(text.blocks):
                assert isinstance(block, TextBlock)
                h = block.ln(x)
                attn = block.attn
                q, k, v = _rotated_qkv(attn, h, cos, sin)
                o = attend(layer, q, k, v)  # [b, nh, hd]
                x = x + attn.proj(o.reshape(b, attn.n_heads * attn.head_dim)) + block.mlp(h)
        self._hidden[:b].copy_(x)
        self._logits[:b].copy_(text.logits(x).float())

    def _attention(
        self, b: int, span: int, slots: torch.Tensor, pos: torch.Tensor
    ) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """attend(layer, q [b, nh, hd], k [b, nkv, hd], v) -> [b, nh, hd]: writes k, v at
        (slot, position) of each row, then attends over that slot's positions up to it."""
        pool = self.pool
        if self.flash:
            # Varlen flash attention reads each row's keys in place: its slot's first row in the
            # packed layer, as many rows as its position + 1. Nothing is gathered or masked.
            ctx = pool.max_context
            cu_q = torch.arange(b + 1, dtype=torch.int32, device=slots.device)
            cu_k = F.pad((slots * ctx).to(torch.int32), (0, 1), value=pool.n_slots * ctx)
            used = (pos + 1).to(torch.int32)

            def flash(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                keys, values = pool.k_packed[layer], pool.v_packed[layer]  # [slots, ctx, heads, hd]
                keys[slots, pos] = k
                values[slots, pos] = v
                return _varlen_flash(q, keys, values, cu_q, cu_k, used)

            return flash
        cols = torch.arange(span, device=slots.device)
        whole = 2 * b >= pool.n_slots
        if whole:
            # Most slots take part: attend over every slot in place (rows of idle slots are
            # computed and dropped) rather than copying the members' keys out.
            lengths = torch.ones(pool.n_slots, dtype=torch.long, device=slots.device)
            lengths[slots] = pos + 1
            mask = (cols[None, :] < lengths[:, None])[:, None, None, :]  # [slots, 1, 1, span]
        else:
            mask = (cols[None, :] <= pos[:, None])[:, None, None, :]  # [b, 1, 1, span]

        def masked(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = pool.k[layer], pool.v[layer]  # [slots, heads, context, hd] views
            keys[slots, :, pos] = k
            values[slots, :, pos] = v
            nh, nkv = q.shape[1], k.shape[1]
            if whole:
                qs = q.new_zeros(pool.n_slots, nh, 1, q.shape[-1])
                qs[slots, :, 0] = q
                o = F.scaled_dot_product_attention(
                    qs, keys[:, :, :span], values[:, :, :span], attn_mask=mask, enable_gqa=nh != nkv
                )
                return o[slots, :, 0]
            o = F.scaled_dot_product_attention(
                q[:, :, None, :],
                keys[:, :, :span].index_select(0, slots),  # a copy of b x span positions
                values[:, :, :span].index_select(0, slots),
                attn_mask=mask,
                enable_gqa=nh != nkv,
            )
            return o[:, :, 0]

        return masked

    def _capture(self, b: int, span: int) -> None:
        # Capturing runs nothing, but the warm-up run before it does: point every row at the
        # scratch slot so that it writes nowhere a sequence owns.
        self._index[0, :b].fill_(self.scratch)
        self._index[1, :b].zero_()
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(b, span)  # warm-up: lazy initialisation must not happen during capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: HTTP threads may touch CUDA (e.g. free tensors) while the scheduler captures.
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            self._run(b, span)
        self._graphs[(b, span)] = graph


def _rotated_qkv(
    attn: TextAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys (rotated together, in place in the projection's output) and values of the
    rows `h`, as views [rows, heads, head_dim]."""
    hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    qkv = attn.qkv(h)
    qk = qkv[:, : (nh + nkv) * hd].view(h.shape[0], nh + nkv, hd)
    _rotate_in_place(qk, cos, sin)
    return qk[:, :nh], qk[:, nh:], qkv[:, (nh + nkv) * hd :].view(h.shape[0], nkv, hd)


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``text._rotate`` in fewer kernels, in place: x [b, heads, hd]; cos, sin [b, 1, 32] (each
    table twice). Channel i pairs with i + 16: (a, b) -> (a*c - b*s, b*c + a*s), in float32 and
    cast back once, the same products and sums as the reference's."""
    half = ROTARY_DIM // 2
    a = x[..., :ROTARY_DIM].float()
    swapped = torch.cat([-a[..., half:], a[..., :half]], dim=-1)
    x[..., :ROTARY_DIM] = a * cos + swapped * sin


def _varlen_flash(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    used: torch.Tensor,
) -> torch.Tensor:
    """One query row per sequence against its slot of [slots, ctx, heads, hd] keys, reading only
    the first `used` keys of each: the one call of the private op, shared by the decode step and
    the start-up check so that the check tests exactly what decoding runs."""
    ctx, heads, hd = keys.shape[-3:]
    out: torch.Tensor = torch.ops.aten._flash_attention_forward(
        q,
        keys.view(-1, heads, hd),
        values.view(-1, heads, hd),
        cu_q,
        cu_k,
        1,
        ctx,
        0.0,
        False,
        False,
        seqused_k=used,
    )[0]
    return out


def flash_decode_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether varlen flash attention with per-sequence key counts runs here and agrees with SDPA.

    A small check at start-up rather than a version test: the private op's signature and
    constraints differ between PyTorch releases; on any failure the masked path is used.
    """
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        slots, ctx, heads, hd = 3, 256, 4, 64
        keys = torch.randn(slots, ctx, heads, hd, generator=gen, device=device, dtype=dtype)
        values = torch.randn(slots, ctx, heads, hd, generator=gen, device=device, dtype=dtype)
        q = torch.randn(2, heads, hd, generator=gen, device=device, dtype=dtype)
        rows, used = [2, 0], [100, 7]  # slot and key count of each query
        cu_q = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
        cu_k = torch.tensor([rows[0] * ctx, rows[1] * ctx, slots * ctx], dtype=torch.int32, device=device)
        out = _varlen_flash(q, keys, values, cu_q, cu_k, torch.tensor(used, dtype=torch.int32, device=device))
        for i, (slot, n) in enumerate(zip(rows, used, strict=True)):
            want = F.scaled_dot_product_attention(
                q[i, :, None].float(),
                keys[slot, :n].transpose(0, 1).float(),
                values[slot, :n].transpose(0, 1).float(),
            )[:, 0]
            if not torch.allclose(out[i].float(), want, atol=2e-2, rtol=2e-2):
                log.warning("varlen flash attention disagrees with SDPA here; decode graphs use masked SDPA")
                return False
        return True
    except (RuntimeError, TypeError) as exc:
        log.warning("varlen flash attention unavailable (%s); decode graphs use masked SDPA", exc)
        return False


class PrefixGraph:
    """The image prefill (BOS + image tokens, bidirectional, positions 0..n-1) into a pool slot.

    Its shape never changes, so one graph serves every image: the prefix is the whole sequence,
    so attention needs no mask. On a CPU (or with ``capture=False``) it runs eagerly.
    """

    def __init__(self, text: TextModel, pool: KVPool, length: int, *, capture: bool | None = None) -> None:
        if length > pool.max_context:
            raise ValueError("the prefix does not fit in the context")
        self.text = text
        self.pool = pool
        self.length = length
        dev, dtype = text.wte.device, text.wte.dtype
        self.capture = dev.type == "cuda" if capture is None else capture
        self._x = torch.zeros(length, text.config.dim, dtype=dtype, device=dev)
        self._slot = torch.zeros(1, dtype=torch.long, device=dev)
        self._graph: Any = None
        self.replays = 0
        self.eager_runs = 0

    def accepts(self, cache: KVCache, length: int, prefix: int) -> bool:
        return (
            cache.pool is self.pool and cache.length == 0 and length == self.length and prefix == self.length
        )

    def run(self, x: torch.Tensor, cache: KVCache) -> None:
        """Write the prefix's keys/values into the cache's slot and advance its length."""
        if self.capture and self._graph is None:
            self._capture()
        self._slot.fill_(cache.slot)
        self._x.copy_(x)
        if self._graph is not None:
            self._graph.replay()
            self.replays += 1
        else:
            self._run()
            self.eager_runs += 1
        cache.length = self.length

    def _run(self) -> None:
        text, n = self.text, self.length
        x = self._x
        cos = torch.cat([text.rope_cos[:n]] * 2, dim=-1)[:, None, :]
        sin = torch.cat([text.rope_sin[:n]] * 2, dim=-1)[:, None, :]
        last = len(text.blocks) - 1
        with sdpa_kernel(_GPU_ATTENTION) if x.is_cuda else contextlib.nullcontext():
            for layer, block in enumerate(text.blocks):
                assert isinstance(block, TextBlock)
                h = block.ln(x)
                attn = block.attn
                hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
                q, k, v = _rotated_qkv(attn, h, cos, sin)
                keys, values = self.pool.k_packed[layer], self.pool.v_packed[layer]  # [slots, ctx, h, hd]
                keys[self._slot, :n] = k[None]
                values[self._slot, :n] = v[None]
                if layer == last:
                    break  # nothing reads the last block's output: no request wants it
                # 4-D, batch of one (the CPU's fused kernel needs it); every position sees all.
                o = F.scaled_dot_product_attention(
                    q[None].transpose(1, 2),
                    k[None].transpose(1, 2),
                    v[None].transpose(1, 2),
                    enable_gqa=nh != nkv,
                )
                x = x + attn.proj(o[0].transpose(0, 1).reshape(n, nh * hd)) + block.mlp(h)

    def warm(self) -> None:
        """Capture the graph ahead of traffic (GPU only)."""
        if self.capture and self._graph is None:
            self._capture()

    def _capture(self) -> None:
        # The warm-up run writes into the slot _slot names: point it at one nobody holds.
        spare = self.pool.acquire()
        if spare is None:
            return  # no free slot to warm up in: stay eager (correct, slower)
        try:
            self._slot.fill_(spare)
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._run()
            self._graph = graph
        finally:
            self.pool.release(spare)
