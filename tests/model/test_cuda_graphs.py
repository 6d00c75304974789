"""The static decode step (CUDA graphs on a GPU, the same function eagerly on a CPU).

Expected values come from ``TextModel.forward`` over private caches (the path the golden tests
check against the reference), never from ``DecodeGraphs`` itself.
"""

from __future__ import annotations

import pytest
import torch

from moondream_server.model import Moondream, load
from moondream_server.model.cuda_graphs import SPAN_STEP, DecodeGraphs, PrefixGraph, batch_buckets
from moondream_server.model.kv_cache import KVCache
from moondream_server.model.text import SeqSlice
from tests.model.support import TEST_DEVICE, TINY, TINY_MH

GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module", params=[TINY, TINY_MH], ids=["tiny", "tiny-mh"])
def model(request: pytest.FixtureRequest) -> Moondream:
    return load(request.param, device=TEST_DEVICE, dtype=torch.float32)


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


def _prefilled(model: Moondream, lengths: list[int], pool: object, seed: int) -> list[KVCache]:
    """Caches holding random prompts of these lengths (a bidirectional prefix of 3 in each)."""
    text = model.net.text
    gen = torch.Generator().manual_seed(seed)
    caches = []
    with torch.inference_mode():
        for n in lengths:
            cache = text.new_cache(pool=pool)  # type: ignore[arg-type]
            x = torch.randn(n, text.config.dim, generator=gen).to(text.wte)
            text(x, [SeqSlice(cache, n, prefix=3)])
            caches.append(cache)
    return caches


