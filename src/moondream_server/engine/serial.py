"""The baseline engine: one worker thread owns the model and serves one request at a time.

* Requests wait in a bounded FIFO queue; a full queue raises :class:`QueueFullError` at once.
* Every request has a deadline (``request_timeout_s`` from admission). A request still waiting
  when it passes is dropped; a caller that stops waiting gets :class:`DeadlineExceededError`.
* Streams hand each text piece from the worker thread to the event loop as soon as it exists.
  Closing the async iterator (or its deadline passing) sets a cancel flag that the worker checks
  between pieces, so an abandoned stream stops generating.
* Non-streamed caption/query also run through the model's stream mode (its pieces join to exactly
  the non-streamed text), so a passed deadline stops them between pieces too. Reasoning queries,
  detect and point are single uninterruptible calls; their callers still get 504 on time.
* ``start()`` loads the model and runs one warm-up call on the worker thread, never on the event
  loop; ``is_ready()`` is false until both are done.
* ``stats`` counts completed, failed, interrupted (consumer gone or deadline passed while running
  or waiting) and expired_in_queue requests; ``/health`` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from moondream_server.engine.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
)
from moondream_server.engine.types import (
    Box,
    CaptionLength,
    DetectResult,
    EngineInfo,
    Metrics,
    Point,
    PointResult,
    QueryResult,
    Reasoning,
    SamplingSettings,
    SpatialRef,
    TextResult,
    TextStream,
)

log = logging.getLogger(__name__)


class ModelLike(Protocol):
    """What the engine needs from ``moondream_server.model.load(...)``'s return value."""

    model_id: str

    @property
    def revision(self) -> str | None: ...

    def caption(
        self, image: Image.Image, length: Any = ..., stream: bool = ..., settings: Any = ...
    ) -> Mapping[str, Any]: ...

    def query(
        self,
        image: Image.Image | None = ...,
        question: str = ...,
        reasoning: bool = ...,
        spatial_refs: Any = ...,
        stream: bool = ...,
        settings: Any = ...,
    ) -> Mapping[str, Any]: ...

    def detect(self, image: Image.Image, object: str, settings: Any = ...) -> Mapping[str, Any]: ...

    def point(self, image: Image.Image, object: str, settings: Any = ...) -> Mapping[str, Any]: ...


ModelLoader = Callable[[], ModelLike]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass
class _Job:
    """One admitted request. ``run`` executes on the worker thread."""

    run: Callable[[ModelLike, _Job], None]
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    on_drop: Callable[[EngineError], None] = lambda _e: None
    first_piece_at: float | None = None  # perf_counter() when the first text piece came out


_STOP = object()


