"""The batching engine on the real tiny checkpoint: same answers as one request at a time.

Expected values come from ``Moondream.caption/query/detect/point`` called directly (greedy),
never from the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from moondream_server.engine.batched import BatchedEngine
from moondream_server.engine.errors import DeadlineExceededError, InvalidRequestError, QueueFullError
from moondream_server.engine.scheduler import Request, Scheduler
from moondream_server.engine.types import EngineInfo, QueryResult, SamplingSettings
from moondream_server.model import Moondream
from moondream_server.model import text as text_module
from moondream_server.model.cuda_graphs import DecodeGraphs
from moondream_server.model.moondream_runtime import MoondreamRuntime
from moondream_server.model.params import TextSettings, spatial_refs
from moondream_server.model.tasks import CaptionTask
from tests.engine.support import DEVICE, collect, load_tiny, make_engine, with_engine

GREEDY = {"temperature": 0.0, "max_tokens": 24}
G = SamplingSettings(temperature=0.0, max_tokens=24)
GREEDY_SETTINGS = TextSettings.parse(GREEDY)
OBJ = {"max_objects": 4}
OBJ_S = SamplingSettings(max_objects=4)
BUDGETS = (24, 7, 13)  # max_tokens per image in the mixed test
OBJECTS = (4, 1, 2)  # max_objects per image in the mixed test


def boxes(objects: list[dict[str, float]]) -> list[tuple[float, ...]]:
    return [(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in objects]


@pytest.mark.parametrize(
    ("kv_pool", "graphs"),
    [(False, False), (True, False), (True, True)],
    ids=["private-caches", "kv-pool", "kv-pool-graphs"],
)
def test_mixed_concurrent_traffic_equals_one_at_a_time(
    reference_model: Moondream,
    images: list[Image.Image],
    kv_pool: bool,
    graphs: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = reference_model
    refs_pt = [[0.25, 0.5]]
    refs_box = [[0.1, 0.2, 0.6, 0.9]]
    expected: list[Any] = []
    for j, im in enumerate(images):
        # every sequence keeps its own budgets: they differ from image to image
        gj = {"temperature": 0.0, "max_tokens": BUDGETS[j]}
        oj = {"max_objects": OBJECTS[j]}
        enc = m.encode_image(im)
        expected += [
            m.caption(enc, settings=gj)["caption"],
            list(m.caption(enc, length="short", stream=True, settings=gj)["caption"]),
            m.query(enc, "What is in the image?", settings=gj)["answer"],
            m.query(enc, "Where is it?", reasoning=True, settings=gj),
            m.query(enc, "What is here?", spatial_refs=refs_pt, settings=gj)["answer"],
            list(m.query(enc, "And here?", spatial_refs=refs_box, stream=True, settings=gj)["answer"]),
            boxes(m.detect(enc, "cat", settings=oj)["objects"]),
            [(p["x"], p["y"]) for p in m.point(enc, "dog", settings=oj)["points"]],
        ]
    expected.append(m.query(None, "Tell me a story.", settings=GREEDY)["answer"])
    expected.append(list(m.query(None, "Why?", stream=True, settings=GREEDY)["answer"]))

    async def body(e: BatchedEngine) -> list[Any]:
        calls: list[Awaitable[Any]] = []
        for j, im in enumerate(images):
            gs = SamplingSettings(temperature=0.0, max_tokens=BUDGETS[j])
            os_ = SamplingSettings(max_objects=OBJECTS[j])
            calls += [
                e.caption(im, "normal", gs),
                collect(e.stream_caption(im, "short", gs)),
                e.query(im, "What is in the image?", reasoning=False, spatial_refs=[], settings=gs),
                e.query(im, "Where is it?", reasoning=True, spatial_refs=[], settings=gs),
                e.query(im, "What is here?", reasoning=False, spatial_refs=[(0.25, 0.5)], settings=gs),
                collect(e.stream_query(im, "And here?", spatial_refs=[(0.1, 0.2, 0.6, 0.9)], settings=gs)),
                e.detect(im, "cat", os_),
                e.point(im, "dog", os_),
            ]
        calls.append(e.query(None, "Tell me a story.", reasoning=False, spatial_refs=[], settings=G))
        calls.append(collect(e.stream_query(None, "Why?", spatial_refs=[], settings=G)))
        # a sampled request in the same steps must not disturb the greedy ones
        calls.append(e.caption(images[0], "long", SamplingSettings(temperature=1.0, top_p=0.9, max_tokens=5)))
        return await asyncio.gather(*calls)

    pooled_calls: list[int] = []
    attend = text_module._PooledDecode.attend

    def spy(self: Any, *args: Any) -> None:
        pooled_calls.append(len(self.members))
        attend(self, *args)

    monkeypatch.setattr(text_module._PooledDecode, "attend", spy)
    graph_steps: list[int] = []
    graph_step = DecodeGraphs.step

    def graph_spy(self: DecodeGraphs, x: torch.Tensor, caches: Any) -> Any:
        graph_steps.append(len(caches))
        return graph_step(self, x, caches)

    monkeypatch.setattr(DecodeGraphs, "step", graph_spy)
    engine = make_engine(kv_pool=kv_pool, decode_graphs=graphs)
    got = with_engine(engine, body)
    # with the pool, decode steps of several sequences really attended together (in one static
    # step with the decode graphs: on a CPU the same function runs without capture)
    assert (max(pooled_calls, default=0) > 1) == (kv_pool and not graphs)
    assert (max(graph_steps, default=0) > 1) == graphs
    prefix = engine.runtime.prefix_graph if engine.runtime is not None else None
    assert (prefix is not None) == graphs  # image prefills through the static prefix step
    if prefix is not None:
        assert prefix.replays + prefix.eager_runs == len(images)
    assert engine.runtime is not None and engine.scheduler is not None
    pool = engine.runtime.kv_pool
    assert (pool is not None) == kv_pool
    if pool is not None:  # every slot went back when its request finished (but the scratch slot)
        assert pool.free_slots == pool.n_slots - (1 if graphs else 0)
    sampled = got.pop()
    assert sampled.metrics.output_tokens <= 5 and sampled.finish_reason in ("stop", "length")
    for i, (exp, res) in enumerate(zip(expected, got, strict=True)):
        n = 8 * len(images)
        kind = i % 8 if i < n else (0 if i == n else 1)
        if kind in (0, 2, 4):
            assert res.text == exp, i
        elif kind in (1, 5):
            assert res == exp, i  # the same pieces, in order
        elif kind == 3:
            assert res.text == exp["answer"], i
            assert res.reasoning is not None and res.reasoning.text == exp["reasoning"]["text"]
            spans = [(g.start_idx, g.end_idx, g.points) for g in res.reasoning.grounding]
            grounding = exp["reasoning"]["grounding"]
            assert spans == [(g["start_idx"], g["end_idx"], g["points"]) for g in grounding]
        elif kind == 6:
            assert [(b.x_min, b.y_min, b.x_max, b.y_max) for b in res.objects] == exp, i
        else:
            assert [(p.x, p.y) for p in res.points] == exp, i
    # it really batched: each image encoded once for its 8 requests, steps shared by sequences
    assert engine.runtime.images_embedded == len(images)
    # CPU defaults: one image per vision job (first come first served), no KV pool unless asked
    if DEVICE == "cpu":
        assert engine.scheduler.max_images_per_step == 1 and engine.runtime.max_vision_crops == 4
    assert max(engine.scheduler.stats.step_sizes) > 1
    assert engine.scheduler.stats.completed == len(expected) + 1


@pytest.mark.parametrize(("chunk", "passes"), [(16, 1), (4, 4)])
def test_vision_batches_the_crops_of_several_images(
    reference_model: Moondream, images: list[Image.Image], chunk: int, passes: int
) -> None:
    """13 crops of 3 images: one encoder pass, or ceil(13 / 4) chunks between text steps."""
    rt = MoondreamRuntime(load_tiny(), max_vision_crops=chunk)
    s = Scheduler(rt, max_batch_size=8)
    assert sum(reference_model.crops(im).pixels.shape[0] for im in images) == 13
    reqs = [
        Request(program=rt.program(CaptionTask("normal", GREEDY_SETTINGS)), image=im, deadline=float("inf"))
        for im in images
    ]
    for r in reqs:
        s.submit(r)
    while s.run_once():
        pass
    assert rt.vision_calls == passes and rt.images_embedded == 3
    for r, im in zip(reqs, images, strict=True):
        assert r.error is None
        assert r.result.text.text == reference_model.caption(im, settings=GREEDY)["caption"]
    with torch.inference_mode():
        together = rt.embed_images(images)
        for im, emb in zip(images, together, strict=True):
            torch.testing.assert_close(emb, reference_model.embed_image(im), rtol=1e-4, atol=1e-5)


def test_image_cache_hit_skips_encoding_and_gives_identical_results(
    reference_model: Moondream, images: list[Image.Image]
) -> None:
    im = images[1]
    expected = reference_model.caption(im, settings=GREEDY)["caption"]
    expected_points = reference_model.point(im, "dog", settings=OBJ)["points"]

    async def body(e: BatchedEngine) -> None:
        assert e.runtime is not None and e.scheduler is not None and e.image_cache is not None
        hashed_on: list[str] = []
        image_key = e.runtime.image_key

        def spy(image: Any) -> Any:
            hashed_on.append(threading.current_thread().name)
            return image_key(image)

        e.runtime.image_key = spy  # type: ignore[method-assign]
        first = await e.caption(im, "normal", G)
        assert e.runtime.images_embedded == 1 and e.scheduler.stats.image_prefills == 1
        again = await e.caption(im.copy(), "normal", G)  # another object, same pixels
        pts = await e.point(Image.fromarray(np.asarray(im)), "dog", OBJ_S)
        assert e.runtime.images_embedded == 1 and e.scheduler.stats.image_prefills == 1
        assert e.image_cache.stats().hits == 2
        assert first.text == again.text == expected
        assert [(p.x, p.y) for p in pts.points] == [(p["x"], p["y"]) for p in expected_points]
        # hashing (and tiling) ran on worker threads, never on the thread that owns the model
        assert len(hashed_on) == 3 and "moondream-scheduler" not in hashed_on

    with_engine(make_engine(), body)


def test_eviction_under_a_small_byte_budget(reference_model: Moondream, images: list[Image.Image]) -> None:
    a, b = images[0], images[2]
    exp_a = reference_model.query(a, "What?", settings=GREEDY)["answer"]
    exp_b = reference_model.query(b, "What?", settings=GREEDY)["answer"]

    async def body(e: BatchedEngine) -> None:
        assert e.runtime is not None and e.image_cache is not None

        async def ask(im: Image.Image) -> QueryResult:
            return await e.query(im, "What?", reasoning=False, spatial_refs=[], settings=G)

        assert (await ask(a)).text == exp_a
        assert (await ask(b)).text == exp_b  # evicts a: one encoded image fits the budget
        assert len(e.image_cache) == 1 and e.image_cache.stats().evictions == 1
        assert (await ask(b)).text == exp_b  # hit
        assert e.runtime.images_embedded == 2
        assert (await ask(a)).text == exp_a  # a was evicted: encoded again
        assert e.runtime.images_embedded == 3
        assert e.image_cache.nbytes <= e.image_cache.budget_bytes

    # one tiny encoded image: 2 layers x 1 head x 730 x 64 x fp32 x (k, v) = 747,520 bytes
    with_engine(make_engine(image_cache_mb=1.0), body)


def test_invalid_requests_fail_alone(reference_model: Moondream, images: list[Image.Image]) -> None:
    im = images[0]
    expected = reference_model.caption(im, settings=GREEDY)["caption"]
    too_long = "word " * 3000  # more tokens than the 2048-position context

    async def body(e: BatchedEngine) -> None:
        with pytest.raises(ValueError, match=r"spatial_refs\[0\]"):  # refs are checked when parsed
            await e.query(im, "x", reasoning=False, spatial_refs=spatial_refs([[2.0, 0.5]]), settings=G)
        with pytest.raises(InvalidRequestError, match="need an image"):
            await e.query(None, "x", reasoning=False, spatial_refs=[(0.5, 0.5)], settings=G)
        with pytest.raises(ValueError, match="temperature"):  # settings are checked when built
            await e.caption(im, "normal", SamplingSettings(temperature=-1.0))
        good = asyncio.create_task(e.caption(im, "normal", G))
        with pytest.raises(InvalidRequestError, match="context"):
            await e.query(im, too_long, reasoning=False, spatial_refs=[], settings=G)
        also_good = asyncio.create_task(e.caption(im, "normal", G))
        with pytest.raises(InvalidRequestError, match="characters long"):  # refused before tokenizing
            await e.detect(im, too_long, OBJ_S)
        assert (await good).text == expected
        assert (await also_good).text == expected

    with_engine(make_engine(), body)


def test_leaving_frees_the_slot(never_stop_path: Path, images: list[Image.Image]) -> None:
    long = SamplingSettings(temperature=0.0, max_tokens=1500)

    async def body(e: BatchedEngine) -> None:
        assert e.scheduler is not None
        stream = e.stream_caption(images[0], "normal", long)
        first = [await anext(stream) for _ in range(3)]
        assert all(first)
        task = asyncio.create_task(e.query(None, "go on", reasoning=False, spatial_refs=[], settings=long))
        while e.scheduler.active_count < 2:
            await asyncio.sleep(0.01)
        await stream.aclose()  # the client went away
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if e.scheduler.active_count == 0:
                break
            await asyncio.sleep(0.01)
        assert e.scheduler.active_count == 0
        assert e.scheduler.stats.cancelled == 2 and e.scheduler.stats.completed == 0
        assert e.stats["interrupted"] == 2 and e.stats["completed"] == 0  # what /health shows
        done = await e.caption(images[0], "short", SamplingSettings(temperature=0.0, max_tokens=3))
        assert done.metrics.output_tokens == 3 and done.finish_reason == "length"

    with_engine(make_engine(never_stop_path), body)


def test_random_cancellations_leave_the_others_exact(
    reference_model: Moondream, images: list[Image.Image]
) -> None:
    """Every third request is abandoned at a random moment (owners of images included)."""
    import random

    rng = random.Random(1234)
    plan = [(i, images[i % 3], i % 4) for i in range(24)]
    expected: dict[int, Any] = {}
    for i, im, kind in plan:
        if i % 3 == 0:
            continue
        if kind == 0:
            expected[i] = reference_model.caption(im, settings=GREEDY)["caption"]
        elif kind == 1:
            expected[i] = reference_model.query(im, f"Question {i}?", settings=GREEDY)["answer"]
        elif kind == 2:
            expected[i] = [(p["x"], p["y"]) for p in reference_model.point(im, "cat", settings=OBJ)["points"]]
        else:
            expected[i] = reference_model.query(None, f"Question {i}?", settings=GREEDY)["answer"]

    async def one(e: BatchedEngine, i: int, im: Image.Image, kind: int) -> Any:
        if kind == 0:
            return (await e.caption(im, "normal", G)).text
        if kind == 1:
            return "".join(await collect(e.stream_query(im, f"Question {i}?", spatial_refs=[], settings=G)))
        if kind == 2:
            return [(p.x, p.y) for p in (await e.point(im, "cat", OBJ_S)).points]
        return (await e.query(None, f"Question {i}?", reasoning=False, spatial_refs=[], settings=G)).text

    async def body(e: BatchedEngine) -> tuple[dict[int, Any], int]:
        assert e.scheduler is not None
        tasks = {i: asyncio.create_task(one(e, i, im, kind)) for i, im, kind in plan}
        for i in sorted(tasks, key=lambda _: rng.random()):
            if i % 3 == 0:
                await asyncio.sleep(rng.random() * 0.05)
                tasks[i].cancel()
        results = dict(zip(tasks, await asyncio.gather(*tasks.values(), return_exceptions=True), strict=True))
        for _ in range(300):
            if e.scheduler.active_count == 0 and e.scheduler.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        return results, e.scheduler.active_count + e.scheduler.queue_depth

    results, left = with_engine(make_engine(max_batch_size=4), body)
    assert left == 0
    assert sum(isinstance(r, asyncio.CancelledError) for r in results.values()) >= 1
    for i, res in results.items():
        if i % 3 == 0:
            assert isinstance(res, asyncio.CancelledError) or not isinstance(res, BaseException), res
        else:
            assert res == expected[i], i


def test_a_drained_stream_reports_finish_reason_and_token_counts(
    reference_model: Moondream, images: list[Image.Image]
) -> None:
    """What the OpenAI and Ollama surfaces put in their last chunk: the model's own counts."""
    expected = []
    for budget in (3, 40):
        greedy = {"temperature": 0.0, "max_tokens": budget}
        task = CaptionTask("short", TextSettings.parse(greedy))
        expected.append(
            reference_model.run(reference_model.program(task), reference_model.encode_image(images[0]))
        )

    async def body(e: BatchedEngine) -> list[Any]:
        out = []
        for budget in (3, 40):
            greedy = SamplingSettings(temperature=0.0, max_tokens=budget)
            stream = e.stream_caption(images[0], "short", greedy)
            assert stream.result is None
            out.append(("".join(await collect(stream)), stream.result))
        return out

    got = with_engine(make_engine(), body)
    for (text, result), last in zip(got, expected, strict=True):
        assert last.text is not None and result is not None
        assert text == last.text.text
        assert result.finish_reason == last.text.finish_reason
        assert result.metrics.output_tokens == len(last.text.tokens)
        assert result.metrics.input_tokens == last.prompt_tokens > 0
        # the image's context positions, counted apart: BOS + one per vision patch
        assert result.metrics.image_tokens == 1 + reference_model.config.vision.grid**2
    assert {r.finish_reason for _, r in got} == {"length", "stop"}  # both ends are exercised


