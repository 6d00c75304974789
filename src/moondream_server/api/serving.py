"""Running a skill on the engine for any surface: plainly, or streamed.

A surface (cloud ``/v1``, seed, OpenAI, Ollama, ...) parses its own request into one of the jobs
below, hands it to :func:`run` or :func:`stream`, and renders what comes back in its own format.
What every surface would otherwise repeat lives here once:

* which engine call serves which job;
* a streamed query with ``reasoning`` is not streamed token by token (the model has no stream
  mode for it, as in the cloud): it runs plainly and comes back as a one-piece stream;
* a stream's first piece is awaited before the surface starts its response, so every error
  known by then (queue full, not ready, deadline, invalid request) is a real HTTP status and
  only later ones must be reported in-band.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from PIL import Image

from moondream_server.api.metrics import observe_generation
from moondream_server.engine.base import Engine
from moondream_server.engine.types import (
    CaptionLength,
    DetectResult,
    PointResult,
    QueryResult,
    SamplingSettings,
    SpatialRef,
    TextResult,
    TextStream,
)


@dataclass(frozen=True)
class CaptionJob:
    image: Image.Image
    length: CaptionLength = "normal"
    settings: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass(frozen=True)
class QueryJob:
    image: Image.Image | None  # None: a text-only question
    question: str
    reasoning: bool = False
    spatial_refs: Sequence[SpatialRef] = ()
    settings: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass(frozen=True)
class DetectJob:
    image: Image.Image
    object: str
    settings: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass(frozen=True)
class PointJob:
    image: Image.Image
    object: str
    settings: SamplingSettings = field(default_factory=SamplingSettings)


TextJob = CaptionJob | QueryJob
Job = CaptionJob | QueryJob | DetectJob | PointJob


def new_request_id(skill: str) -> str:
    return f"{time.strftime('%Y-%m-%d', time.gmtime())}_{skill}_{secrets.token_hex(8)}"


@overload
async def run(engine: Engine, job: CaptionJob) -> TextResult: ...
@overload
async def run(engine: Engine, job: QueryJob) -> QueryResult: ...
@overload
async def run(engine: Engine, job: DetectJob) -> DetectResult: ...
@overload
async def run(engine: Engine, job: PointJob) -> PointResult: ...


async def run(engine: Engine, job: Job) -> TextResult | DetectResult | PointResult:
    """The whole answer at once."""
    result: TextResult | DetectResult | PointResult
    match job:
        case CaptionJob():
            result = await engine.caption(job.image, job.length, job.settings)
        case QueryJob():
            result = await engine.query(
                job.image,
                job.question,
                reasoning=job.reasoning,
                spatial_refs=job.spatial_refs,
                settings=job.settings,
            )
        case DetectJob():
            result = await engine.detect(job.image, job.object, job.settings)
        case PointJob():
            result = await engine.point(job.image, job.object, job.settings)
    observe_generation(task_of(job), result.metrics)
    return result


def task_of(job: Job) -> str:
    return {CaptionJob: "caption", QueryJob: "query", DetectJob: "detect", PointJob: "point"}[type(job)]


class Generation:
    """A streamed answer whose first piece has already been produced (or which had none).

    Iterate it once for the text pieces; an engine error after the first piece is raised from the
    iteration (the surface reports it in-band). Once drained, ``result`` holds the finish reason and
    metrics (a :class:`QueryResult` with the reasoning for a reasoning query). ``aclose`` stops the
    generation; a surface calls it when its response ends, however it ends.
    """

    def __init__(
        self,
        first: str | None,
        rest: TextStream | None = None,
        result: TextResult | None = None,
        task: str | None = None,
    ) -> None:
        self._first = first
        self._rest = rest
        self._result = result
        self._task = task  # set: report the finished stream's metrics (see api/metrics.py)

    @property
    def result(self) -> TextResult | None:
        if self._result is not None:
            return self._result
        return self._rest.result if self._rest is not None else None

    async def pieces(self) -> AsyncIterator[str]:
        if self._first:
            yield self._first
        if self._rest is not None:
            async for piece in self._rest:
                if piece:
                    yield piece

    async def aclose(self) -> None:
        if self._rest is not None:
            await self._rest.aclose()
        result, task = self.result, self._task
        self._task = None
        if result is not None and task is not None:
            observe_generation(task, result.metrics)


async def stream(engine: Engine, job: TextJob) -> Generation:
    """Start a streamed answer; errors up to its first piece are raised here."""
    if isinstance(job, QueryJob) and job.reasoning:
        result = await run(engine, job)
        return Generation(result.text or None, result=result)
    if isinstance(job, CaptionJob):
        pieces = engine.stream_caption(job.image, job.length, job.settings)
    else:
        pieces = engine.stream_query(
            job.image, job.question, spatial_refs=job.spatial_refs, settings=job.settings
        )
    try:
        first: str | None = await anext(pieces)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await pieces.aclose()
        raise
    return Generation(first, pieces, task=task_of(job))