class SerialEngine:
    """One request at a time on one worker thread. Implements ``engine.base.Engine``."""

    def __init__(
        self,
        loader: ModelLoader,
        *,
        info: EngineInfo,
        max_queue: int = 64,
        request_timeout_s: float = 300.0,
        threads: int | None = None,
        warmup: bool = True,
    ) -> None:
        self._loader = loader
        self._info = info
        self._max_queue = max_queue
        self._timeout = request_timeout_s
        self._threads = threads
        self._warmup = warmup
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=max_queue)
        self._model: ModelLike | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.load_error: BaseException | None = None
        # Counters, written by the worker thread only: requests run to the end, failed, or
        # stopped early because their consumer went away or their deadline passed.
        self.stats: dict[str, int] = {"completed": 0, "failed": 0, "interrupted": 0, "expired_in_queue": 0}

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    def is_ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def report(exc: BaseException | None) -> None:
            if started.done():
                return
            if exc is None:
                started.set_result(None)
            else:
                started.set_exception(exc)

        def notify(exc: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(report, exc)

        self._thread = threading.Thread(
            target=self._worker, args=(notify,), name="moondream-serial-worker", daemon=True
        )
        self._thread.start()
        await started

    async def stop(self) -> None:
        self._stopping = True
        thread = self._thread
        if thread is None:
            return
        # Fail everything still waiting, then wake the worker with the stop marker.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Job):
                job.on_drop(NotReadyError("the server is shutting down"))
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join, 30.0)
        self._thread = None

    def _worker(self, notify: Callable[[BaseException | None], None]) -> None:
        try:
            if self._threads is not None:
                import torch

                torch.set_num_threads(self._threads)
            t0 = time.perf_counter()
            model = self._loader()
            self._info = EngineInfo(
                model_id=str(getattr(model, "model_id", self._info.model_id)),
                revision=getattr(model, "revision", self._info.revision),
                device=str(getattr(model, "device", self._info.device)),
                dtype=str(getattr(model, "dtype", self._info.dtype)).removeprefix("torch."),
            )
            log.info("model %s loaded in %.2f s", self._info.model_id, time.perf_counter() - t0)
            if self._warmup:
                t1 = time.perf_counter()
                warm = Image.new("RGB", (64, 64), (127, 127, 127))
                model.caption(warm, length="short", stream=False, settings={"max_tokens": 2})
                log.info("warm-up done in %.2f s", time.perf_counter() - t1)
            self._model = model
        except BaseException as exc:
            self.load_error = exc
            log.exception("loading the model failed")
            notify(exc)
            return
        self._ready.set()
        notify(None)

        while True:
            job = self._queue.get()
            if not isinstance(job, _Job):
                break
            if job.cancel.is_set() and time.monotonic() <= job.deadline:
                self.stats["interrupted"] += 1  # its consumer left while it waited
                continue
            if time.monotonic() > job.deadline:
                self.stats["expired_in_queue"] += 1
                job.on_drop(DeadlineExceededError("the request timed out while waiting in the queue"))
                continue
            try:
                job.run(model, job)
            except BaseException:  # run() reports its own errors; this is a last resort
                log.exception("unexpected error in the worker")

    # -- admission -----------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise what admission would raise now (lets the API refuse before decoding an image)."""
        self._check_ready()
        if self._queue.full():
            raise QueueFullError(f"the request queue is full ({self._max_queue} waiting)", retry_after_s=1.0)

    def _check_ready(self) -> None:
        if not self.is_ready():
            if self.load_error is not None:
                raise NotReadyError(f"the model failed to load: {self.load_error}", retry_after_s=60.0)
            raise NotReadyError()

    def _admit(self, job: _Job) -> None:
        self._check_ready()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the request queue is full ({self._max_queue} waiting)", retry_after_s=1.0
            ) from None

    async def _call(self, fn: Callable[[ModelLike, _Job], Any]) -> tuple[Any, dict[str, Any]]:
        """Run ``fn(model, job)`` on the worker; returns (result, details of the run)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, dict[str, Any]]] = loop.create_future()

        def deliver(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def send(ok: bool, value: Any) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, ok, value)

        def run(model: ModelLike, job: _Job) -> None:
            t0 = time.perf_counter()
            try:
                result = fn(model, job)
            except _Interrupted:
                self.stats["interrupted"] += 1
                send(False, DeadlineExceededError(f"the request did not finish within {self._timeout:g} s"))
            except Exception as exc:
                self.stats["failed"] += 1
                send(False, _translate(exc))
            else:
                self.stats["completed"] += 1
                details = _details(model, time.perf_counter() - t0)
                first = getattr(model, "last_first_output_at", None) or job.first_piece_at
                if first is not None:
                    details["ttft_secs"] = first - t0
                send(True, (result, details))

        job = _Job(run=run, deadline=time.monotonic() + self._timeout)
        job.on_drop = lambda e: send(False, e)
        self._admit(job)
        try:
            return await asyncio.wait_for(fut, self._timeout)
        except TimeoutError:
            raise DeadlineExceededError(f"the request did not finish within {self._timeout:g} s") from None
        finally:
            job.cancel.set()

    def _stream(self, fn: Callable[[ModelLike], Iterator[str]], *, with_image: bool = True) -> TextStream:
        return TextStream(lambda finish: self._pieces(fn, finish, with_image))

    async def _pieces(
        self, fn: Callable[[ModelLike], Iterator[str]], finish: Callable[[TextResult], None], with_image: bool
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def send(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))

        def run(model: ModelLike, job: _Job) -> None:
            t0 = time.perf_counter()
            try:
                for piece in _interruptible(fn(model), job):
                    if piece:
                        send("chunk", piece)
            except _Interrupted:
                self.stats["interrupted"] += 1
                if job.cancel.is_set():  # the consumer is gone; nobody reads this
                    send("done", None)
                else:
                    send(
                        "error",
                        DeadlineExceededError(f"the request did not finish within {self._timeout:g} s"),
                    )
            except Exception as exc:
                self.stats["failed"] += 1
                send("error", _translate(exc))
            else:
                self.stats["completed"] += 1
                details = _details(model, time.perf_counter() - t0)
                first = getattr(model, "last_first_output_at", None) or job.first_piece_at
                if first is not None:
                    details["ttft_secs"] = first - t0
                send(
                    "done",
                    TextResult(
                        text="",
                        finish_reason=_finish(details),
                        metrics=_metrics(details, with_image=with_image),
                    ),
                )

        job = _Job(run=run, deadline=time.monotonic() + self._timeout)
        job.on_drop = lambda e: send("error", e)
        self._admit(job)
        try:
            while True:
                remaining = job.deadline - time.monotonic()
                try:
                    kind, value = await asyncio.wait_for(items.get(), max(remaining, 0.0))
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"the request did not finish within {self._timeout:g} s"
                    ) from None
                if kind == "chunk":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    if value is not None:
                        finish(value)
                    return
        finally:
            job.cancel.set()

    # -- skills --------------------------------------------------------------------------------

    async def caption(
        self, image: Image.Image, length: CaptionLength, settings: SamplingSettings
    ) -> TextResult:
        sd = settings.as_model_settings()
        # Generated through the model's stream mode (whose pieces join to exactly the
        # non-streamed text) so that a passed deadline stops the generation between tokens.
        text, det = await self._call(
            lambda m, job: _join(m.caption(image, length=length, stream=True, settings=sd)["caption"], job)
        )
        return TextResult(text=text, finish_reason=_finish(det), metrics=_metrics(det))

    def stream_caption(
        self, image: Image.Image, length: CaptionLength, settings: SamplingSettings
    ) -> TextStream:
        sd = settings.as_model_settings()
        return self._stream(
            lambda m: iter(m.caption(image, length=length, stream=True, settings=sd)["caption"])
        )

    async def query(
        self,
        image: Image.Image | None,
        question: str,
        *,
        reasoning: bool,
        spatial_refs: Sequence[SpatialRef],
        settings: SamplingSettings,
    ) -> QueryResult:
        sd = settings.as_model_settings()
        refs = [list(r) for r in spatial_refs] or None

        def run(m: ModelLike, job: _Job) -> tuple[str, Any]:
            if reasoning:  # reasoning has no stream mode: one uninterruptible call
                out = m.query(
                    image=image,
                    question=question,
                    reasoning=True,
                    spatial_refs=refs,
                    stream=False,
                    settings=sd,
                )
                return str(out["answer"]), out.get("reasoning")
            out = m.query(image=image, question=question, spatial_refs=refs, stream=True, settings=sd)
            return _join(out["answer"], job), None

        (text, raw_reasoning), det = await self._call(run)
        return QueryResult(
            text=text,
            finish_reason=_finish(det),
            metrics=_metrics(det, with_image=image is not None),
            reasoning=_reasoning(raw_reasoning),
        )

    def stream_query(
        self,
        image: Image.Image | None,
        question: str,
        *,
        spatial_refs: Sequence[SpatialRef],
        settings: SamplingSettings,
    ) -> TextStream:
        sd = settings.as_model_settings()
        refs = [list(r) for r in spatial_refs] or None
        return self._stream(
            lambda m: iter(
                m.query(image=image, question=question, spatial_refs=refs, stream=True, settings=sd)["answer"]
            ),
            with_image=image is not None,
        )

    async def detect(self, image: Image.Image, obj: str, settings: SamplingSettings) -> DetectResult:
        sd = settings.as_model_settings()
        out, det = await self._call(lambda m, _job: m.detect(image, obj, settings=sd))
        boxes = [
            Box(float(o["x_min"]), float(o["y_min"]), float(o["x_max"]), float(o["y_max"]))
            for o in out["objects"]
        ]
        return DetectResult(objects=boxes, metrics=_metrics(det))

    async def point(self, image: Image.Image, obj: str, settings: SamplingSettings) -> PointResult:
        sd = settings.as_model_settings()
        out, det = await self._call(lambda m, _job: m.point(image, obj, settings=sd))
        points = [Point(float(p["x"]), float(p["y"])) for p in out["points"]]
        return PointResult(points=points, metrics=_metrics(det))


class _Interrupted(Exception):
    """The job's consumer went away or its deadline passed; raised on the worker thread."""