SHORT = SamplingSettings(temperature=0.0, max_tokens=4, max_objects=2)
LONG = SamplingSettings(temperature=0.0, max_tokens=1900, max_objects=600)


def test_three_times_the_queue_capacity(never_stop_path: Path, images: list[Image.Image]) -> None:
    """Both slots are held by long streams; 12 mixed requests compete for 4 queue places."""
    max_queue, total = 4, 12
    im = images[0]

    def request(e: BatchedEngine, i: int) -> Any:
        s = LONG if i % 2 == 0 else SHORT
        kind = (i // 2) % 6
        if kind == 0:
            return e.caption(im, "normal", s)
        if kind == 1:
            return collect(e.stream_caption(im, "short", s))
        if kind == 2:
            return e.query(im, "What?", reasoning=i % 4 == 0, spatial_refs=[], settings=s)
        if kind == 3:
            return e.detect(im, "thing", s)
        if kind == 4:
            return e.point(im, "thing", s)
        return e.query(None, "Why?", reasoning=False, spatial_refs=[], settings=s)

    async def body(e: BatchedEngine) -> tuple[list[Any], list[Any], Any]:
        assert e.scheduler is not None
        # 1900 never-ending tokens take far longer than the 1 s deadline
        blockers = [
            asyncio.create_task(collect(e.stream_query(None, f"Go {k}", spatial_refs=[], settings=LONG)))
            for k in range(2)
        ]
        while e.scheduler.active_count < 2:
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*(request(e, i) for i in range(total)), return_exceptions=True)
        blocked = await asyncio.gather(*blockers, return_exceptions=True)
        for _ in range(300):  # let the scheduler reap what the callers gave up on
            if e.scheduler.active_count == 0 and e.scheduler.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        stats = e.scheduler.stats
        accounted = stats.completed + stats.expired + stats.cancelled + stats.rejected
        after = await e.caption(im, "short", SHORT)
        return results, blocked, (accounted, e.scheduler.active_count, e.scheduler.queue_depth, after)

    engine = make_engine(never_stop_path, max_queue=max_queue, max_batch_size=2, request_timeout_s=1.0)
    results, blocked, (accounted, active, waiting, after) = with_engine(engine, body)
    assert all(isinstance(b, DeadlineExceededError) for b in blocked), blocked
    outcomes = ["ok" if not isinstance(r, BaseException) else type(r).__name__ for r in results]
    allowed = {"ok", QueueFullError.__name__, DeadlineExceededError.__name__}
    assert set(outcomes) <= allowed, outcomes
    assert outcomes.count(QueueFullError.__name__) >= 1, outcomes
    assert accounted == total + 2  # every request left the scheduler one way or another
    assert (active, waiting) == (0, 0)
    assert after.metrics.output_tokens == SHORT.max_tokens  # still serving afterwards


