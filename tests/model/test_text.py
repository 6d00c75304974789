"""The packed text decoder: many sequences at different positions in one forward pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional as F

from moondream_server.model import Moondream
from moondream_server.model import text as text_module
from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.text import SeqSlice


def test_packed_batch_equals_separate_runs(random_model: Moondream) -> None:
    text = random_model.net.text
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, text.config.dim, generator=gen) for n in (7, 3, 1)]
    prefixes = [5, 0, 0]

    # Separately: prefill each sequence, then one decode step.
    solo = []
    for prompt, prefix in zip(prompts, prefixes, strict=True):
        cache = text.new_cache()
        text(prompt, [SeqSlice(cache, prompt.shape[0], prefix=prefix)])
        step = torch.ones(1, text.config.dim)
        solo.append(text(step, [SeqSlice(cache, 1, prefix=prefix)]))

    # Together: the same prefills packed in one call, then the decode steps packed in one call.
    caches = [text.new_cache() for _ in prompts]
    text(
        torch.cat(prompts),
        [SeqSlice(c, p.shape[0], prefix=x) for c, p, x in zip(caches, prompts, prefixes, strict=True)],
    )
    packed = text(
        torch.ones(3, text.config.dim),
        [SeqSlice(c, 1, prefix=x) for c, x in zip(caches, prefixes, strict=True)],
    )
    for i in range(3):
        torch.testing.assert_close(packed[i : i + 1], solo[i], rtol=1e-5, atol=1e-5)
    assert [c.length for c in caches] == [8, 4, 2]


def test_prefix_is_bidirectional_and_the_rest_causal(random_model: Moondream) -> None:
    """Changing a later prefix token changes earlier prefix outputs; a later prompt token cannot."""
    text = random_model.net.text
    x = torch.randn(6, text.config.dim, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[2] += 1.0  # inside the 3-position prefix
    z = x.clone()
    z[5] += 1.0  # after the prefix
    out = [text(v, [SeqSlice(text.new_cache(), 6, prefix=3)]) for v in (x, y, z)]
    assert not torch.allclose(out[0][0], out[1][0])  # position 0 sees position 2
    torch.testing.assert_close(out[0][:5], out[2][:5])  # nobody before 5 sees position 5


def test_a_prefill_wholly_inside_the_prefix_needs_no_mask(random_model: Moondream) -> None:
    """Six prefix positions fed alone (no mask) give what they give with a causal token after them."""
    text = random_model.net.text
    x = torch.randn(7, text.config.dim, generator=torch.Generator().manual_seed(2))
    cache = text.new_cache()
    assert text_module._attention_mask(SeqSlice(cache, 6, prefix=6), x.device) is None
    alone = text(x[:6], [SeqSlice(cache, 6, prefix=6)])
    with_tail = text(x, [SeqSlice(text.new_cache(), 7, prefix=6)])
    torch.testing.assert_close(alone, with_tail[:6], rtol=1e-5, atol=1e-5)
    first = text(x[:6], [SeqSlice(text.new_cache(), 6, prefix=3)])
    assert not torch.allclose(first[0], alone[0])  # the prefix decides who sees whom


def test_forward_for_chosen_rows_only(random_model: Moondream) -> None:
    """Asking for some rows gives exactly those rows, and writes every row's keys and values."""
    text = random_model.net.text
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, text.config.dim, generator=gen)

    def run(rows: list[int] | None) -> tuple[torch.Tensor, list[KVCache]]:
        caches = [text.new_cache(), text.new_cache()]
        out = text(x, [SeqSlice(caches[0], 6, prefix=4), SeqSlice(caches[1], 3)], rows)
        return out, caches

    full, full_caches = run(None)
    for rows in ([5, 8], [8], []):
        got, caches = run(rows)
        assert got.shape == (len(rows), text.config.dim)
        torch.testing.assert_close(got, full[rows], rtol=1e-5, atol=1e-5)
        for c, f in zip(caches, full_caches, strict=True):
            assert c.length == f.length
            torch.testing.assert_close(c.k[:, :, : c.length], f.k[:, :, : f.length])
            torch.testing.assert_close(c.v[:, :, : c.length], f.v[:, :, : f.length])


