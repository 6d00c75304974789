"""The settings select the engine: the batching one, or its one-request-at-a-time preset
(``--engine serial``), both on the real tiny checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from moondream_server.engine.batched import BatchedEngine
from moondream_server.engine.errors import NotReadyError
from moondream_server.engine.loader import create_engine
from moondream_server.engine.params import SamplingSettings
from moondream_server.model import Moondream
from moondream_server.settings import Settings
from tests.engine.support import TINY

SHORT = SamplingSettings(temperature=0.0, max_tokens=4, max_objects=2)


def tiny(**values: object) -> Settings:
    return Settings(model=str(TINY), device="cpu", dtype="float32", **values)  # type: ignore[arg-type]


def test_settings_select_and_start_the_batched_engine(reference_model: Moondream) -> None:
    engine = create_engine(tiny(engine="batched", max_batch_size=3, max_queue=5, image_cache_mb=4))
    assert isinstance(engine, BatchedEngine)
    question = "What is this?"
    expected = reference_model.query(None, question, settings={"temperature": 0.0, "max_tokens": 8})

    async def main() -> None:
        assert not engine.is_ready()
        with pytest.raises(NotReadyError):
            await engine.caption(Image.new("RGB", (8, 8)), "short", SHORT)
        with pytest.raises(NotReadyError):
            engine.check_capacity()
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


def test_serial_serves_one_request_at_a_time(
    never_stop_path: Path, reference_model: Moondream, images: list[Image.Image]
) -> None:
    """Three requests sent together: one holds the model, the others wait in the queue; every
    forward step is one sequence's; answers equal the model's own, one call at a time."""
    engine = create_engine(
        Settings(engine="serial", model=str(never_stop_path), device="cpu", dtype="float32")
    )
    assert isinstance(engine, BatchedEngine)
    long = SamplingSettings(temperature=0.0, max_tokens=40)
    im = images[0]

    async def main() -> tuple[list[str], int, int]:
        await engine.start()
        try:
            assert engine.scheduler is not None
            assert engine.scheduler.max_batch_size == 1 and engine.image_cache is None
            sched = engine.scheduler
            most_active = most_waiting = 0
            jobs = [
                asyncio.create_task(engine.caption(im, "normal", long)),
                asyncio.create_task(engine.caption(im, "short", long)),
                asyncio.create_task(
                    engine.query(None, "Why?", reasoning=False, spatial_refs=[], settings=long)
                ),
            ]
            while not all(j.done() for j in jobs):
                most_active = max(most_active, sched.active_count)
                most_waiting = max(most_waiting, sched.queue_depth)
                await asyncio.sleep(0.001)
            texts = [(await j).text for j in jobs]
            assert set(sched.stats.step_sizes) == {1}  # never two sequences in one step
            assert sched.stats.images_encoded == 2  # both captions' (no cache); a CPU warm-up has none
            return texts, most_active, most_waiting
        finally:
            await engine.stop()

    texts, most_active, most_waiting = asyncio.run(main())
    assert most_active == 1 and most_waiting >= 1
    # the reference: the never-stop checkpoint called directly, one request at a time
    from moondream_server.model import load

    model = load(str(never_stop_path), device="cpu", dtype="float32")
    greedy = {"temperature": 0.0, "max_tokens": 40}
    assert texts == [
        model.caption(im, "normal", settings=greedy)["caption"],
        model.caption(im, "short", settings=greedy)["caption"],
        model.query(None, "Why?", settings=greedy)["answer"],
    ]


def test_serial_metrics_and_stream_results(reference_model: Moondream, images: list[Image.Image]) -> None:
    """detect produces no text: its ttft is still the prompt prefill, not 0 or the whole call;
    a drained stream reports the model's own finish reason and token counts."""
    image = images[0]
    expected = reference_model.detect(image, "cat", settings={"max_objects": 4})["objects"]
    greedy = {"temperature": 0.0, "max_tokens": 3}
    answer = reference_model.query(image, "What is it?", settings=greedy)["answer"]
    engine = create_engine(tiny(engine="serial"))

    async def main() -> None:
        await engine.start()
        try:
            det = await engine.detect(image, "cat", SamplingSettings(max_objects=4))
            cap = await engine.caption(image, "normal", SamplingSettings(temperature=0.0, max_tokens=12))
            stream = engine.stream_query(
                image, "What is it?", spatial_refs=[], settings=SamplingSettings(0.0, None, 3)
            )
            assert stream.result is None
            pieces = [p async for p in stream]
            text_only = await engine.query(None, "Why?", reasoning=False, spatial_refs=[], settings=SHORT)
        finally:
            await engine.stop()
        assert [(b.x_min, b.y_min, b.x_max, b.y_max) for b in det.objects] == [
            (o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in expected
        ]
        for metrics in (det.metrics, cap.metrics):
            assert metrics.ttft_ms > 0 and metrics.decode_time_ms > 0
        assert cap.metrics.output_tokens > 0
        assert "".join(pieces) == answer
        assert stream.result is not None and stream.result.metrics.output_tokens <= 3
        assert stream.result.metrics.image_tokens == reference_model.prefix_len
        assert text_only.metrics.image_tokens == 0 and text_only.metrics.input_tokens > 0

    asyncio.run(main())
