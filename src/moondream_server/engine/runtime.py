"""The narrow interface between the scheduler and the model.

The scheduler never touches modules or caches itself: it asks a ``Runtime`` to encode images,
to open sequences and to run one packed forward step. ``ModelRuntime`` implements it over
``Moondream``; the scheduler's tests implement it with a fake that has no weights.

Sequences and encoded images are opaque to the scheduler (``Any``); it only reads
``x.shape[0]`` (the number of positions) of the inputs programs yield.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from moondream_server.engine.image_cache import image_content_key
from moondream_server.model.cuda_graphs import DecodeGraphs
from moondream_server.model.decoding import (
    Program,
    StepOutput,
    caption_program,
    check_object_fits,
    check_question_fits,
    query_program,
    region_program,
)
from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.moondream import EncodedImage, Moondream, validate_spatial_refs
from moondream_server.model.sampling import TextSettings
from moondream_server.model.text import SeqSlice
from moondream_server.model.tiling import Crops

OnText = Callable[[str], None]


@dataclass
class StepItem:
    """One sequence's share of a packed step."""

    seq: Any  # a handle from new_sequence / new_image_sequence
    x: torch.Tensor  # [n, dim] input embeddings, written at the sequence's next positions
    want_output: bool  # the program needs the output of the last position


class VisionJob(Protocol):
    """The vision encoder over some images, run a chunk of crops at a time between text steps."""

    def step(self) -> bool:
        """Encode the next chunk; True once every crop is encoded."""
        ...

    def results(self) -> list[Any]:
        """One image embedding per image, in order (after ``step`` returned True)."""
        ...