def _interruptible(pieces: Iterable[str], job: _Job) -> Iterator[str]:
    """Yield the pieces, stopping (and closing the model's generator) once the job is cancelled."""
    it = iter(pieces)
    try:
        for piece in it:
            if job.cancel.is_set() or time.monotonic() > job.deadline:
                raise _Interrupted
            if piece and job.first_piece_at is None:
                job.first_piece_at = time.perf_counter()
            yield piece
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _join(pieces: Iterable[str], job: _Job) -> str:
    return "".join(_interruptible(pieces, job))


def _translate(exc: Exception) -> Exception:
    """Model errors caused by the request become InvalidRequestError (HTTP 400)."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, ValueError):
        return InvalidRequestError(str(exc) or "invalid request")
    return exc


def _last_result(model: ModelLike) -> Any:
    """The model's record of its last run (token counts, finish reason), if it keeps one."""
    return getattr(model, "last_result", None)


def _details(model: ModelLike, secs: float) -> dict[str, Any]:
    """Token counts and finish reason of the call that just ran, read on the worker thread."""
    out: dict[str, Any] = {"secs": secs, "prefix_len": int(getattr(model, "prefix_len", 0) or 0)}
    last = _last_result(model)
    if last is not None:
        out["input_tokens"] = int(getattr(last, "prompt_tokens", 0) or 0)
        text = getattr(last, "text", None)
        if text is not None:
            out["output_tokens"] = len(getattr(text, "tokens", ()) or ())
            out["finish_reason"] = getattr(text, "finish_reason", "stop")
    return out


def _finish(details: Mapping[str, Any]) -> Any:
    reason = details.get("finish_reason", "stop")
    return reason if reason in ("stop", "length") else "stop"


def _metrics(details: Mapping[str, Any], *, with_image: bool = True) -> Metrics:
    """Token counts from the model; times measured on the worker around the call.

    ttft is the time to the first generated token (the model records when its prompt prefill
    ended; else the first text piece), decode time the rest of the call.
    """
    total = float(details.get("secs", 0.0))
    ttft = float(details.get("ttft_secs", 0.0))
    return Metrics(
        input_tokens=int(details.get("input_tokens", 0)),
        output_tokens=int(details.get("output_tokens", 0)),
        decode_time_ms=_ms(total - ttft),
        ttft_ms=_ms(ttft),
        image_tokens=int(details.get("prefix_len", 0)) if with_image else 0,
    )


def _reasoning(raw: Any) -> Reasoning | None:
    if not isinstance(raw, Mapping):
        return None
    return Reasoning.from_model(str(raw.get("text", "")), raw.get("grounding", []))
