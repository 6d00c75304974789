"""Continuous batching: one thread owns the model and advances many requests per forward step.

Every request is a decode *program* (``model/decoding.py``): a generator that yields the input
embeddings it wants fed next and receives the output of the last fed position. The scheduler
keeps up to ``max_batch_size`` programs active and, on every iteration:

1. drops requests that were cancelled or passed their deadline (waiting or active), freeing
   their slots;
2. admits waiting requests in FIFO order into free slots. A request about an image first looks
   the image up in the image cache (hit: its sequence starts from a copy of the cached prefix);
   a request about an image another active request is already encoding waits for that one;
3. advances the vision job: the crops of several newly needed images are encoded together,
   one chunk of crops per iteration (``Runtime.start_vision``), so a large image delays the
   running decodes by one chunk at a time, not by its whole encoding;
4. runs ONE packed text-model forward over the decode tokens of every running sequence, the
   prompt prefills of new ones (chunked so the step stays under ``max_step_tokens``) and image
   prefills (730 positions; never chunked, so a step exceeds the budget by at most one image
   prefix). Outputs go back to the programs, which yield their next input or finish.

Admission: ``submit`` refuses at once (QueueFullError, with a Retry-After estimated from how
long requests hold a slot) when ``max_queue`` requests already wait beyond the free slots.

Errors raised by one program (e.g. a prompt that does not fit) fail that request only; an input
that would overflow a sequence's context is refused before the step; an exception in the
forward or the vision pass fails the requests it involved, and the thread keeps serving. The
scheduler can also be driven by hand (``run_once``) for tests.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field
from typing import Generic, Literal

import torch
from PIL import Image

from moondream_server.engine.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
)
from moondream_server.engine.image_cache import ImageCache
from moondream_server.model.decoding import StepOutput
from moondream_server.model.seam import E, ModelRuntime, P, S, StepItem, VisionJob

log = logging.getLogger(__name__)


class CancelledRequestError(EngineError):
    """The caller stopped waiting (disconnect, closed stream); nobody reads this error."""


# A decode program: yields inputs [positions, dim], receives StepOutputs, returns its result.
AnyProgram = Generator[torch.Tensor, StepOutput, object]


@dataclass(eq=False)
class Request(Generic[P]):
    """One submitted task. ``on_done`` is called exactly once, on the scheduler thread."""

    program: AnyProgram
    image: Image.Image | P | None  # an image or the runtime's prepared form; None = text only
    deadline: float  # on the scheduler's clock
    on_done: Callable[[Request[P]], None] = lambda _r: None
    image_key: Hashable | None = None  # precomputed off the scheduler thread (else computed here)
    result: object = None  # the program's return value
    error: BaseException | None = None
    # timestamps on the scheduler's clock
    submitted_at: float = 0.0
    started_at: float | None = None  # got a slot
    first_output_at: float | None = None  # prefill done (first output sent to the program)
    finished_at: float | None = None
    image_cache_hit: bool = False
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _done: bool = False

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (thread-safe, idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done


Phase = Literal["need_vision", "vision", "wait_image", "image_prefill", "run"]


@dataclass(eq=False)
class _Seq(Generic[S, P]):
    req: Request[P]
    order: int
    phase: Phase = "run"
    key: Hashable | None = None
    handle: S | None = None
    pending: torch.Tensor | None = None  # input still to feed [positions, dim]
    decoding: bool = False  # got its first output: later inputs are decode steps
    followers: list[_Seq[S, P]] = field(default_factory=list)  # waiting for this seq's image
    solo: bool = False  # encode its image in a job of its own (a shared one failed)

    def input(self) -> torch.Tensor:
        """What it feeds next (only asked of sequences that have something to feed)."""
        assert self.pending is not None
        return self.pending

    def sequence(self) -> S:
        """Its sequence (only asked once it has one)."""
        assert self.handle is not None
        return self.handle

    def image(self) -> Image.Image | P:
        assert self.req.image is not None
        return self.req.image


@dataclass
class SchedulerStats:
    steps: int = 0
    step_tokens: int = 0
    max_step_tokens: int = 0
    vision_passes: int = 0  # vision jobs finished
    vision_steps: int = 0  # encoder chunks run
    images_encoded: int = 0
    image_prefills: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    expired_in_queue: int = 0  # part of expired: never got a slot
    cancelled_in_queue: int = 0  # part of cancelled: never got a slot
    rejected: int = 0
    step_sizes: list[int] = field(default_factory=list)  # sequences per step (recent)


class Scheduler(Generic[S, E, P]):
    def __init__(
        self,
        runtime: ModelRuntime[S, E, P],
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_step_tokens: int = 1024,
        max_images_per_step: int = 8,
        image_cache: ImageCache[E] | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_prefill_chunk: int = 32,
        decode_first_s: float = 0.0,
    ) -> None:
        """``decode_first_s`` > 0: while sequences are decoding, heavy work (vision chunks, image
        prefills) waits until the decodes have had that many seconds since the last heavy step,
        so running requests finish instead of stalling behind every new image (CPUs, where one
        encoder chunk takes seconds). 0: heavy work joins every step (GPUs)."""
        if max_batch_size < 1 or max_queue < 0 or max_step_tokens < 1 or max_images_per_step < 1:
            raise ValueError("scheduler limits must be positive")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_step_tokens = max_step_tokens
        self.max_images_per_step = max_images_per_step
        self.min_prefill_chunk = min_prefill_chunk
        self.decode_first_s = decode_first_s
        self._last_heavy_at = float("-inf")  # clock time at the end of the last heavy work
        self.image_cache = image_cache
        self.clock = clock
        self.stats = SchedulerStats()
        self._waiting: collections.deque[Request[P]] = collections.deque()
        self._active: list[_Seq[S, P]] = []
        self._inflight: dict[Hashable, _Seq[S, P]] = {}  # image key -> the seq encoding it
        self._purged: list[Request[P]] = []  # cancelled while waiting, dropped by submit()
        self._job: tuple[VisionJob, list[_Seq[S, P]]] | None = None  # the vision job under way
        self._reserved = 0  # queue places taken by requests still being prepared
        self._admit_gaps: collections.deque[float] = collections.deque(maxlen=8)  # while draining
        self._last_admit_at: float | None = None
        self._slot_times: collections.deque[float] = collections.deque(maxlen=16)  # completed, recent
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- submission (any thread) -------------------------------------------------------------
    def reserve(self) -> None:
        """Take a queue place now for a request still being prepared (its program built, its
        image tiled on worker threads), or raise QueueFullError at once. A burst is then refused
        while it arrives, not after each refused request has waited for those threads.
        ``submit(reserved=True)`` uses the place; ``unreserve()`` gives it back."""
        with self._cond:
            self._check_capacity_locked()
            self._reserved += 1

    def unreserve(self) -> None:
        with self._cond:
            self._reserved = max(0, self._reserved - 1)

    def submit(self, req: Request[P], *, reserved: bool = False) -> None:
        """Queue a request; raises QueueFullError at once when ``max_queue`` are already waiting
        (unless it holds a reservation)."""
        with self._cond:
            if reserved:
                if self._closed:  # the reservation stays the caller's to give back
                    raise NotReadyError("the server is shutting down")
                self._reserved = max(0, self._reserved - 1)
            else:
                self._check_capacity_locked()
            req.submitted_at = self.clock()
            self._waiting.append(req)
            self._cond.notify()

    def check_capacity(self) -> None:
        """Raise what ``submit`` would raise now (lets callers refuse before preparing an image)."""
        with self._cond:
            self._check_capacity_locked()

    def _free_slots(self) -> int:
        # Read from submitting threads without the scheduler's cooperation: a close estimate.
        return max(0, self.max_batch_size - len(self._active))

    def _check_capacity_locked(self) -> None:
        """``max_queue`` requests may wait; those that free slots will take at once do not count."""
        if self._closed:
            raise NotReadyError("the server is shutting down")
        limit = self.max_queue + self._free_slots()
        if len(self._waiting) + self._reserved >= limit:
            self._purge_waiting_locked()
        if len(self._waiting) + self._reserved >= limit:
            self.stats.rejected += 1
            raise QueueFullError(
                f"the request queue is full ({self.max_queue} waiting)",
                retry_after_s=self._retry_after_locked(),
            )

    def _purge_waiting_locked(self) -> None:
        """Drop waiting requests nobody waits for any more, so they do not hold queue places."""
        if not any(r.cancelled for r in self._waiting):
            return
        keep: collections.deque[Request[P]] = collections.deque()
        for r in self._waiting:
            (self._purged if r.cancelled else keep).append(r)
        self._waiting = keep  # the scheduler thread finishes the purged ones at its next reap

    def retry_after_s(self) -> float:
        """What a refused client is told to wait (see ``_retry_after_locked``)."""
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> float:
        """Whole seconds until the requests waiting now have all got a slot (at least 1).

        Measured drain: while the queue has been draining, the mean of the recent gaps between
        one waiting request getting its slot and the next, once per waiting request beyond the
        free slots. Before
        that (no backlog seen yet): a slot is held for the mean of the recent measured times in a slot
        (before any request finished: twice the age of the oldest running one, which is on
        average half done). Each
        running request frees its slot when that time is up (at once if it is past it), and a
        slot then serves one waiting request after another, in order; the estimate is when the
        last waiting one gets its slot. Bounded by the deadline: every waiting request has left
        by its own deadline at the latest, served or expired.
        """
        now = self.clock()
        waiting = len(self._waiting) + self._reserved
        if len(self._admit_gaps) >= 2:
            # Measured directly: the recent gaps between a waiting request's slot and the next.
            ahead = max(0, waiting - self._free_slots())  # those beyond the free slots wait a gap each
            estimate = ahead * sum(self._admit_gaps) / len(self._admit_gaps)
            if self._waiting:
                estimate = min(estimate, max(r.deadline for r in self._waiting) - now)
            return float(max(round(estimate), 1))
        ages = [now - s.req.started_at for s in self._active if s.req.started_at is not None]
        if self._slot_times:
            per_slot = sum(self._slot_times) / len(self._slot_times)
        else:
            per_slot = 2 * max(ages, default=0.0)
        # When each slot frees next: running requests when their time is up, free slots now.
        frees = [max(per_slot - age, 0.0) for age in ages]
        frees += [0.0] * max(0, self.max_batch_size - len(frees))
        heapq.heapify(frees)
        estimate = 0.0
        for _ in range(waiting):
            estimate = heapq.heappop(frees)  # the next waiting request starts here ...
            heapq.heappush(frees, estimate + per_slot)  # ... and holds the slot this long
        if self._waiting:
            estimate = min(estimate, max(r.deadline for r in self._waiting) - now)
        return float(max(round(estimate), 1))

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot (briefly including those about to take a free one)."""
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._thread = threading.Thread(target=self._loop, name="moondream-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail every waiting and active request with NotReadyError and end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            self._thread = None
        self._shutdown_requests()

    def _shutdown_requests(self) -> None:
        with self._cond:
            waiting = self._purged + list(self._waiting)
            self._waiting.clear()
            self._purged = []
        for r in waiting:
            self._finish(r, error=NotReadyError("the server is shutting down"))
        for s in list(self._active):
            self._drop(s, NotReadyError("the server is shutting down"))

    def _fail_active(self, error: BaseException) -> None:
        """Last resort: drop every active sequence (their state may be inconsistent)."""
        self._job = None
        self._inflight.clear()
        for s in list(self._active):
            s.followers = []
            self._drop(s, error)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait(1.0)
                if self._closed:
                    return
            try:
                busy = self.run_once()
            except Exception as exc:  # a bug, not a request's fault: never let the thread die
                log.exception("unexpected error in the scheduler loop; failing the active requests")
                self._fail_active(exc)
                busy = False
            if not busy:
                with self._cond:
                    self._cond.wait(0.01)

    # -- one iteration -----------------------------------------------------------------------
    def run_once(self) -> bool:
        """Reap, admit, encode and run one packed step. Returns False when there was nothing to do."""
        with self.runtime.session():
            now = self.clock()
            self._reap(now)
            self._admit(now)
            did_vision = self._vision()
            did_step = self._step()
        return did_vision or did_step

    def _reap(self, now: float) -> None:
        expired: list[Request[P]] = []
        with self._cond:
            cancelled, self._purged = self._purged, []
            if any(r.cancelled or now > r.deadline for r in self._waiting):
                keep: collections.deque[Request[P]] = collections.deque()
                for r in self._waiting:
                    if r.cancelled:
                        cancelled.append(r)
                    elif now > r.deadline:
                        expired.append(r)
                    else:
                        keep.append(r)
                self._waiting = keep
        for r in cancelled:
            self.stats.cancelled_in_queue += 1
            self._finish(r, error=CancelledRequestError("cancelled"))
        for r in expired:
            self.stats.expired_in_queue += 1
            self._finish(r, error=DeadlineExceededError("the request timed out while waiting in the queue"))
        for s in list(self._active):
            if s.req.cancelled:
                self._drop(s, CancelledRequestError("cancelled"))
            elif now > s.req.deadline:
                self._drop(s, DeadlineExceededError("the request did not finish before its deadline"))

    def _admit(self, now: float) -> None:
        admitted: list[Request[P]] = []
        with self._cond:
            while self._waiting and len(self._active) + len(admitted) < self.max_batch_size:
                admitted.append(self._waiting.popleft())
        prev = self._last_admit_at
        if admitted:
            self._last_admit_at = now
        # Those already waiting at the previous admission got their slots in this gap: the queue
        # draining (k slots freed at once: k admissions in one gap).
        drained = [r for r in admitted if prev is not None and r.submitted_at <= prev]
        for _ in drained:
            assert prev is not None
            self._admit_gaps.append((now - prev) / len(drained))
        for r in admitted:
            r.started_at = now
            seq: _Seq[S, P] = _Seq(req=r, order=next(self._order))
            self._active.append(seq)
            if r.image is None:
                self._begin(seq, None)
                continue
            try:
                seq.key = r.image_key if r.image_key is not None else self.runtime.image_key(r.image)
            except Exception as exc:
                self._drop(seq, request_error(exc))
                continue
            cached = self.image_cache.get(seq.key) if self.image_cache is not None else None
            if cached is not None:
                r.image_cache_hit = True
                self._begin(seq, cached)
            elif seq.key in self._inflight:
                seq.phase = "wait_image"
                self._inflight[seq.key].followers.append(seq)
            else:
                seq.phase = "need_vision"
                self._inflight[seq.key] = seq

    def _begin(self, seq: _Seq[S, P], encoded: E | None) -> None:
        """Open the sequence (from an encoded image or empty) and start its program."""
        try:
            if seq.handle is None:
                seq.handle = self.runtime.new_sequence(encoded)
            seq.phase = "run"
            seq.pending = next(seq.req.program)
        except StopIteration as stop:
            self._complete(seq, stop.value)
        except Exception as exc:
            self._drop(seq, request_error(exc))

    def _heavy_allowed(self) -> bool:
        """May vision chunks and image prefills run now (see ``decode_first_s``)?"""
        if self.decode_first_s <= 0:
            return True
        if not any(s.decoding and s.pending is not None for s in self._active):
            return True
        return self.clock() - self._last_heavy_at >= self.decode_first_s

    def _encoded_not_decoding(self) -> bool:
        """Is a sequence past its vision pass but not yet decoding (image or prompt prefill due)?"""
        due = ("image_prefill", "run")
        return any(s.pending is not None and not s.decoding and s.phase in due for s in self._active)

    def _vision(self) -> bool:
        """Advance the vision job by one chunk of crops (starting one for new images if idle)."""
        if not self._heavy_allowed():
            return False
        if self._job is None and self.decode_first_s > 0 and self._encoded_not_decoding():
            return False  # first come first served: earlier images get to their first token first
        if self._job is None:
            waiting = [s for s in self._active if s.phase == "need_vision"]
            if not waiting:
                return False
            if waiting[0].solo:  # retried alone after a batch it was part of failed
                todo = waiting[:1]
            else:
                todo = [s for s in waiting if not s.solo][: self.max_images_per_step]
            try:
                job = self.runtime.start_vision([s.image() for s in todo])
            except Exception as exc:
                self._vision_failed(todo, exc)
                return True
            for s in todo:
                s.phase = "vision"
            self._job = (job, todo)
        job, seqs = self._job
        try:
            done = job.step()
            results = job.results() if done else None
        except Exception as exc:
            self._job = None
            self._vision_failed(seqs, exc)
            return True
        finally:
            self._last_heavy_at = self.clock()
        self.stats.vision_steps += 1
        if results is None:
            return True
        self._job = None
        self.stats.vision_passes += 1
        for s, emb in zip(seqs, results, strict=True):
            target = s
            if s not in self._active:
                # It left meanwhile; a follower that took over the image can use the result.
                heir = self._inflight.get(s.key) if s.key is not None else None
                if heir is None or heir.phase != "need_vision":
                    continue
                target = heir
            self.stats.images_encoded += 1
            try:
                target.handle = self.runtime.new_image_sequence()
                target.pending = self.runtime.image_prefill_input(emb)
            except Exception as exc:
                self._drop(target, request_error(exc), fail_followers=True)
                continue
            target.phase = "image_prefill"
        return True

    def _vision_failed(self, seqs: list[_Seq[S, P]], exc: Exception) -> None:
        live = [s for s in seqs if s in self._active]
        if len(seqs) == 1:
            log.warning("vision encoder failed: %s", exc)
            for s in live:
                self._drop(s, request_error(exc), fail_followers=True)
            return
        log.warning("vision encoder failed on a batch of %d images; retrying one by one", len(seqs))
        for s in live:
            s.phase = "need_vision"
            s.solo = True

    def _plan(self) -> list[tuple[_Seq[S, P], int]]:
        """Which sequences feed how many positions this step."""
        plan: list[tuple[_Seq[S, P], int]] = []
        total = 0
        ready = [s for s in self._active if s.phase in ("run", "image_prefill") and s.pending is not None]
        # Running decodes first: they are never held back, so their latency stays bounded.
        for s in ready:
            if s.decoding:
                n = int(s.input().shape[0])
                plan.append((s, n))
                total += n
        any_prefill = False
        heavy_ok = self._heavy_allowed()
        for s in sorted((s for s in ready if not s.decoding), key=lambda s: s.order):
            n = int(s.input().shape[0])
            room = self.max_step_tokens - total
            if s.phase == "image_prefill":
                if not heavy_ok:
                    continue
                # Cannot be chunked (the image prefix attends bidirectionally).
                if n > room and any_prefill:
                    continue
                take = n
            elif n <= room:
                take = n
            elif room >= self.min_prefill_chunk or (not any_prefill and room > 0):
                take = room
            elif not any_prefill:
                take = min(n, self.min_prefill_chunk)
            else:
                continue
            plan.append((s, take))
            total += take
            any_prefill = True
        return plan

    def _fits(self, s: _Seq[S, P]) -> bool:
        """Drop a sequence whose next input would overflow the context (it would fail the step)."""
        used, limit = self.runtime.room(s.sequence())
        needed = used + int(s.input().shape[0])
        if needed <= limit:
            return True
        message = f"sequence of {needed} positions exceeds the model context of {limit}"
        self._drop(s, InvalidRequestError(message))
        return False

    def _step(self) -> bool:
        for s in [s for s in self._active if s.pending is not None and s.handle is not None]:
            self._fits(s)
        plan = self._plan()
        if not plan:
            return False
        items: list[StepItem[S]] = []
        for s, take in plan:
            pending = s.input()
            n = int(pending.shape[0])
            x = pending if take == n else pending[:take]
            items.append(StepItem(seq=s.sequence(), x=x, want_output=take == n and s.phase == "run"))
        try:
            outputs = self.runtime.forward(items)
        except Exception as exc:
            log.exception("forward step failed; failing the %d requests in it", len(plan))
            for s, _ in plan:
                self._drop(s, exc, fail_followers=True)
            return True
        tokens = sum(t for _, t in plan)
        if any(s.phase == "image_prefill" for s, _ in plan):
            self._last_heavy_at = self.clock()
        self.stats.steps += 1
        self.stats.step_tokens += tokens
        self.stats.max_step_tokens = max(self.stats.max_step_tokens, tokens)
        self.stats.step_sizes.append(len(plan))
        if len(self.stats.step_sizes) > 1024:
            del self.stats.step_sizes[:512]
        now = self.clock()
        for (s, take), out in zip(plan, outputs, strict=True):
            pending = s.input()
            if take < int(pending.shape[0]):
                s.pending = pending[take:]
                continue
            s.pending = None
            if s.phase == "image_prefill":
                self._image_ready(s)
            else:
                assert out is not None
                self._advance(s, out, now)
        return True

    def _image_ready(self, s: _Seq[S, P]) -> None:
        self.stats.image_prefills += 1
        encoded: E | None = None
        try:
            encoded = self.runtime.snapshot_image(s.sequence())
        except Exception as exc:
            self._drop(s, request_error(exc), fail_followers=True)
            return
        if s.key is not None:
            self._inflight.pop(s.key, None)
            if self.image_cache is not None:
                self.image_cache.put(s.key, encoded)
        followers, s.followers = s.followers, []
        self._begin(s, None)  # continues in the sequence that holds the prefix
        for f in followers:
            if f in self._active:
                self._begin(f, encoded)

    def _advance(self, s: _Seq[S, P], out: StepOutput, now: float) -> None:
        if s.req.first_output_at is None:
            s.req.first_output_at = now
        s.decoding = True
        try:
            s.pending = s.req.program.send(out)
        except StopIteration as stop:
            self._complete(s, stop.value)
        except Exception as exc:
            self._drop(s, request_error(exc))

    # -- leaving -----------------------------------------------------------------------------
    def _complete(self, s: _Seq[S, P], value: object) -> None:
        self._remove(s)
        self._finish(s.req, result=value)

    def _drop(self, s: _Seq[S, P], error: BaseException, *, fail_followers: bool = False) -> None:
        """Remove a sequence with an error; its followers get the error or take over the image."""
        prefill = s.pending if s.phase == "image_prefill" else None  # encoded, not yet prefilled
        self._remove(s)
        with contextlib.suppress(Exception):
            s.req.program.close()
        self._finish(s.req, error=error)
        followers = [f for f in s.followers if f in self._active]
        s.followers = []
        if not followers:
            return
        if fail_followers:
            for f in followers:
                self._drop(f, error)
            return
        # The owner left before its image was ready: the first follower takes over, from the
        # encoded image if there is one (else it encodes the image itself).
        heir, rest = followers[0], followers[1:]
        heir.followers = rest
        if heir.key is not None:
            self._inflight[heir.key] = heir
        heir.phase = "need_vision"
        if prefill is not None:
            try:
                heir.handle = self.runtime.new_image_sequence()
            except Exception as exc:
                self._drop(heir, request_error(exc), fail_followers=True)
                return
            heir.pending = prefill
            heir.phase = "image_prefill"

    def _remove(self, s: _Seq[S, P]) -> None:
        if s in self._active:
            self._active.remove(s)
        if s.key is not None and self._inflight.get(s.key) is s:
            del self._inflight[s.key]
        if s.phase == "wait_image" and s.key is not None:
            owner = self._inflight.get(s.key)
            if owner is not None and s in owner.followers:
                owner.followers.remove(s)
        s.handle = None
        s.pending = None

    def _finish(self, req: Request[P], *, result: object = None, error: BaseException | None = None) -> None:
        if req._done:
            return
        req._done = True
        req.result = result
        req.error = error
        req.finished_at = self.clock()
        if error is None:
            self.stats.completed += 1
            if req.started_at is not None:
                self._slot_times.append(req.finished_at - req.started_at)
        elif isinstance(error, CancelledRequestError):
            self.stats.cancelled += 1
        elif isinstance(error, DeadlineExceededError):
            self.stats.expired += 1
        else:
            self.stats.failed += 1
        try:
            req.on_done(req)
        except Exception:
            log.exception("a request's completion callback failed")


def request_error(exc: BaseException) -> BaseException:
    """Errors caused by the request itself become InvalidRequestError (HTTP 400)."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, ValueError):
        return InvalidRequestError(str(exc) or "invalid request")
    return exc
