"""Scheduler logic against a weightless runtime: every step is logged, clocks are fake."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest

from moondream_server.engine.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
)
from moondream_server.engine.image_cache import ImageCache
from moondream_server.engine.scheduler import CancelledRequestError, Request, Scheduler
from tests.engine.fake_runtime import PREFIX, FakeClock, FakeRuntime, TickingClock, Trace, counting_program


def make(
    rt: FakeRuntime | None = None, clock: FakeClock | None = None, cache: bool = True, **kw: Any
) -> tuple[Scheduler, FakeRuntime, FakeClock]:
    rt = rt or FakeRuntime()
    clock = clock or FakeClock()
    image_cache: ImageCache[Any] | None = ImageCache(10_000, rt.image_nbytes) if cache else None
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_queue", 8)
    kw.setdefault("max_step_tokens", 64)
    return Scheduler(rt, clock=clock, image_cache=image_cache, **kw), rt, clock


def req(program: Any, image: str | None = None, deadline: float = 1e9) -> Request:
    return Request(program=program, image=image, deadline=deadline)


def drain(s: Scheduler, limit: int = 500) -> int:
    n = 0
    while s.run_once():
        n += 1
        assert n < limit, "scheduler did not settle"
    return n


def slow_steps(rt: FakeRuntime, clock: FakeClock, seconds: float) -> None:
    """Make every forward step of `rt` take `seconds` of (fake) time."""
    forward = rt.forward

    def slow_forward(items: Any) -> Any:
        clock.now += seconds
        return forward(items)

    rt.forward = slow_forward  # type: ignore[method-assign]


def markers(step: list[tuple[str, int]]) -> list[str]:
    return [m for m, _ in step]


def test_text_only_request_sees_consecutive_positions() -> None:
    s, rt, _ = make()
    r = req(counting_program(1, prompt=3, tokens=4))
    s.submit(r)
    drain(s)
    assert r.error is None
    assert r.result == [3, 4, 5, 6, 7]
    assert rt.steps == [[("1", 3)], [("1", 1)], [("1", 1)], [("1", 1)], [("1", 1)]]


def test_image_request_starts_after_the_prefix() -> None:
    s, rt, _ = make()
    r = req(counting_program(1, prompt=2, tokens=2), image="a")
    s.submit(r)
    drain(s)
    assert r.result == [PREFIX + 2, PREFIX + 3, PREFIX + 4]
    assert rt.vision_calls == [["a"]]
    # the image prefill and then the prompt, each its own step (the prompt needs the prefix first)
    assert rt.steps[0] == [("0", PREFIX)]
    assert rt.steps[1] == [("1", 2)]


def test_requests_join_mid_flight_and_share_steps() -> None:
    s, rt, _ = make()
    a = req(counting_program(1, prompt=3, tokens=6))
    s.submit(a)
    s.run_once()
    s.run_once()
    b = req(counting_program(2, prompt=5, tokens=2))
    s.submit(b)
    s.run_once()
    # b's prompt prefill rides in the same packed step as a's decode
    assert sorted(rt.steps[-1]) == [("1", 1), ("2", 5)]
    drain(s)
    assert a.result == [3, 4, 5, 6, 7, 8, 9]
    assert b.result == [5, 6, 7]
    shared = [st for st in rt.steps if set(markers(st)) == {"1", "2"}]
    assert len(shared) == 3  # b's prefill + its two decodes


def test_finished_request_leaves_and_frees_its_slot() -> None:
    s, rt, _ = make(max_batch_size=1)
    a = req(counting_program(1, prompt=1, tokens=2))
    b = req(counting_program(2, prompt=1, tokens=2))
    s.submit(a)
    s.submit(b)
    drain(s)
    assert a.result == [1, 2, 3] and b.result == [1, 2, 3]
    assert all(len(st) == 1 for st in rt.steps)  # never both at once
    assert [markers(st)[0] for st in rt.steps] == ["1"] * 3 + ["2"] * 3
    assert a.finished_at is not None and b.started_at is not None
    assert b.started_at >= a.finished_at


def test_fifo_admission_order() -> None:
    s, rt, _ = make(max_batch_size=2, max_queue=10)
    reqs = [req(counting_program(i, prompt=1, tokens=(7 - i) % 4)) for i in range(1, 8)]
    for r in reqs:
        s.submit(r)
    admitted: list[int] = []
    while s.run_once():
        for i, r in enumerate(reqs, start=1):
            if r.started_at is not None and i not in admitted:
                admitted.append(i)
    assert admitted == list(range(1, 8))
    first_steps = [next(k for k, st in enumerate(rt.steps) if str(i) in markers(st)) for i in range(1, 8)]
    assert first_steps == sorted(first_steps)


def test_cache_hits_do_not_jump_the_queue() -> None:
    s, _, _ = make(max_batch_size=1)
    warm = req(counting_program(1, prompt=1, tokens=0), image="x")
    s.submit(warm)
    drain(s)
    slow = req(counting_program(2, prompt=1, tokens=3), image="new")
    hit = req(counting_program(3, prompt=1, tokens=0), image="x")
    s.submit(slow)
    s.submit(hit)
    drain(s)
    assert hit.image_cache_hit and not slow.image_cache_hit
    assert slow.finished_at is not None and hit.started_at is not None
    assert hit.started_at >= slow.finished_at


def test_queue_full_raises_at_once_and_recovers() -> None:
    s, _, _ = make(max_batch_size=1, max_queue=2)
    reqs = [req(counting_program(i, prompt=1, tokens=1)) for i in range(4)]
    for r in reqs[:3]:  # one for the free slot, two for the queue
        s.submit(r)
    with pytest.raises(QueueFullError) as info:
        s.submit(reqs[3])
    assert info.value.retry_after_s > 0
    s.run_once()  # one takes the slot: still 2 waiting, still full
    with pytest.raises(QueueFullError):
        s.submit(reqs[3])
    while not reqs[0].done:  # the first finishes and the next takes its slot
        s.run_once()
    s.run_once()
    s.submit(reqs[3])
    drain(s)
    assert all(r.error is None and r.result == [1, 2] for r in reqs)
    assert s.stats.rejected == 2


def test_a_burst_on_an_idle_scheduler_fills_the_free_slots_without_queue_full() -> None:
    s, _, _ = make(max_batch_size=4, max_queue=1)
    reqs = [req(counting_program(i, prompt=1, tokens=1)) for i in range(5)]
    for r in reqs:  # 4 free slots + 1 queue place: nobody is refused
        s.submit(r)
    with pytest.raises(QueueFullError):
        s.submit(req(counting_program(9, prompt=1, tokens=1)))
    drain(s)
    assert all(r.result == [1, 2] for r in reqs)


def test_cancelled_waiting_request_frees_its_queue_place() -> None:
    s, _, _ = make(max_batch_size=1, max_queue=1)
    s.submit(req(counting_program(1, prompt=1, tokens=1)))
    s.run_once()
    a = req(counting_program(2, prompt=1, tokens=1))  # request 1 takes the slot
    s.submit(a)
    a.cancel()
    b = req(counting_program(3, prompt=1, tokens=1))
    s.submit(b)  # would be QueueFullError if the cancelled one still held the place
    drain(s)
    assert isinstance(a.error, CancelledRequestError)
    assert b.result == [1, 2]


def test_cancel_mid_flight_frees_the_slot_at_the_next_step() -> None:
    s, rt, _ = make(max_batch_size=1)
    trace = Trace()
    a = req(counting_program(1, prompt=2, tokens=100, trace=trace))
    b = req(counting_program(2, prompt=2, tokens=1))
    s.submit(a)
    s.submit(b)
    for _ in range(3):
        s.run_once()
    steps_before = len(rt.steps)
    a.cancel()
    s.run_once()
    assert a.done and isinstance(a.error, CancelledRequestError)
    assert trace.closed  # the program was closed
    assert markers(rt.steps[steps_before]) == ["2"]  # the very next step already serves b
    drain(s)
    assert b.result == [2, 3]
    assert all("1" not in markers(st) for st in rt.steps[steps_before:])


def test_deadline_in_queue_and_in_flight() -> None:
    s, rt, clock = make(max_batch_size=1)
    running = req(counting_program(1, prompt=1, tokens=50), deadline=clock.now + 10)
    queued = req(counting_program(2, prompt=1, tokens=1), deadline=clock.now + 5)
    patient = req(counting_program(3, prompt=1, tokens=1), deadline=clock.now + 100)
    for r in (running, queued, patient):
        s.submit(r)
    for _ in range(3):
        s.run_once()
    clock.now += 6  # the queued one passes its deadline before ever running
    s.run_once()
    assert isinstance(queued.error, DeadlineExceededError)
    assert not running.done
    clock.now += 5  # now the running one too
    n_steps = len(rt.steps)
    s.run_once()
    assert isinstance(running.error, DeadlineExceededError)
    assert markers(rt.steps[n_steps]) == ["3"]
    drain(s)
    assert patient.result == [1, 2]
    assert all("2" not in markers(st) for st in rt.steps)


def test_program_error_fails_only_its_request() -> None:
    s, _, _ = make()
    ok1 = req(counting_program(1, prompt=2, tokens=5))
    bad = req(counting_program(2, prompt=2, tokens=5, fail_at=2))
    bad_start = req(counting_program(3, prompt=2, tokens=5, fail_at_start=True))
    ok2 = req(counting_program(4, prompt=3, tokens=4))
    for r in (ok1, bad, bad_start, ok2):
        s.submit(r)
    drain(s)
    assert isinstance(bad.error, InvalidRequestError) and "program 2 failed" in str(bad.error)
    assert isinstance(bad_start.error, InvalidRequestError)
    assert ok1.result == [2, 3, 4, 5, 6, 7]
    assert ok2.result == [3, 4, 5, 6, 7]


def test_forward_failure_fails_that_step_and_the_scheduler_goes_on() -> None:
    rt = FakeRuntime()
    rt.fail_forward_when = lambda items: any(float(it.x[0, 0]) == 9.0 for it in items)
    s, _, _ = make(rt)
    a = req(counting_program(1, prompt=2, tokens=5))
    s.submit(a)
    s.run_once()
    poison = req(counting_program(9, prompt=2, tokens=5))
    s.submit(poison)
    s.run_once()  # a's decode + the poison prefill: this step fails
    assert isinstance(poison.error, RuntimeError)
    assert isinstance(a.error, RuntimeError)  # it was in the failed step (its cache is unusable)
    after = req(counting_program(2, prompt=2, tokens=2))
    s.submit(after)
    drain(s)
    assert after.result == [2, 3, 4]


def test_step_token_budget_chunks_prompts_and_never_starves_decodes() -> None:
    budget = 16
    s, rt, _ = make(max_step_tokens=budget, min_prefill_chunk=4)
    a = req(counting_program(1, prompt=2, tokens=30))
    s.submit(a)
    s.run_once()
    long_prompts = [req(counting_program(i, prompt=40, tokens=2)) for i in (2, 3)]
    img = req(counting_program(4, prompt=3, tokens=2), image="pic")
    for r in [*long_prompts, img]:
        s.submit(r)
    drain(s)
    # prompts are chunked: the result is as if fed at once
    assert [r.result for r in long_prompts] == [[40, 41, 42]] * 2
    assert img.result == [PREFIX + 3, PREFIX + 4, PREFIX + 5]
    assert a.result == list(range(2, 33))
    for st in rt.steps:
        assert sum(n for _, n in st) <= budget + PREFIX
    # a decoded in every step from its second until it finished: no step left it out
    a_steps = [k for k, st in enumerate(rt.steps) if "1" in markers(st)]
    assert a_steps == list(range(a_steps[0], a_steps[0] + 31))


def test_same_new_image_is_encoded_once_and_then_cached() -> None:
    s, rt, _ = make()
    a = req(counting_program(1, prompt=2, tokens=1), image="cat")
    b = req(counting_program(2, prompt=3, tokens=1), image="cat")
    c = req(counting_program(3, prompt=1, tokens=1), image="dog")
    for r in (a, b, c):
        s.submit(r)
    drain(s)
    assert rt.vision_calls == [["cat", "dog"]]  # one vision pass for the new images
    assert sum(markers(st).count("0") for st in rt.steps) == 2  # two image prefills, not three
    assert a.result == [PREFIX + 2, PREFIX + 3]
    assert b.result == [PREFIX + 3, PREFIX + 4]
    assert c.result == [PREFIX + 1, PREFIX + 2]
    d = req(counting_program(4, prompt=2, tokens=1), image="cat")
    s.submit(d)
    drain(s)
    assert rt.vision_calls == [["cat", "dog"]]
    assert d.image_cache_hit and d.result == [PREFIX + 2, PREFIX + 3]


def test_one_image_per_vision_job_serves_the_first_image_first() -> None:
    """max_images_per_step=1 (the CPU setting): images are encoded first come first served, so the
    first request does not wait for the second image's encoding."""
    s, rt, _ = make(clock=TickingClock(), max_images_per_step=1)
    a = req(counting_program(1, prompt=2, tokens=3), image="cat")
    b = req(counting_program(2, prompt=2, tokens=3), image="dog")
    s.submit(a)
    s.submit(b)
    drain(s)
    assert rt.vision_calls == [["cat"], ["dog"]]
    assert a.first_output_at is not None and b.first_output_at is not None
    assert a.first_output_at < b.first_output_at
    assert a.result == [PREFIX + 2, PREFIX + 3, PREFIX + 4, PREFIX + 5]


