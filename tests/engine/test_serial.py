"""The one-at-a-time engine on the real tiny checkpoint: results and metrics."""

from __future__ import annotations

import asyncio

from PIL import Image

from moondream_server.engine.serial import SerialEngine
from moondream_server.engine.types import EngineInfo, SamplingSettings
from moondream_server.model import Moondream
from tests.engine.support import DEVICE, load_tiny


def test_metrics_time_the_first_token_not_the_first_text_piece(
    reference_model: Moondream, images: list[Image.Image]
) -> None:
    """detect produces no text at all: its ttft is still the prompt prefill, not 0 or the whole call."""
    image = images[0]
    expected = reference_model.detect(image, "cat", settings={"max_objects": 4})["objects"]

    async def main() -> None:
        engine = SerialEngine(load_tiny, info=EngineInfo("tiny", None, DEVICE, "float32"), warmup=False)
        await engine.start()
        try:
            det = await engine.detect(image, "cat", SamplingSettings(max_objects=4))
            cap = await engine.caption(image, "normal", SamplingSettings(temperature=0.0, max_tokens=12))
        finally:
            await engine.stop()
        assert [(b.x_min, b.y_min, b.x_max, b.y_max) for b in det.objects] == [
            (o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in expected
        ]
        for metrics in (det.metrics, cap.metrics):
            assert metrics.ttft_ms > 0 and metrics.decode_time_ms > 0
        assert cap.metrics.output_tokens > 0

    asyncio.run(main())


def test_a_drained_stream_reports_finish_reason_and_token_counts(
    reference_model: Moondream, images: list[Image.Image]
) -> None:
    """What the OpenAI and Ollama surfaces put in their last chunk: the model's own counts."""
    image = images[0]
    settings = {"temperature": 0.0, "max_tokens": 3}
    reference_model.query(image, "What is it?", settings=settings)
    last = reference_model.last_result
    assert last.text is not None

    async def main() -> None:
        engine = SerialEngine(load_tiny, info=EngineInfo("tiny", None, DEVICE, "float32"), warmup=False)
        await engine.start()
        try:
            greedy = SamplingSettings(temperature=0.0, max_tokens=3)
            stream = engine.stream_query(image, "What is it?", spatial_refs=[], settings=greedy)
            assert stream.result is None
            pieces = [p async for p in stream]
            text_only = await engine.query(None, "Why?", reasoning=False, spatial_refs=[], settings=greedy)
        finally:
            await engine.stop()
        assert stream.result is not None
        assert stream.result.finish_reason == last.text.finish_reason
        assert stream.result.metrics.output_tokens == len(last.text.tokens)
        assert stream.result.metrics.input_tokens == last.prompt_tokens > 0
        assert stream.result.metrics.image_tokens == 1 + reference_model.config.vision.grid**2
        assert "".join(pieces) == last.text.text
        assert text_only.metrics.image_tokens == 0 and text_only.metrics.input_tokens > 0

    asyncio.run(main())