def test_cache_growth_keeps_contents() -> None:
    cache = KVCache(2, 1, 4, 2048, capacity=3)
    cache.k[:, :, :3] = torch.arange(24, dtype=torch.float32).view(2, 1, 3, 4)
    cache.length = 3
    before = cache.k[:, :, :3].clone()
    cache.reserve(700)
    assert cache.capacity >= 700
    assert torch.equal(cache.k[:, :, :3], before)


def test_cache_refuses_to_outgrow_the_context() -> None:
    cache = KVCache(1, 1, 4, 16)
    try:
        cache.reserve(17)
    except ValueError as e:
        assert "context" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_pooled_decode_steps_equal_private_caches(random_model: Moondream, monkeypatch: Any) -> None:
    """Decode steps of pooled sequences attend in one call; results equal the per-sequence path.

    Three sequences of different lengths (one with an image-style prefix) decode three steps
    together, while a fourth sequence prefills in the same packed calls.
    """
    text = random_model.net.text
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randn(n, text.config.dim, generator=gen) for n in (9, 4, 2)]
    prefixes = [6, 0, 0]
    late = torch.randn(5, text.config.dim, generator=gen)  # prefilled alongside the decodes
    steps = [torch.randn(3, text.config.dim, generator=gen) for _ in range(3)]
    calls = []
    attend = text_module._PooledDecode.attend

    def spy(self: Any, *args: Any) -> None:
        calls.append(len(self.members))
        attend(self, *args)

    monkeypatch.setattr(text_module._PooledDecode, "attend", spy)

    def run(pool: KVPool | None) -> list[torch.Tensor]:
        caches = [text.new_cache(pool=pool) for _ in prompts]
        text(
            torch.cat(prompts),
            [SeqSlice(c, p.shape[0], prefix=x) for c, p, x in zip(caches, prompts, prefixes, strict=True)],
        )
        other = text.new_cache()
        outs = []
        for i, step in enumerate(steps):
            seqs = [SeqSlice(c, 1, prefix=x) for c, x in zip(caches, prefixes, strict=True)]
            if i == 0:
                outs.append(text(torch.cat([step, late]), [*seqs, SeqSlice(other, 5)]))
            else:
                outs.append(text(step, seqs))
        return outs

    private = run(None)
    assert calls == []
    pool = text.new_pool(4)
    pooled = run(pool)
    assert calls == [3] * (3 * text.config.n_layers)  # every decode step of every layer, batched
    for a, b in zip(private, pooled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_matches_sdpa(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    q, keys, values = torch.randn(8, 16), 3 * torch.randn(8, 40, 16), torch.randn(8, 40, 16)
    exact = F.scaled_dot_product_attention(q[:, None].double(), keys.double(), values.double())[:, 0]
    got = text_module._one_query_attention(q.to(dtype), keys.to(dtype), values.to(dtype), 40)
    assert got.dtype == dtype and got.shape == (8, 16)
    assert (got.double() - exact).abs().max().item() < (1e-5 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("length", [29, 37, 40])  # a sliced cache (< 3/4 used) and whole reads
def test_one_query_attention_ignores_the_cache_beyond_its_length(length: int) -> None:
    torch.manual_seed(5)
    q = torch.randn(8, 16).bfloat16()
    keys, values = (torch.randn(8, 40, 16).bfloat16() for _ in range(2))
    want = text_module._one_query_attention(q, keys[:, :length].clone(), values[:, :length].clone(), length)
    keys[:, length:], values[:, length:] = 1e4, -1e4  # stale positions: must not count at all
    got = text_module._one_query_attention(q, keys, values, length)
    assert torch.equal(got, want)