@pytest.mark.parametrize("decode_first_s", [0.0, 1e9])
def test_decode_first_lets_running_requests_finish_before_new_images(decode_first_s: float) -> None:
    """The dog image takes 3 encoder chunks. With decode_first_s, its encoding waits until the
    first request has its first token and while it decodes; with 0 it runs between its steps."""
    seen: list[tuple[list[str], int]] = []  # per step: its sequences' markers, encoder chunks so far

    class Logged(FakeRuntime):
        def forward(self, items: Any) -> Any:
            out = super().forward(items)
            seen.append((markers(self.steps[-1]), self.vision_steps))
            return out

    rt = Logged(vision_chunk=1)
    s, _, _ = make(rt=rt, clock=TickingClock(), max_images_per_step=1, decode_first_s=decode_first_s)
    a = req(counting_program(1, prompt=2, tokens=5), image="cat")
    b = req(counting_program(2, prompt=2, tokens=5), image="dog*3")
    s.submit(a)
    s.submit(b)
    drain(s)
    assert a.result == [PREFIX + 2 + i for i in range(6)] and b.result == a.result
    chunks_during_a = [n for ms, n in seen if "1" in ms]
    assert rt.vision_steps == 4  # cat: 1 chunk, dog: 3
    if decode_first_s:
        assert max(chunks_during_a) == 1  # none of the dog's chunks ran before a finished
    else:
        assert max(chunks_during_a) == 4  # the dog's chunks ran between a's steps