class Runtime(Protocol):
    @property
    def prefix_len(self) -> int:
        """Positions of an image prefix (BOS + image tokens)."""
        ...

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Context entered around every scheduler iteration (e.g. torch.inference_mode)."""
        ...

    def image_key(self, image: Any) -> Hashable:
        """Content key of an image (equal pixels and model => equal key)."""
        ...

    def start_vision(self, images: Sequence[Any]) -> VisionJob:
        """A vision job over several images (their crops batched together)."""
        ...

    def image_prefill_input(self, embedding: Any) -> torch.Tensor:
        """The [prefix_len, dim] input of an image prefill (BOS + image embeddings)."""
        ...

    def new_image_sequence(self) -> Any:
        """An empty sequence whose first prefix_len positions attend bidirectionally."""
        ...

    def snapshot_image(self, seq: Any) -> Any:
        """A copy of the image prefix of a sequence whose image prefill is done (cacheable)."""
        ...

    def image_nbytes(self, encoded: Any) -> int: ...

    def new_sequence(self, encoded: Any | None) -> Any:
        """A sequence starting from an encoded image (a copy), or empty for text-only requests."""
        ...

    def room(self, seq: Any) -> tuple[int, int]:
        """(positions already used, the most positions the sequence may hold)."""
        ...

    def forward(self, items: Sequence[StepItem]) -> list[StepOutput | None]:
        """One packed forward over all items; the output of each item that wants one."""
        ...


@dataclass
class ModelSeq:
    cache: KVCache
    prefix: int


def _text_settings(settings: dict[str, Any] | None) -> TextSettings:
    return TextSettings.parse(settings)


class ModelRuntime:
    """``Runtime`` over a loaded ``Moondream``; also builds the task programs the engine submits."""

    def __init__(
        self,
        model: Moondream,
        *,
        max_vision_crops: int = 16,
        kv_pool_slots: int = 0,
        decode_graphs: bool | None = None,
    ) -> None:
        """``kv_pool_slots`` > 0 keeps that many sequences' caches in one pool, so their decode
        steps attend in one call (worth its memory on a GPU; see ``KVPool``). ``decode_graphs``
        runs those steps through ``DecodeGraphs`` (CUDA graphs; None = on CUDA devices only)."""
        self.model = model
        self.text = model.net.text
        self.vision = model.net.vision
        self.max_vision_crops = max_vision_crops
        if decode_graphs is None:
            decode_graphs = model.device.type == "cuda"
        graphs = kv_pool_slots > 0 and decode_graphs
        # The graphs take one extra slot for their padding rows.
        slots = kv_pool_slots + 1 if graphs else kv_pool_slots
        self.kv_pool: KVPool | None = self.text.new_pool(slots) if kv_pool_slots > 0 else None
        self.decode_graphs: DecodeGraphs | None = None
        if graphs and self.kv_pool is not None:
            self.decode_graphs = DecodeGraphs(self.text, self.kv_pool, max_batch=kv_pool_slots)
        self.model_key = f"{model.model_id}@{model.revision or ''}"
        # counters, read by tests and logs
        self.vision_calls = 0
        self.images_embedded = 0
        self.forward_calls = 0

    @property
    def prefix_len(self) -> int:
        return self.model.prefix_len

    @property
    def max_context(self) -> int:
        return self.model.config.text.max_context

    def session(self) -> contextlib.AbstractContextManager[None]:
        return torch.inference_mode()

    # -- images ------------------------------------------------------------------------------
    def image_key(self, image: Any) -> Hashable:
        """Content key; may run on any thread (the engine hashes before submitting)."""
        if not isinstance(image, Image.Image):
            raise TypeError("image must be a PIL image")
        return image_content_key(image, self.model_key)

    def prepare(self, image: Image.Image) -> Crops:
        """The CPU-side preprocessing (tiling, resizing); may run on any thread."""
        return self.model.crops(image)

    def start_vision(self, images: Sequence[Any]) -> _ModelVisionJob:
        """PIL images or their ``prepare``d crops; crops of all images share encoder passes."""
        crops = [im if isinstance(im, Crops) else self.model.crops(im) for im in images]
        return _ModelVisionJob(self, crops)

    def embed_images(self, images: Sequence[Any]) -> list[Any]:
        """All at once: images -> image embeddings."""
        job = self.start_vision(images)
        while not job.step():
            pass
        return job.results()

    def image_prefill_input(self, embedding: Any) -> torch.Tensor:
        bos = self.text.embed([self.model.config.tokenizer.bos_id])
        return torch.cat([bos, embedding])

    def new_image_sequence(self) -> ModelSeq:
        cache = self.text.new_cache(capacity=self.prefix_len + 64, pool=self.kv_pool)
        return ModelSeq(cache, self.prefix_len)

    def snapshot_image(self, seq: Any) -> EncodedImage:
        assert isinstance(seq, ModelSeq)
        k, v = seq.cache.prefix(self.prefix_len)
        return EncodedImage(pos=self.prefix_len, k=k, v=v)

    def image_nbytes(self, encoded: Any) -> int:
        assert isinstance(encoded, EncodedImage)
        return encoded.nbytes

    def new_sequence(self, encoded: Any | None) -> ModelSeq:
        cache, prefix = self.model.start_cache(encoded, pool=self.kv_pool)
        return ModelSeq(cache, prefix)

    def room(self, seq: Any) -> tuple[int, int]:
        assert isinstance(seq, ModelSeq)
        return seq.cache.length, seq.cache.max_context

    def warm_graphs(self) -> None:
        """Capture the decode graphs that short answers about an image use, before traffic."""
        if self.decode_graphs is not None:
            with torch.inference_mode():
                self.decode_graphs.warm(spans=(self.prefix_len + 1, self.prefix_len + 129))

    # -- the packed step ---------------------------------------------------------------------
    def forward(self, items: Sequence[StepItem]) -> list[StepOutput | None]:
        if not items:
            return []
        graphs = self.decode_graphs
        if graphs is not None:
            fast = [
                i for i, it in enumerate(items) if graphs.accepts(it.seq.cache, it.x.shape[0], it.seq.prefix)
            ]
            if fast:
                return self._forward_split(graphs, items, fast)
        return self._forward_eager(items)

    def _forward_split(
        self, graphs: DecodeGraphs, items: Sequence[StepItem], fast: list[int]
    ) -> list[StepOutput | None]:
        """Pooled decode steps through the graphs; the rest (prefills, private caches) eagerly."""
        outputs: list[StepOutput | None] = [None] * len(items)
        chosen = set(fast)
        rest = [i for i in range(len(items)) if i not in chosen]
        if rest:
            for i, out in zip(rest, self._forward_eager([items[i] for i in rest]), strict=True):
                outputs[i] = out
        x = torch.cat([items[i].x for i in fast]) if len(fast) > 1 else items[fast[0]].x
        hidden, logits = graphs.step(x, [items[i].seq.cache for i in fast])
        for k, i in enumerate(fast):
            if items[i].want_output:
                outputs[i] = StepOutput(hidden=hidden[k], logits=logits[k])
        if not rest:
            self.forward_calls += 1
        return outputs

    def _forward_eager(self, items: Sequence[StepItem]) -> list[StepOutput | None]:
        x = torch.cat([it.x for it in items]) if len(items) > 1 else items[0].x
        seqs = [SeqSlice(it.seq.cache, it.x.shape[0], prefix=it.seq.prefix) for it in items]
        hidden = self.text(x, seqs)
        self.forward_calls += 1
        rows: list[int] = []
        end = 0
        for it in items:
            end += it.x.shape[0]
            if it.want_output:
                rows.append(end - 1)
        outputs: list[StepOutput | None] = [None] * len(items)
        if rows:
            last = hidden[rows]
            logits = self.text.logits(last).float()
            k = 0
            for i, it in enumerate(items):
                if it.want_output:
                    outputs[i] = StepOutput(hidden=last[k], logits=logits[k])
                    k += 1
        return outputs

    # -- programs (validated at submission; they run on the scheduler thread) ---------------
    def _context_left(self, with_image: bool) -> int:
        return self.max_context - (self.prefix_len if with_image else 0)

    def caption(self, length: str, settings: dict[str, Any] | None, on_text: OnText | None) -> Program:
        parsed = _text_settings(settings)
        if length not in self.model.config.tokenizer.templates["caption"]:
            raise ValueError(f"unsupported caption length {length!r}")
        return caption_program(self.model.ctx, length, parsed, self._context_left(True), on_text)

    def query(
        self,
        question: str,
        settings: dict[str, Any] | None,
        *,
        with_image: bool,
        reasoning: bool,
        spatial_refs: Sequence[Sequence[float]] | None,
        on_text: OnText | None,
    ) -> Program:
        if spatial_refs and not with_image:
            raise ValueError("spatial_refs can only be used with an image")
        validate_spatial_refs(spatial_refs)
        parsed = _text_settings(settings)
        question_ids = self.model.encode_text(question)
        # Now, not when the program first runs on the scheduler thread: the caller gets a 400
        # before the request takes a queue place.
        check_question_fits(
            self.model.ctx,
            question_ids,
            spatial_refs or None,
            self._context_left(with_image),
            with_image=with_image,
            reasoning=reasoning,
        )
        return query_program(
            self.model.ctx,
            question_ids,
            parsed,
            self._context_left(with_image),
            with_image=with_image,
            reasoning=reasoning,
            spatial_refs=spatial_refs or None,
            on_text=on_text,
        )

    def region(self, task: Literal["detect", "point"], obj: str, settings: dict[str, Any] | None) -> Program:
        parsed = _text_settings(settings)
        object_ids = self.model.encode_text(" " + obj)
        check_object_fits(self.model.ctx, task, object_ids, self._context_left(True))
        return region_program(
            self.model.ctx,
            task,
            object_ids,
            parsed.max_objects,
            self._context_left(True),
        )


class _ModelVisionJob:
    def __init__(self, runtime: ModelRuntime, crops: list[Crops]) -> None:
        self.runtime = runtime
        self.crops = crops
        self.pixels = np.concatenate([c.pixels for c in crops]) if len(crops) > 1 else crops[0].pixels
        self.done = 0
        self.features: list[torch.Tensor] = []

    def step(self) -> bool:
        total = int(self.pixels.shape[0])
        if self.done < total:
            n = min(self.runtime.max_vision_crops, total - self.done)
            vision = self.runtime.vision
            chunk = self.pixels[self.done : self.done + n]
            self.features.append(vision.encode(vision.normalize(chunk)))
            self.runtime.vision_calls += 1
            self.done += n
        return self.done >= total

    def results(self) -> list[Any]:
        if self.done < self.pixels.shape[0]:
            raise RuntimeError("the vision job is not finished")
        features = torch.cat(self.features) if len(self.features) > 1 else self.features[0]
        out: list[Any] = []
        start = 0
        for c in self.crops:
            n = c.pixels.shape[0]
            out.append(self.runtime.vision.embed(features[start : start + n], c.tiling))
            start += n
        self.runtime.images_embedded += len(self.crops)
        return out


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def null_session() -> contextlib.AbstractContextManager[None]:
    """A session context that does nothing (for runtimes without torch state)."""
    return _nothing()
