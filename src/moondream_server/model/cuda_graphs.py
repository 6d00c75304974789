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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.attention import sdpa_kernel

from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.text import _GPU_ATTENTION, TextBlock, TextModel, _rotate

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

    def __init__(self, text: TextModel, pool: KVPool, *, max_batch: int, capture: bool | None = None) -> None:
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
        for b in batches or self.buckets:
            for span in spans:
                key = (self.bucket_for(b), min(self.pool.max_context, -(-span // SPAN_STEP) * SPAN_STEP))
                if key not in self._graphs:
                    self._capture(*key)

    # -- the static step -----------------------------------------------------------------------
    def _run(self, b: int, span: int) -> None:
        """The step of the first ``b`` rows of the static buffers, keys over ``span`` positions."""
        text = self.text
        x = self._x[:b]
        slots, pos = self._index[0, :b], self._index[1, :b]
        cos, sin = text.rope_cos[pos], text.rope_sin[pos]
        cols = torch.arange(span, device=x.device)
        mask = (cols[None, :] <= pos[:, None])[:, None, None, :]  # [b, 1, 1, span]
        with sdpa_kernel(_GPU_ATTENTION) if x.is_cuda else contextlib.nullcontext():
            for layer, block in enumerate(text.blocks):
                assert isinstance(block, TextBlock)
                h = block.ln(x)
                attn = block.attn
                hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
                q, k, v = attn.qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
                q = _rotate(q.view(b, nh, hd), cos, sin)
                k = _rotate(k.view(b, nkv, hd), cos, sin)
                keys, values = self.pool.k[layer], self.pool.v[layer]  # [slots, heads, context, hd]
                keys[slots, :, pos] = k
                values[slots, :, pos] = v.view(b, nkv, hd)
                # Only the members' slots are read (a copy of b x span positions), not the pool's.
                o = F.scaled_dot_product_attention(
                    q[:, :, None, :],
                    keys[:, :, :span].index_select(0, slots),
                    values[:, :, :span].index_select(0, slots),
                    attn_mask=mask,
                    enable_gqa=nh != nkv,
                )
                x = x + attn.proj(o.reshape(b, nh * hd)) + block.mlp(h)
        self._hidden[:b].copy_(x)
        self._logits[:b].copy_(text.logits(x).float())

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