def test_decode_first_still_encodes_while_decodes_run_long() -> None:
    """A decode that outlasts decode_first_s does not starve new images: they get a turn."""

    s, _, _ = make(clock=TickingClock(), max_images_per_step=1, decode_first_s=5.0)
    long = req(counting_program(1, prompt=1, tokens=60))  # text only: decodes for many steps
    b = req(counting_program(2, prompt=2, tokens=1), image="dog")
    s.submit(long)
    drain_until = 0
    while not (long.first_output_at is not None) and drain_until < 50:
        s.run_once()
        drain_until += 1
    s.submit(b)
    drain(s)
    assert b.finished_at is not None and long.finished_at is not None
    assert b.finished_at < long.finished_at
    assert b.result == [PREFIX + 2, PREFIX + 3]


def test_in_flight_dedupe_without_a_cache() -> None:
    s, rt, _ = make(cache=False)
    a = req(counting_program(1, prompt=1, tokens=1), image="cat")
    b = req(counting_program(2, prompt=1, tokens=1), image="cat")
    s.submit(a)
    s.submit(b)
    drain(s)
    assert rt.vision_calls == [["cat"]]
    assert a.result == b.result == [PREFIX + 1, PREFIX + 2]


def test_follower_takes_over_when_the_image_owner_is_cancelled() -> None:
    s, _, _ = make()
    owner = req(counting_program(1, prompt=1, tokens=1), image="cat")
    follower = req(counting_program(2, prompt=1, tokens=1), image="cat")
    s.submit(owner)
    s.submit(follower)
    owner.cancel()
    drain(s)
    assert isinstance(owner.error, CancelledRequestError)
    assert follower.result == [PREFIX + 1, PREFIX + 2]


