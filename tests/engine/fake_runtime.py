"""A weightless ``ModelRuntime`` (``model/seam.py``) for the scheduler tests.

Sequences are counters of fed positions; a program's outputs carry the position the sequence
has reached, so a test can tell exactly what each program was fed, and every step is logged.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moondream_server.model.decoding import StepOutput
from moondream_server.model.seam import StepItem

PREFIX = 6  # positions of a fake image prefix


@dataclass(eq=False)
class FakeSeq:
    name: str
    length: int = 0


@dataclass
class FakeImageKV:
    source: str


@dataclass
class FakeRuntime:
    prefix_len: int = PREFIX
    steps: list[list[tuple[str, int]]] = field(default_factory=list)  # per step: (seq name, positions)
    vision_calls: list[list[str]] = field(default_factory=list)
    fail_forward_when: Callable[[Sequence[StepItem]], bool] | None = None
    bad_images: set[str] = field(default_factory=set)
    vision_chunk: int = 1000  # crops per vision step; an image "name*k" has k crops, else 1
    vision_steps: int = 0
    max_context: int = 100
    _ids: Any = field(default_factory=itertools.count)

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def image_key(self, image: Any) -> Hashable:
        if not isinstance(image, str):
            raise TypeError("fake images are strings")
        return ("fake-model", image)

    def start_vision(self, images: Sequence[Any]) -> FakeVisionJob:
        self.vision_calls.append(list(images))
        return FakeVisionJob(self, list(images))

    def image_prefill_input(self, embedding: Any) -> torch.Tensor:
        return torch.zeros(self.prefix_len, 1)

    def new_image_sequence(self) -> FakeSeq:
        return FakeSeq(f"img{next(self._ids)}")

    def snapshot_image(self, seq: Any) -> FakeImageKV:
        assert seq.length == self.prefix_len
        return FakeImageKV(seq.name)

    def image_nbytes(self, encoded: Any) -> int:
        return 100

    def new_sequence(self, encoded: Any | None) -> FakeSeq:
        return FakeSeq(f"seq{next(self._ids)}", self.prefix_len if encoded is not None else 0)

    def room(self, seq: Any) -> tuple[int, int]:
        return seq.length, self.max_context

    def forward(self, items: Sequence[StepItem]) -> list[StepOutput | None]:
        if self.fail_forward_when is not None and self.fail_forward_when(items):
            raise RuntimeError("forward exploded")
        log: list[tuple[str, int]] = []
        outputs: list[StepOutput | None] = []
        for it in items:
            n = int(it.x.shape[0])
            # a program's marker rides in the first value of its input
            log.append((str(int(it.x[0, 0].item())) if it.x.numel() else "?", n))
            it.seq.length += n
            assert it.seq.length <= self.max_context, "the scheduler overflowed a sequence"
            outputs.append(
                StepOutput(hidden=torch.tensor([float(it.seq.length)]), logits=torch.zeros(1))
                if it.want_output
                else None
            )
        self.steps.append(log)
        return outputs


def crop_count(image: str) -> int:
    return int(image.rsplit("*", 1)[1]) if "*" in image else 1


class FakeVisionJob:
    def __init__(self, rt: FakeRuntime, images: list[str]) -> None:
        self.rt = rt
        self.images = images
        self.left = sum(crop_count(im) for im in images)

    def step(self) -> bool:
        bad = self.rt.bad_images & set(self.images)
        if bad:
            raise RuntimeError(f"cannot encode {sorted(bad)}")
        self.rt.vision_steps += 1
        self.left -= min(self.left, self.rt.vision_chunk)
        return self.left == 0

    def results(self) -> list[Any]:
        assert self.left == 0
        return [f"emb:{im}" for im in self.images]


@dataclass
class Trace:
    """What a counting program saw, for the test to check against its own arithmetic."""

    positions: list[int] = field(default_factory=list)
    closed: bool = False


def counting_program(
    marker: int,
    prompt: int,
    tokens: int,
    trace: Trace | None = None,
    *,
    fail_at: int | None = None,
    fail_at_start: bool = False,
) -> Generator[torch.Tensor, StepOutput, list[int]]:
    """Feed `prompt` positions, then `tokens` single positions; return the positions seen."""
    trace = trace if trace is not None else Trace()
    try:
        if fail_at_start:
            raise ValueError("the prompt does not fit in the model's context")
        out = yield torch.full((prompt, 1), float(marker))
        trace.positions.append(int(out.hidden.item()))
        for i in range(tokens):
            if fail_at is not None and i == fail_at:
                raise ValueError(f"program {marker} failed")
            out = yield torch.full((1, 1), float(marker))
            trace.positions.append(int(out.hidden.item()))
        return list(trace.positions)
    finally:
        trace.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TickingClock(FakeClock):
    """A clock whose every reading is one second later than the one before."""

    def __call__(self) -> float:
        self.now += 1.0
        return self.now