def test_check_capacity_refuses_before_any_work(never_stop_path: Path) -> None:
    async def body(e: BatchedEngine) -> None:
        assert e.scheduler is not None
        e.check_capacity()  # idle: room
        stream = e.stream_query(None, "Go", spatial_refs=[], settings=LONG)
        await anext(stream)  # holds the only slot
        waiting = asyncio.create_task(e.query(None, "Wait", reasoning=False, spatial_refs=[], settings=SHORT))
        while e.scheduler.queue_depth < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(QueueFullError):
            e.check_capacity()
        await stream.aclose()
        assert (await waiting).metrics.output_tokens == SHORT.max_tokens
        e.check_capacity()  # room again

    with_engine(make_engine(never_stop_path, max_batch_size=1, max_queue=1), body)


def test_engine_info_reads_the_models_precision_afresh() -> None:
    """/health's precision comes from the model on every call: the CPU float32 path reports its
    background packing there until it is done."""
    model = load_tiny()
    engine = BatchedEngine(lambda: model, info=EngineInfo("tiny", None, DEVICE, "float32"), warmup=False)
    assert engine.info.precision is None  # nothing loaded yet

    async def body(e: BatchedEngine) -> None:
        first = e.info.precision
        assert first is not None and first == model.precision_name
        assert model.precision is not None
        model.precision = dataclasses.replace(model.precision, reason="changed after start")
        assert e.info.precision == model.precision_name != first

    with_engine(engine, body)