def test_vision_failure_fails_only_that_image() -> None:
    rt = FakeRuntime(bad_images={"broken"})
    s, _, _ = make(rt)
    good = req(counting_program(1, prompt=1, tokens=1), image="fine")
    bad = req(counting_program(2, prompt=1, tokens=1), image="broken")
    bad_too = req(counting_program(3, prompt=1, tokens=1), image="broken")
    s.submit(good)
    s.submit(bad)
    s.submit(bad_too)
    drain(s)
    assert good.result == [PREFIX + 1, PREFIX + 2]
    assert isinstance(bad.error, RuntimeError) and isinstance(bad_too.error, RuntimeError)


def test_unhashable_image_fails_the_request_only() -> None:
    s, _, _ = make()
    weird = Request(program=counting_program(1, prompt=1, tokens=1), image=object(), deadline=1e9)
    ok = req(counting_program(2, prompt=1, tokens=1))
    s.submit(weird)
    s.submit(ok)
    drain(s)
    assert isinstance(weird.error, TypeError)
    assert ok.result == [1, 2]


def test_threaded_scheduler_serves_concurrent_submitters_and_stops_cleanly() -> None:
    rt = FakeRuntime()
    s = Scheduler(rt, max_batch_size=3, max_queue=100, max_step_tokens=64)
    s.start()
    done = threading.Event()
    finished: list[Request] = []
    lock = threading.Lock()
    total = 24

    def on_done(r: Request) -> None:
        with lock:
            finished.append(r)
            if len(finished) == total:
                done.set()

    def submitter(base: int) -> None:
        for i in range(6):
            r = Request(
                program=counting_program(base + i, prompt=2, tokens=i),
                image=None if i % 2 else f"img{i % 3}",
                deadline=1e12,
                on_done=on_done,
            )
            s.submit(r)

    threads = [threading.Thread(target=submitter, args=(10 * k + 10,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done.wait(10)
    for r in finished:
        assert r.error is None
        first = r.result[0]
        assert r.result == list(range(first, first + len(r.result)))
    assert max(len(st) for st in rt.steps) <= 3
    # stopping fails whatever still waits
    blocker = Request(program=counting_program(1, prompt=1, tokens=10**6), image=None, deadline=1e12)
    s.submit(blocker)
    s.stop()
    assert isinstance(blocker.error, NotReadyError)
    with pytest.raises(NotReadyError):
        s.submit(Request(program=counting_program(2, prompt=1, tokens=1), image=None, deadline=1e12))


def test_follower_takes_over_when_the_owner_leaves_before_its_image_prefill() -> None:
    s, rt, _ = make(max_step_tokens=8)
    hog = req(counting_program(1, prompt=8, tokens=0))  # fills the first step's budget
    owner = req(counting_program(2, prompt=1, tokens=1), image="cat")
    follower = req(counting_program(3, prompt=1, tokens=1), image="cat")
    for r in (hog, owner, follower):
        s.submit(r)
    s.run_once()
    assert rt.vision_calls == [["cat"]]
    assert all("0" not in markers(st) for st in rt.steps)  # the prefill did not fit yet
    owner.cancel()
    drain(s)
    assert isinstance(owner.error, CancelledRequestError)
    assert follower.result == [PREFIX + 1, PREFIX + 2]
    assert rt.vision_calls == [["cat"]]  # the follower took over the encoded image


def test_vision_runs_in_chunks_between_decode_steps() -> None:
    s, rt, _ = make(FakeRuntime(vision_chunk=2))
    a = req(counting_program(1, prompt=2, tokens=20))
    s.submit(a)
    s.run_once()
    s.run_once()
    b = req(counting_program(2, prompt=1, tokens=1), image="big*5")  # 5 crops: 3 encoder chunks
    s.submit(b)
    for _ in range(3):
        s.run_once()
    assert rt.vision_steps == 3
    # a kept decoding while the image was encoded; the prefill came with the last chunk
    assert rt.steps[2] == [("1", 1)] and rt.steps[3] == [("1", 1)]
    assert sorted(rt.steps[4]) == [("0", PREFIX), ("1", 1)]
    drain(s)
    assert b.result == [PREFIX + 1, PREFIX + 2]
    assert a.result == list(range(2, 23))


def test_follower_inherits_the_vision_job_of_an_owner_that_left() -> None:
    s, rt, _ = make(FakeRuntime(vision_chunk=1))
    owner = req(counting_program(1, prompt=1, tokens=1), image="cat*3")
    follower = req(counting_program(2, prompt=2, tokens=1), image="cat*3")
    s.submit(owner)
    s.submit(follower)
    s.run_once()  # the job has encoded one of three crops
    owner.cancel()
    drain(s)
    assert isinstance(owner.error, CancelledRequestError)
    assert follower.result == [PREFIX + 2, PREFIX + 3]
    assert rt.vision_calls == [["cat*3"]] and rt.vision_steps == 3  # no second encoding


def test_input_overflowing_the_context_fails_only_that_request() -> None:
    s, rt, _ = make(FakeRuntime(max_context=50))
    ok = req(counting_program(1, prompt=3, tokens=3))
    too_long = req(counting_program(2, prompt=60, tokens=1))  # the program itself does not check
    runs_out = req(counting_program(3, prompt=45, tokens=10))  # fits at first, overflows later
    for r in (ok, too_long, runs_out):
        s.submit(r)
    drain(s)
    assert isinstance(too_long.error, InvalidRequestError) and "context of 50" in str(too_long.error)
    assert isinstance(runs_out.error, InvalidRequestError)
    assert ok.result == [3, 4, 5, 6]
    assert all("2" not in markers(st) for st in rt.steps)


def test_unexpected_error_in_an_iteration_fails_active_requests_and_the_thread_goes_on() -> None:
    rt = FakeRuntime()
    s = Scheduler(rt, max_batch_size=2)
    calls = {"n": 0}
    room = rt.room

    def broken_once(seq: Any) -> tuple[int, int]:  # a bug outside the forward pass, once
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("bug")
        return room(seq)

    rt.room = broken_once  # type: ignore[method-assign]
    s.start()
    try:
        done = threading.Event()
        victim = Request(
            program=counting_program(1, prompt=1, tokens=3), image=None, deadline=1e12, on_done=lambda r: None
        )
        s.submit(victim)
        for _ in range(500):
            if victim.done:
                break
            threading.Event().wait(0.01)
        assert isinstance(victim.error, KeyError)
        after = Request(
            program=counting_program(2, prompt=1, tokens=2),
            image=None,
            deadline=1e12,
            on_done=lambda r: done.set(),
        )
        s.submit(after)
        assert done.wait(5)
        assert after.result == [1, 2, 3]
    finally:
        s.stop()


def test_retry_after_follows_how_long_requests_hold_a_slot() -> None:
    s, rt, clock = make(max_batch_size=2, max_queue=4)
    slow_steps(rt, clock, 5.0)
    for i in (1, 2):
        s.submit(req(counting_program(i, prompt=1, tokens=1)))
    drain(s)  # each held its slot for 2 steps = 10 s
    for i in range(3, 9):  # 2 for the free slots, 4 for the queue
        s.submit(req(counting_program(i, prompt=1, tokens=1)))
    with pytest.raises(QueueFullError) as info:
        s.submit(req(counting_program(9, prompt=1, tokens=1)))
    # 4 will wait, served 2 at a time, ~10 s each: the queue has drained in about 20 s
    assert info.value.retry_after_s == 20.0


def test_retry_after_before_anything_finished_is_the_running_requests_age() -> None:
    s, _, clock = make(max_batch_size=2, max_queue=2)
    for i in (1, 2):
        s.submit(req(counting_program(i, prompt=1, tokens=100)))
    s.run_once()  # both take their slots ...
    clock.now += 30.0  # ... and are still running 30 s later
    for i in (3, 4):
        s.submit(req(counting_program(i, prompt=1, tokens=1)))
    with pytest.raises(QueueFullError) as info:
        s.submit(req(counting_program(5, prompt=1, tokens=1)))
    # No request has finished, but each slot has been held 30 s already (so ~30 s more, taken
    # as half done): not "retry in 1 s".
    assert info.value.retry_after_s == 30.0
    assert s.retry_after_s() == 30.0


def test_retry_after_never_exceeds_the_waiting_requests_deadlines() -> None:
    s, rt, clock = make(max_batch_size=1, max_queue=2)
    slow_steps(rt, clock, 100.0)
    s.submit(req(counting_program(1, prompt=1, tokens=1)))
    drain(s)  # a slot is held ~200 s
    s.submit(req(counting_program(2, prompt=1, tokens=50)))
    s.run_once()
    for i in (3, 4):
        s.submit(req(counting_program(i, prompt=1, tokens=1), deadline=clock.now + 45.0))
    with pytest.raises(QueueFullError) as info:
        s.submit(req(counting_program(5, prompt=1, tokens=1)))
    # 2 waiting x ~200 s, but both have left (served or expired) within 45 s.
    assert info.value.retry_after_s == 45.0


def test_a_reserved_place_counts_as_waiting_until_used_or_given_back() -> None:
    s, _, _ = make(max_batch_size=1, max_queue=1)
    s.reserve()  # the free slot's place
    s.reserve()  # the queue's place
    with pytest.raises(QueueFullError):
        s.reserve()
    with pytest.raises(QueueFullError):
        s.submit(req(counting_program(1, prompt=1, tokens=1)))  # unreserved: refused too
    s.submit(req(counting_program(2, prompt=1, tokens=1)), reserved=True)
    s.unreserve()  # the other one was never submitted
    s.reserve()  # ... so its place can be taken again
    s.unreserve()
    assert s.queue_depth == 1
    drain(s)


def test_retry_after_follows_the_measured_gaps_between_admissions() -> None:
    s, rt, clock = make(max_batch_size=1, max_queue=3)
    slow_steps(rt, clock, 2.0)
    first = [req(counting_program(i, prompt=1, tokens=1)) for i in range(4)]
    for r in first:  # one runs, three wait
        s.submit(r)
    for _ in range(6):
        s.run_once()
    started = sorted(r.started_at for r in first if r.started_at is not None)
    assert len(started) >= 3 and s.queue_depth <= 1
    gaps = [b - a for a, b in itertools.pairwise(started)]  # all were waiting from the start
    assert min(gaps) > 0
    with pytest.raises(QueueFullError) as info:
        for i in range(10):
            s.submit(req(counting_program(10 + i, prompt=1, tokens=1)))
    # Each waiting request beyond the free slots gets a slot one measured gap after the one before.
    ahead = s.queue_depth - (s.max_batch_size - s.active_count)
    assert info.value.retry_after_s == round(ahead * sum(gaps) / len(gaps))
    assert info.value.retry_after_s > 1
