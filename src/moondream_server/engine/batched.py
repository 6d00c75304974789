"""The engine: the ``Engine`` protocol over the continuous-batching scheduler.

A request becomes a typed task (``model/tasks.py``: its settings resolved over the model's
defaults, checked at once, so bad input fails with InvalidRequestError before it queues), then
the task's decode program (built on a worker thread: it tokenizes), handed to the scheduler
thread, which owns the model. Results come back through ``loop.call_soon_threadsafe``; streams
receive every text piece as soon as its tokens are decoded. Leaving (a cancelled task, a closed
stream, a passed deadline) marks the request cancelled and the scheduler frees its slot at the
next step.

One-request-at-a-time serving (``--engine serial``) is this engine with one slot and no image
cache (``engine/loader.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Generic, Literal

from PIL import Image

from moondream_server.engine.errors import DeadlineExceededError, NotReadyError
from moondream_server.engine.image_cache import ImageCache
from moondream_server.engine.params import CaptionLength, SamplingSettings, SpatialRef
from moondream_server.engine.scheduler import Request, Scheduler, request_error
from moondream_server.engine.types import (
    Box,
    DetectResult,
    EngineInfo,
    Metrics,
    Point,
    PointResult,
    QueryResult,
    Reasoning,
    TextResult,
    TextStream,
)
from moondream_server.model.decoding import Program, TaskResult
from moondream_server.model.seam import CPU_VISION_CROPS, E, LoadedModel, ModelRuntime, OnText, P, S
from moondream_server.model.tasks import CaptionTask, QueryTask, RegionTask, Task

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000.0, 3)


class BatchedEngine(Generic[S, E, P]):
    """Continuous batching over one model. Implements ``engine.base.Engine``."""

    def __init__(
        self,
        loader: Callable[[], LoadedModel[S, E, P]],
        *,
        info: EngineInfo,
        max_queue: int = 64,
        request_timeout_s: float = 300.0,
        max_batch_size: int = 8,
        image_cache_mb: float = 2048,
        threads: int | None = None,
        max_step_tokens: int | None = None,
        max_images_per_step: int | None = None,
        max_vision_crops: int | None = None,
        kv_pool: bool | None = None,
        decode_graphs: bool | None = None,
        decode_first_s: float | None = None,
        warmup: bool = True,
    ) -> None:
        """``kv_pool``: hold the caches of ``max_batch_size`` sequences in one pool so that their
        decode steps attend in one call (None: on a GPU only, where it pays for its memory).
        ``decode_graphs``: replay those pooled decode steps from CUDA graphs (None: on CUDA).
        The other limits left None get a value for the device (see ``start``)."""
        self._loader = loader
        self._info = info
        self._max_queue = max_queue
        self._timeout = request_timeout_s
        self._max_batch_size = max_batch_size
        self._cache_bytes = int(image_cache_mb * MiB)
        self._threads = threads
        self._max_step_tokens = max_step_tokens
        self._max_images_per_step = max_images_per_step
        self._max_vision_crops = max_vision_crops
        self._kv_pool = kv_pool
        self._decode_graphs = decode_graphs
        self._decode_first_s = decode_first_s
        self._warmup = warmup
        self._ready = False
        self._stopping = False
        self.runtime: ModelRuntime[S, E, P] | None = None
        self.scheduler: Scheduler[S, E, P] | None = None
        self.image_cache: ImageCache[E] | None = None
        self.load_error: BaseException | None = None
        self._model: LoadedModel[S, E, P] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        if self._model is None:
            return self._info
        return dataclasses.replace(self._info, precision=self._model.precision_name)

    def is_ready(self) -> bool:
        return self._ready and not self._stopping

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth if self.scheduler is not None else 0

    @property
    def stats(self) -> dict[str, int]:
        """Request counters for /health and /metrics."""
        if self.scheduler is None:
            return {"completed": 0, "failed": 0, "interrupted": 0, "expired_in_queue": 0}
        s = self.scheduler.stats
        out = {
            "completed": s.completed,
            "failed": s.failed,
            # a consumer that left (even while queued) or a passed deadline
            "interrupted": s.cancelled + s.expired - s.expired_in_queue,
            "expired_in_queue": s.expired_in_queue,
            "rejected_queue_full": s.rejected,
            "active": self.scheduler.active_count,
            "steps": s.steps,
            "images_encoded": s.images_encoded,
        }
        if self.image_cache is not None:
            c = self.image_cache.stats()
            out.update(
                image_cache_hits=c.hits,
                image_cache_misses=c.misses,
                image_cache_entries=c.entries,
                image_cache_bytes=c.bytes,
            )
        return out

    async def start(self) -> None:
        if self.scheduler is not None:
            raise RuntimeError("engine already started")
        try:
            if self._threads is not None:
                import torch

                torch.set_num_threads(self._threads)
            t0 = time.perf_counter()
            model = await asyncio.to_thread(self._loader)
            self._model = model
            self._info = EngineInfo(
                model_id=model.model_id,
                revision=model.revision,
                device=model.device_name,
                dtype=model.dtype_name,
                precision=model.precision_name,
            )
            log.info("model %s loaded in %.2f s", self._info.model_id, time.perf_counter() - t0)
            if self._info.precision:
                log.info("precision: %s", self._info.precision)
            gpu = model.on_gpu
            # Per-step limits bound how long running decodes wait for new work. On a CPU a crop
            # or a prefill position costs ~100x more than on a GPU, and batching them gains
            # little there (the matrices are already large enough), so steps stay smaller.
            step_tokens = self._max_step_tokens or (4096 if gpu else 1024)
            # A GPU encodes the crops of several images faster together. A CPU gains nothing (its
            # GEMMs are compute-bound already), and a job of several images makes all of them wait
            # for the last one: one image per job, first come first served.
            images_per_job = self._max_images_per_step or (4 if gpu else 1)
            # On a GPU a job's images go through the encoder in one pass (Moondream2: 4 images of
            # up to 13 crops), not two: a second, small pass costs its launches for little work.
            vision_crops = self._max_vision_crops or (64 if gpu else CPU_VISION_CROPS)
            # On a CPU an encoder chunk or an image prefill takes many seconds: running decodes
            # get the cores for a while between them instead of waiting on every step.
            decode_first = self._decode_first_s
            if decode_first is None:
                decode_first = 0.0 if gpu else 10.0
            pool = gpu if self._kv_pool is None else self._kv_pool
            self.runtime = runtime = model.runtime(
                max_vision_crops=vision_crops,
                kv_pool_slots=self._max_batch_size if pool else 0,
                decode_graphs=self._decode_graphs,
            )
            t1 = time.perf_counter()
            await asyncio.to_thread(runtime.warm)  # before the scheduler runs
            log.info("runtime warmed (decode graphs) in %.2f s", time.perf_counter() - t1)
            if self._cache_bytes > 0:
                self.image_cache = ImageCache(self._cache_bytes, runtime.image_nbytes)
            self.scheduler = Scheduler(
                runtime,
                max_batch_size=self._max_batch_size,
                max_queue=self._max_queue,
                max_step_tokens=step_tokens,
                max_images_per_step=images_per_job,
                decode_first_s=decode_first,
                image_cache=self.image_cache,
            )
            self.scheduler.start()
            if self._warmup:
                t1 = time.perf_counter()
                two = runtime.defaults.override(max_tokens=2)
                if gpu:  # the first image's CUDA set-up and kernel choices, not a user's
                    warm = Image.new("RGB", (64, 64), (127, 127, 127))
                    await self._call(warm, CaptionTask("short", two))
                else:
                    # On a CPU a first image costs what later ones do (640x480 captions 25.9,
                    # 25.7, 25.8 s in one process, bf16, Zen 4), while an image warm-up kept
                    # the server unready for its 730-position prefill: 12 s in bf16, 18-25 s
                    # in float32. A short question without an image still runs the scheduler,
                    # the text model and the sampler once.
                    await self._call(None, QueryTask("Hello", with_image=False, settings=two))
                if self.image_cache is not None:
                    self.image_cache.clear()
                log.info("warm-up done in %.2f s", time.perf_counter() - t1)
        except BaseException as exc:
            self.load_error = exc
            log.exception("starting the engine failed")
            if self.scheduler is not None:
                await asyncio.to_thread(self.scheduler.stop)
            raise
        self._ready = True

    async def stop(self) -> None:
        self._stopping = True
        scheduler = self.scheduler
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)

    # -- admission -----------------------------------------------------------------------------
    def _parts(self) -> tuple[ModelRuntime[S, E, P], Scheduler[S, E, P]]:
        if self.runtime is None or self.scheduler is None or self._stopping or not self._ready:
            if self.load_error is not None:
                raise NotReadyError(f"the model failed to load: {self.load_error}", retry_after_s=60.0)
            raise NotReadyError()
        return self.runtime, self.scheduler

    def _starting_parts(self) -> tuple[ModelRuntime[S, E, P], Scheduler[S, E, P]]:
        """The parts while ``start`` warms up (requests other than the warm-up wait for _ready)."""
        if self.runtime is None or self.scheduler is None:
            raise NotReadyError()
        return self.runtime, self.scheduler

    def retry_after_s(self) -> float:
        """Seconds a client refused for overload should wait: the scheduler's measured drain."""
        return self.scheduler.retry_after_s() if self.scheduler is not None else 1.0

    def check_capacity(self) -> None:
        """Raise now what a submission would raise at admission (the API calls this before
        decoding an image, so a full queue costs nothing)."""
        _, scheduler = self._parts()
        scheduler.check_capacity()

    def _defaults(self) -> ModelRuntime[S, E, P]:
        runtime, _ = self._parts()
        return runtime

    # -- submission ----------------------------------------------------------------------------
    async def _submit(
        self, image: Image.Image | None, program: Program, on_done: Callable[[Request[P]], None]
    ) -> Request[P]:
        """Hash (and, on a cache miss, tile) the image on a worker thread, then queue the request
        in the place the caller reserved (see ``_reserved``).

        The scheduler thread then spends its time on the model only.
        """
        runtime, scheduler = self._starting_parts()
        deadline = scheduler.clock() + self._timeout
        key: Hashable | None = None
        payload: Image.Image | P | None = image
        if image is not None:
            key, payload = await asyncio.to_thread(self._prepare, runtime, image)
        req: Request[P] = Request(
            program=program, image=payload, image_key=key, deadline=deadline, on_done=on_done
        )
        scheduler.submit(req, reserved=True)
        return req

    async def _reserved_submit(
        self,
        image: Image.Image | None,
        task: Task,
        on_text: OnText | None,
        on_done: Callable[[Request[P]], None],
    ) -> Request[P]:
        """Reserve a queue place first (a full queue refuses at once, on the loop), then build the
        program and prepare the image on worker threads, then submit into the place."""
        _, scheduler = self._starting_parts()
        scheduler.reserve()
        try:
            return await self._submit(image, await self._program(task, on_text), on_done)
        except BaseException:
            scheduler.unreserve()  # submit() is the last step: it failed, or was never reached
            raise

    def _prepare(
        self, runtime: ModelRuntime[S, E, P], image: Image.Image
    ) -> tuple[Hashable, Image.Image | P]:
        key = runtime.image_key(image)
        if self.image_cache is not None and key in self.image_cache:
            return key, image  # the scheduler will not need the pixels (unless evicted meanwhile)
        return key, runtime.prepare(image)

    async def _program(self, task: Task, on_text: OnText | None) -> Program:
        """The task's program, built on a worker thread (building tokenizes, which must not hold
        the loop); a request that cannot be served raises InvalidRequestError here."""
        runtime, _ = self._starting_parts()
        try:
            return await asyncio.to_thread(runtime.program, task, on_text)
        except Exception as exc:
            raise request_error(exc) from exc

    async def _call(self, image: Image.Image | None, task: Task) -> tuple[TaskResult, Metrics]:
        """Submit a task and wait for it; raises the request's error."""
        _, scheduler = self._starting_parts()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Request[P]] = loop.create_future()

        def deliver(req: Request[P]) -> None:
            if not fut.done():
                fut.set_result(req)

        def on_done(req: Request[P]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(deliver, req)

        req = await self._reserved_submit(image, task, None, on_done)
        try:
            done = await asyncio.wait_for(fut, max(req.deadline - scheduler.clock(), 0.0))
        except TimeoutError:
            raise DeadlineExceededError(f"the request did not finish within {self._timeout:g} s") from None
        finally:
            req.cancel()
        if done.error is not None:
            raise done.error
        return _task_result(done), self._metrics(done)

    def _stream(self, image: Image.Image | None, task: Task) -> TextStream:
        return TextStream(lambda finish: self._pieces(image, task, finish))

    async def _pieces(
        self, image: Image.Image | None, task: Task, finish: Callable[[TextResult], None]
    ) -> AsyncGenerator[str, None]:
        _, scheduler = self._parts()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[Literal["chunk"], str] | tuple[Literal["done"], Request[P]]]
        items = asyncio.Queue()

        def send(piece: str) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(items.put_nowait, ("chunk", piece))

        def on_done(req: Request[P]) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(items.put_nowait, ("done", req))

        req = await self._reserved_submit(image, task, send, on_done)
        try:
            while True:
                remaining = req.deadline - scheduler.clock()
                try:
                    item = await asyncio.wait_for(items.get(), max(remaining, 0.0))
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"the request did not finish within {self._timeout:g} s"
                    ) from None
                if item[0] == "chunk":
                    if item[1]:
                        yield item[1]
                    continue
                done = item[1]
                if done.error is not None:
                    raise done.error
                text = _task_result(done).text
                finish(
                    TextResult(
                        text="",
                        finish_reason=text.finish_reason if text is not None else "stop",
                        metrics=self._metrics(done),
                    )
                )
                return
        finally:
            req.cancel()

    def _metrics(self, req: Request[P]) -> Metrics:
        result = req.result if isinstance(req.result, TaskResult) else TaskResult()
        start = req.started_at if req.started_at is not None else req.submitted_at
        first = req.first_output_at if req.first_output_at is not None else start
        end = req.finished_at if req.finished_at is not None else first
        image_tokens = 0 if req.image is None or self.runtime is None else self.runtime.prefix_len
        return Metrics(
            input_tokens=result.prompt_tokens,
            output_tokens=len(result.text.tokens) if result.text is not None else 0,
            prefill_time_ms=_ms(first - start),
            decode_time_ms=_ms(end - first),
            ttft_ms=_ms(first - req.submitted_at),
            image_tokens=image_tokens,
            queue_ms=_ms(start - req.submitted_at),
        )

    # -- skills: typed parameters -> a task -> typed results -------------------------------------
    def _caption_task(self, length: CaptionLength, settings: SamplingSettings) -> CaptionTask:
        return CaptionTask(length, settings.resolve(self._defaults().defaults))

    def _query_task(
        self,
        image: Image.Image | None,
        question: str,
        reasoning: bool,
        spatial_refs: Sequence[SpatialRef],
        settings: SamplingSettings,
    ) -> QueryTask:
        try:
            return QueryTask(
                question,
                with_image=image is not None,
                reasoning=reasoning,
                spatial_refs=tuple(spatial_refs),
                settings=settings.resolve(self._defaults().defaults),
            )
        except ValueError as exc:
            raise request_error(exc) from exc

    def _region_task(
        self, skill: Literal["detect", "point"], obj: str, settings: SamplingSettings
    ) -> RegionTask:
        return RegionTask(skill, obj, settings.resolve(self._defaults().defaults))

    async def caption(
        self, image: Image.Image, length: CaptionLength, settings: SamplingSettings
    ) -> TextResult:
        result, metrics = await self._call(image, self._caption_task(length, settings))
        assert result.text is not None
        return TextResult(text=result.text.text, finish_reason=result.text.finish_reason, metrics=metrics)

    def stream_caption(
        self, image: Image.Image, length: CaptionLength, settings: SamplingSettings
    ) -> TextStream:
        return self._stream(image, self._caption_task(length, settings))

    async def query(
        self,
        image: Image.Image | None,
        question: str,
        *,
        reasoning: bool,
        spatial_refs: Sequence[SpatialRef],
        settings: SamplingSettings,
    ) -> QueryResult:
        task = self._query_task(image, question, reasoning, spatial_refs, settings)
        result, metrics = await self._call(image, task)
        assert result.text is not None
        return QueryResult(
            text=result.text.text,
            finish_reason=result.text.finish_reason,
            metrics=metrics,
            reasoning=Reasoning.from_model(result.reasoning_text or "", result.grounding)
            if reasoning
            else None,
        )

    def stream_query(
        self,
        image: Image.Image | None,
        question: str,
        *,
        spatial_refs: Sequence[SpatialRef],
        settings: SamplingSettings,
    ) -> TextStream:
        return self._stream(image, self._query_task(image, question, False, spatial_refs, settings))

    async def detect(self, image: Image.Image, obj: str, settings: SamplingSettings) -> DetectResult:
        result, metrics = await self._call(image, self._region_task("detect", obj, settings))
        boxes = [Box(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in result.objects]
        return DetectResult(objects=boxes, metrics=metrics)

    async def point(self, image: Image.Image, obj: str, settings: SamplingSettings) -> PointResult:
        result, metrics = await self._call(image, self._region_task("point", obj, settings))
        return PointResult(points=[Point(p["x"], p["y"]) for p in result.objects], metrics=metrics)


def _reasoning(result: TaskResult) -> Reasoning:
    return Reasoning.from_model(result.reasoning_text or "", result.grounding)


def _task_result(req: Request[P]) -> TaskResult:
    result = req.result
    if not isinstance(result, TaskResult):
        raise RuntimeError("the program returned no result")
    return result


if TYPE_CHECKING:
    from moondream_server.engine.base import Engine

    def _implements_engine(engine: BatchedEngine[object, object, object]) -> Engine:
        return engine  # mypy checks BatchedEngine against the protocol here