@pytest.mark.parametrize("spare", [0, 12], ids=["few-slots", "many-slots"])  # whole pool / gathered
@pytest.mark.parametrize("lengths", [[5], [7, 140, 3], [130, 9, 33, 60, 4]], ids=["one", "three", "five"])
def test_static_step_equals_the_regular_forward(model: Moondream, lengths: list[int], spare: int) -> None:
    text = model.net.text
    graphs = DecodeGraphs(text, text.new_pool(len(lengths) + 1 + spare), max_batch=8)
    pooled = _prefilled(model, lengths, graphs.pool, seed=1)
    private = _prefilled(model, lengths, None, seed=1)
    assert all(c.pool is graphs.pool for c in pooled) and all(c.pool is None for c in private)
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for _ in range(3):  # a few steps: every step must see the keys the previous one wrote
            x = torch.randn(len(lengths), text.config.dim, generator=gen).to(text.wte)
            assert all(graphs.accepts(c, 1, 3) for c in pooled)
            hidden, logits = graphs.step(x, pooled)
            for i, cache in enumerate(private):
                want = text(x[i : i + 1], [SeqSlice(cache, 1, prefix=3)])
                torch.testing.assert_close(hidden[i : i + 1], want, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(logits[i : i + 1], text.logits(want).float(), rtol=1e-4, atol=1e-4)
    for p, c in zip(pooled, private, strict=True):
        assert p.length == c.length
        torch.testing.assert_close(p.k[:, :, : p.length], c.k[:, :, : c.length], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(p.v[:, :, : p.length], c.v[:, :, : c.length], rtol=1e-4, atol=1e-4)
    # eager on a CPU, replayed graphs on a GPU
    if TEST_DEVICE.startswith("cuda"):
        assert graphs.replays == 3 and graphs.eager_steps == 0
    else:
        assert graphs.eager_steps == 3 and graphs.graph_count == 0


def test_padding_rows_write_only_the_scratch_slot(model: Moondream) -> None:
    text = model.net.text
    pool = text.new_pool(4)
    graphs = DecodeGraphs(text, pool, max_batch=4)
    caches = _prefilled(model, [6, 10, 4], pool, seed=3)  # 3 rows -> bucket 4, one padding row
    members = [c.slot for c in caches]
    assert graphs.scratch not in members and pool.free_slots == 0
    before = pool.k.clone()
    with torch.inference_mode():
        graphs.step(torch.randn(2, text.config.dim).to(text.wte), caches[:2])
    changed = (pool.k != before).flatten(2).any(-1)  # [layers, slots]
    assert changed[:, members[0]].all() and changed[:, members[1]].all()
    assert not changed[:, members[2]].any()  # not stepped: untouched
    only_new = pool.k[:, members[0], :, :6] == before[:, members[0], :, :6]
    assert only_new.all()  # earlier positions of a member are never rewritten
    assert caches[0].length == 7 and caches[1].length == 11 and caches[2].length == 4


def test_accepts_only_pooled_one_token_steps_past_the_prefix(model: Moondream) -> None:
    text = model.net.text
    graphs = DecodeGraphs(text, text.new_pool(2), max_batch=1)
    pooled = text.new_cache(pool=graphs.pool)
    private = text.new_cache()
    pooled.length = private.length = 5
    assert graphs.accepts(pooled, 1, prefix=5)
    assert not graphs.accepts(pooled, 2, prefix=5)  # a prefill
    assert not graphs.accepts(pooled, 1, prefix=6)  # still inside the bidirectional prefix
    assert not graphs.accepts(private, 1, prefix=0)
    pooled.length = text.config.max_context
    assert not graphs.accepts(pooled, 1, prefix=0)  # full: the regular path raises
    assert graphs.span_for([0]) == SPAN_STEP and graphs.span_for([SPAN_STEP]) == 2 * SPAN_STEP
    with pytest.raises(ValueError, match="largest batch"):
        graphs.bucket_for(2)


def test_a_pool_without_a_free_slot_is_refused(model: Moondream) -> None:
    text = model.net.text
    pool = text.new_pool(1)
    held = text.new_cache(pool=pool)
    assert held.pool is pool
    with pytest.raises(ValueError, match="scratch"):
        DecodeGraphs(text, pool, max_batch=1)


def test_moondream_with_decode_graphs_answers_as_without(model: Moondream) -> None:
    """The one-request path (serial engine, model benchmarks) through the static step."""
    from PIL import Image

    image = Image.open(TINY / "images" / "img1.png")
    enc = model.encode_image(image)
    model.decode_graphs = False
    try:
        want = [
            model.caption(enc, settings=GREEDY)["caption"],
            model.query(enc, "What is it?", reasoning=True, settings=GREEDY),
            model.detect(enc, "cat", settings={"max_objects": 3})["objects"],
            model.query(None, "Hello?", settings=GREEDY)["answer"],
        ]
        model.decode_graphs = True
        got = [
            model.caption(enc, settings=GREEDY)["caption"],
            model.query(enc, "What is it?", reasoning=True, settings=GREEDY),
            model.detect(enc, "cat", settings={"max_objects": 3})["objects"],
            model.query(None, "Hello?", settings=GREEDY)["answer"],
        ]
        graphs = model.graphs
        assert graphs is not None and graphs.replays + graphs.eager_steps > 20
        assert graphs.pool.free_slots == 1  # every finished request gave its slot back
    finally:
        model.decode_graphs = None
    assert got == want


@pytest.mark.skipif(not TEST_DEVICE.startswith("cuda"), reason="varlen flash attention needs a GPU")
@pytest.mark.parametrize("path", [TINY, TINY_MH], ids=["tiny", "tiny-mh"])
def test_flash_path_in_bf16_agrees_with_the_regular_forward(path: object) -> None:
    """The GPU's half-precision path (varlen flash attention over the pool in place)."""
    m = load(path, device=TEST_DEVICE, dtype=torch.bfloat16)  # type: ignore[arg-type]
    text = m.net.text
    lengths = [130, 9, 33, 60, 4]
    graphs = DecodeGraphs(text, text.new_pool(len(lengths) + 5), max_batch=8)
    assert graphs.flash  # else this GPU runs the masked path (the warning says why)
    pooled = _prefilled(m, lengths, graphs.pool, seed=5)
    private = _prefilled(m, lengths, None, seed=5)
    gen = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(len(lengths), text.config.dim, generator=gen).to(text.wte)
            hidden, _ = graphs.step(x, pooled)
            want = torch.cat([text(x[i : i + 1], [SeqSlice(c, 1, prefix=3)]) for i, c in enumerate(private)])
            err = (hidden.float() - want.float()).norm() / want.float().norm()
            assert err < 2e-2, float(err)
    assert graphs.replays == 3


@pytest.mark.parametrize("length", [1, 37])
def test_prefix_graph_writes_what_the_regular_prefill_writes(model: Moondream, length: int) -> None:
    text = model.net.text
    pool = text.new_pool(3)
    graph = PrefixGraph(text, pool, length)
    other = text.new_cache(pool=pool)  # a neighbour slot must stay untouched
    cache = text.new_cache(pool=pool)
    private = text.new_cache()
    before = pool.k.clone()
    x = torch.randn(length, text.config.dim, generator=torch.Generator().manual_seed(8)).to(text.wte)
    with torch.inference_mode():
        assert graph.accepts(cache, length, length) and not graph.accepts(private, length, length)
        assert not graph.accepts(cache, length, 0)  # not an image prefix: the regular path
        graph.run(x, cache)
        text(x, [SeqSlice(private, length, prefix=length)])
    assert cache.length == private.length == length
    torch.testing.assert_close(cache.k[:, :, :length], private.k[:, :, :length], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.v[:, :, :length], private.v[:, :, :length], rtol=1e-4, atol=1e-4)
    assert torch.equal(pool.k[:, other.slot], before[:, other.slot])
    assert torch.equal(pool.k[:, cache.slot, :, length:], before[:, cache.slot, :, length:])
    assert (graph.replays, graph.eager_runs) == ((1, 0) if TEST_DEVICE.startswith("cuda") else (0, 1))
