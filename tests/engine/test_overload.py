"""No request is lost under overload, and the engine is selected and started from settings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from moondream_server.engine.batched import BatchedEngine
from moondream_server.engine.errors import DeadlineExceededError, NotReadyError, QueueFullError
from moondream_server.engine.loader import create_engine
from moondream_server.engine.types import SamplingSettings
from moondream_server.model import Moondream
from moondream_server.settings import Settings
from tests.engine.support import TINY, collect, make_engine, with_engine

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


def test_settings_select_and_start_the_batched_engine(reference_model: Moondream) -> None:
    settings = Settings(
        engine="batched",
        model=str(TINY),
        device="cpu",
        dtype="float32",
        max_batch_size=3,
        max_queue=5,
        image_cache_mb=4,
    )
    engine = create_engine(settings)
    assert isinstance(engine, BatchedEngine)
    question = "What is this?"
    expected = reference_model.query(None, question, settings={"temperature": 0.0, "max_tokens": 8})

    async def main() -> None:
        assert not engine.is_ready()
        with pytest.raises(NotReadyError):
            await engine.caption(Image.new("RGB", (8, 8)), "short", SHORT)
        await engine.start()  # loads and warms up through the scheduler
        assert engine.is_ready()
        assert engine.scheduler is not None and engine.image_cache is not None
        assert engine.scheduler.max_batch_size == 3 and engine.scheduler.max_queue == 5
        assert engine.image_cache.budget_bytes == 4 * 1024 * 1024
        assert engine.scheduler.stats.completed == 1 and len(engine.image_cache) == 0
        got = await engine.query(
            None, question, reasoning=False, spatial_refs=[], settings=SamplingSettings(0.0, None, 8)
        )
        assert got.text == expected["answer"]
        await engine.stop()
        assert not engine.is_ready()
        with pytest.raises(NotReadyError):
            await engine.query(None, question, reasoning=False, spatial_refs=[], settings=SHORT)

    asyncio.run(main())


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
