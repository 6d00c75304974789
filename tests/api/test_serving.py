"""serving: one way to run a skill for every surface, on the real tiny checkpoint in-process.

Expected values come from the model called directly (greedy), never from the serving code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from PIL import Image

from moondream_server.api import serving
from moondream_server.engine.base import Engine
from moondream_server.engine.errors import InvalidRequestError
from moondream_server.engine.types import QueryResult, SamplingSettings
from moondream_server.model import Moondream
from tests.api.support import IMAGES, open_rgb
from tests.engine.support import make_engine

T = TypeVar("T")
G = SamplingSettings(temperature=0.0, max_tokens=12)
GREEDY = {"temperature": 0.0, "max_tokens": 12}


def with_engine(body: Callable[[Engine], Awaitable[T]]) -> T:
    engine = make_engine()

    async def main() -> T:
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def drain(generation: serving.Generation) -> str:
    try:
        return "".join([p async for p in generation.pieces()])
    finally:
        await generation.aclose()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return open_rgb(IMAGES[0])


def test_streamed_and_plain_answers_are_the_models(tiny_model: Moondream, image: Image.Image) -> None:
    expected_caption = tiny_model.caption(image, length="short", settings=GREEDY)["caption"]
    expected_answer = tiny_model.query(image, "What is it?", settings=GREEDY)["answer"]

    async def body(engine: Engine) -> tuple[Any, ...]:
        caption = serving.CaptionJob(image, "short", G)
        query = serving.QueryJob(image, "What is it?", settings=G)
        streamed = await serving.stream(engine, caption)
        text = await drain(streamed)
        return (
            (await serving.run(engine, caption)).text,
            text,
            streamed.result,
            (await serving.run(engine, query)).text,
        )

    plain_caption, streamed_caption, result, answer = with_engine(body)
    assert plain_caption == streamed_caption == expected_caption
    assert answer == expected_answer
    assert result is not None and result.metrics.output_tokens > 0


def test_a_streamed_reasoning_query_is_one_piece_with_its_reasoning(
    tiny_model: Moondream, image: Image.Image
) -> None:
    expected = tiny_model.query(image, "Where is it?", reasoning=True, settings=GREEDY)

    async def body(engine: Engine) -> tuple[str, Any]:
        generation = await serving.stream(engine, serving.QueryJob(image, "Where is it?", True, (), G))
        pieces = [p async for p in generation.pieces()]
        assert len(pieces) <= 1
        return "".join(pieces), generation.result

    text, result = with_engine(body)
    assert text == expected["answer"]
    assert isinstance(result, QueryResult) and result.reasoning is not None
    assert result.reasoning.text == expected["reasoning"]["text"]


def test_errors_before_the_first_piece_are_raised_by_stream(image: Image.Image) -> None:
    async def body(engine: Engine) -> None:
        # a spatial ref without an image: the engine refuses it before generating anything
        job = serving.QueryJob(None, "What is here?", spatial_refs=[(0.5, 0.5)], settings=G)
        with pytest.raises(InvalidRequestError):
            await serving.stream(engine, job)

    with_engine(body)
