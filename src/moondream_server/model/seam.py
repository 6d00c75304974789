"""The seam between the engine and a model family: what the engine drives a model through.

A family (Moondream2 is ``model/moondream.py`` + ``model/moondream_runtime.py``) implements two
small interfaces:

* ``LoadedModel``: what ``load()`` returns. It names itself (id, revision, device, dtype) and
  opens a ``ModelRuntime`` with the engine's serving limits.
* ``ModelRuntime``: everything the scheduler does to the model, in its order:

  1. ``image_key`` / ``prepare`` an image (any thread), then encode images a chunk of crops at
     a time (``start_vision`` -> ``VisionJob``);
  2. ``image_prefill_input`` + ``new_image_sequence``: the image prefix's input and the
     sequence it is prefilled in; ``snapshot_image`` copies the prefilled prefix (cacheable,
     ``image_nbytes`` long);
  3. ``new_sequence`` from an encoded image (or empty), ``room`` left in it;
  4. ``forward``: one packed forward step over many sequences;
  5. ``program``: the decode program of a skill (``model/tasks.py``), a generator that yields
     the input embeddings it wants fed and receives each step's ``StepOutput``.

Sequences (``S``), encoded images (``E``) and prepared images (``P``) are the family's own
types; the engine never looks inside them. The scheduler's tests implement ``ModelRuntime``
with a weightless fake.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
from PIL import Image

from moondream_server.model.decoding import Program, StepOutput
from moondream_server.model.params import TextSettings
from moondream_server.model.tasks import Task

S = TypeVar("S")  # a sequence (its KV cache)
E = TypeVar("E")  # an encoded image: the prefilled image prefix, cacheable
P = TypeVar("P")  # an image prepared for the vision encoder (e.g. its crops)

# Crops per vision-encoder pass on a CPU, for the engine and the one-request API alike: a pass's
# activations then stay in the caches (a 640x480 image's 9 crops: 20.0 s in passes of 4 against
# 21.1 s in one, Zen 4), and running decodes get the cores back between passes.
CPU_VISION_CROPS = 4

OnText = Callable[[str], None]


@dataclass
class StepItem(Generic[S]):
    """One sequence's share of a packed step."""

    seq: S
    x: torch.Tensor  # [n, dim] input embeddings, written at the sequence's next positions
    want_output: bool  # the program needs the output of the last position


class VisionJob(Protocol):
    """The vision encoder over some images, run a chunk of crops at a time between text steps."""

    def step(self) -> bool:
        """Encode the next chunk; True once every crop is encoded."""
        ...

    def results(self) -> list[torch.Tensor]:
        """One image embedding per image, in order (after ``step`` returned True)."""
        ...


class ModelRuntime(Protocol[S, E, P]):
    @property
    def prefix_len(self) -> int:
        """Positions of an image prefix (e.g. BOS + image tokens)."""
        ...

    @property
    def defaults(self) -> TextSettings:
        """The sampling settings a request gets for what it leaves unset."""
        ...

    def warm(self) -> None:
        """Get ready for traffic before the scheduler runs (e.g. capture CUDA graphs)."""
        ...

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Context entered around every scheduler iteration (e.g. torch.inference_mode)."""
        ...

    def image_key(self, image: Image.Image | P) -> Hashable:
        """Content key of an image (equal pixels and model => equal key); any thread."""
        ...

    def prepare(self, image: Image.Image) -> P:
        """The CPU-side preprocessing (tiling, resizing); any thread."""
        ...

    def start_vision(self, images: Sequence[Image.Image | P]) -> VisionJob:
        """A vision job over several images (their crops batched together)."""
        ...

    def image_prefill_input(self, embedding: torch.Tensor) -> torch.Tensor:
        """The [prefix_len, dim] input of an image prefill."""
        ...

    def new_image_sequence(self) -> S:
        """An empty sequence whose first prefix_len positions attend bidirectionally."""
        ...

    def snapshot_image(self, seq: S) -> E:
        """A copy of the image prefix of a sequence whose image prefill is done."""
        ...

    def image_nbytes(self, encoded: E) -> int: ...

    def new_sequence(self, encoded: E | None) -> S:
        """A sequence starting from an encoded image (a copy), or empty for text-only requests."""
        ...

    def room(self, seq: S) -> tuple[int, int]:
        """(positions already used, the most positions the sequence may hold)."""
        ...

    def forward(self, items: Sequence[StepItem[S]]) -> list[StepOutput | None]:
        """One packed forward over all items; the output of each item that wants one."""
        ...

    def program(self, task: Task, on_text: OnText | None = None) -> Program:
        """The decode program of a task; raises ValueError at once if it cannot be served (e.g.
        its prompt does not fit the context). Runs on the caller's thread (it tokenizes)."""
        ...


class LoadedModel(Protocol[S, E, P]):
    """What ``load()`` returns: a model that names itself and opens runtimes for an engine."""

    @property
    def model_id(self) -> str: ...

    @property
    def revision(self) -> str | None: ...

    @property
    def device_name(self) -> str:
        """e.g. "cpu", "cuda:0"."""
        ...

    @property
    def dtype_name(self) -> str:
        """e.g. "float32", "bfloat16"."""
        ...

    @property
    def on_gpu(self) -> bool: ...

    @property
    def precision_name(self) -> str | None:
        """What the loader chose for this machine (number formats, decode kernel), if anything;
        read again on every /health (it may say how far work left after loading has come)."""
        ...

    def runtime(
        self, *, max_vision_crops: int, kv_pool_slots: int, decode_graphs: bool | None = None
    ) -> ModelRuntime[S, E, P]:
        """A runtime for the engine: ``max_vision_crops`` crops per vision chunk; ``kv_pool_slots``
        > 0 keeps that many sequences' caches in one pool (decode steps attend in one call);
        ``decode_graphs`` replays those pooled steps from CUDA graphs (None: on CUDA)."""
        ...
