"""Moondream2 behind the engine's seam (``model/seam.py``): images, sequences, the packed step,
the skill programs.

The engine's scheduler drives many requests through one ``MoondreamRuntime``; ``Moondream``'s
own dict API drives one request at a time through another (``run``), so both go through the same
image encoding, prefill and forward code.
"""

from __future__ import annotations

from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from moondream_server.model.cuda_graphs import DecodeGraphs, PrefixGraph
from moondream_server.model.decoding import (
    Program,
    StepOutput,
    TaskResult,
    caption_program,
    check_object_fits,
    check_question_fits,
    query_program,
    region_program,
)
from moondream_server.model.image_key import image_content_key
from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.params import (
    MAX_OBJECT_CHARS,
    MAX_QUESTION_CHARS,
    TextSettings,
    check_text_length,
)
from moondream_server.model.seam import OnText, StepItem
from moondream_server.model.tasks import CaptionTask, QueryTask, Task
from moondream_server.model.text import SeqSlice
from moondream_server.model.tiling import Crops

if TYPE_CHECKING:
    import contextlib

    from moondream_server.model.moondream import Moondream

_DECODE_RESERVE = 64  # positions a new sequence holds beyond its prefix before its cache grows


@dataclass
class EncodedImage:
    """The image prefix (BOS + image tokens) as cached keys/values [layers, heads, pos, head_dim]."""

    pos: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class ModelSeq:
    cache: KVCache
    prefix: int  # positions that attend bidirectionally (the image prefix)


class MoondreamRuntime:
    """``ModelRuntime[ModelSeq, EncodedImage, Crops]`` over a loaded ``Moondream``."""

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
        self.prefix_graph: PrefixGraph | None = None
        if graphs and self.kv_pool is not None:
            self.decode_graphs = DecodeGraphs(self.text, self.kv_pool, max_batch=kv_pool_slots)
            self.prefix_graph = PrefixGraph(self.text, self.kv_pool, self.prefix_len)
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

    @property
    def defaults(self) -> TextSettings:
        return TextSettings()

    def session(self) -> contextlib.AbstractContextManager[None]:
        return torch.inference_mode()

    # -- images ------------------------------------------------------------------------------
    def image_key(self, image: Image.Image | Crops) -> Hashable:
        """Content key of a PIL image (prepared crops carry none: key the image first)."""
        if not isinstance(image, Image.Image):
            raise TypeError("image must be a PIL image")
        return image_content_key(image, self.model_key)

    def prepare(self, image: Image.Image) -> Crops:
        return self.model.crops(image)

    def start_vision(self, images: Sequence[Image.Image | Crops]) -> _VisionJob:
        """PIL images or their ``prepare``d crops; crops of all images share encoder passes."""
        crops = [im if isinstance(im, Crops) else self.model.crops(im) for im in images]
        return _VisionJob(self, crops)

    def embed_images(self, images: Sequence[Image.Image | Crops]) -> list[torch.Tensor]:
        """All at once: images -> image embeddings."""
        job = self.start_vision(images)
        while not job.step():
            pass
        return job.results()

    def image_prefill_input(self, embedding: torch.Tensor) -> torch.Tensor:
        bos = self.text.embed([self.model.config.tokenizer.bos_id])
        return torch.cat([bos, embedding])

    def new_image_sequence(self) -> ModelSeq:
        cache = self.text.new_cache(capacity=self.prefix_len + _DECODE_RESERVE, pool=self.kv_pool)
        return ModelSeq(cache, self.prefix_len)

    def snapshot_image(self, seq: ModelSeq) -> EncodedImage:
        k, v = seq.cache.prefix(self.prefix_len)
        return EncodedImage(pos=self.prefix_len, k=k, v=v)

    def image_nbytes(self, encoded: EncodedImage) -> int:
        return encoded.nbytes

    def prefill(self, embedding: torch.Tensor) -> EncodedImage:
        """The image prefill of one image embedding, on a sequence of its own."""
        seq = self.new_image_sequence()
        self.forward([StepItem(seq, self.image_prefill_input(embedding), want_output=False)])
        return self.snapshot_image(seq)

    # -- sequences and the packed step -------------------------------------------------------
    def new_sequence(self, encoded: EncodedImage | None, pool: KVPool | None = None) -> ModelSeq:
        """``pool``: hold it there instead of in this runtime's pool (if any)."""
        pool = pool if pool is not None else self.kv_pool
        if encoded is None:
            return ModelSeq(self.text.new_cache(capacity=_DECODE_RESERVE, pool=pool), 0)
        cache = KVCache.from_prefix(
            encoded.k, encoded.v, self.max_context, extra_capacity=_DECODE_RESERVE, pool=pool
        )
        return ModelSeq(cache, encoded.pos)

    def room(self, seq: ModelSeq) -> tuple[int, int]:
        return seq.cache.length, seq.cache.max_context

    def warm(self) -> None:
        """Capture the decode graphs that short answers about an image use, before traffic."""
        if self.decode_graphs is not None:
            with torch.inference_mode():
                self.decode_graphs.warm(spans=(self.prefix_len + 1, self.prefix_len + 129))
        if self.prefix_graph is not None:
            with torch.inference_mode():
                self.prefix_graph.warm()

    def forward(self, items: Sequence[StepItem[ModelSeq]]) -> list[StepOutput | None]:
        if not items:
            return []
        graphs, prefix = self.decode_graphs, self.prefix_graph
        if graphs is not None and prefix is not None:
            fast = [
                i for i, it in enumerate(items) if graphs.accepts(it.seq.cache, it.x.shape[0], it.seq.prefix)
            ]
            images = [
                i
                for i, it in enumerate(items)
                if not it.want_output and prefix.accepts(it.seq.cache, it.x.shape[0], it.seq.prefix)
            ]
            if fast or images:
                return self._forward_split(graphs, prefix, items, fast, images)
        return self._forward_eager(items)

    def _forward_split(
        self,
        graphs: DecodeGraphs,
        prefix: PrefixGraph,
        items: Sequence[StepItem[ModelSeq]],
        fast: list[int],
        images: list[int],
    ) -> list[StepOutput | None]:
        """Pooled decode steps and image prefills through the graphs; the rest (prompt
        prefills, private caches) eagerly."""
        outputs: list[StepOutput | None] = [None] * len(items)
        chosen = set(fast) | set(images)
        rest = [i for i in range(len(items)) if i not in chosen]
        if rest:
            for i, out in zip(rest, self._forward_eager([items[i] for i in rest]), strict=True):
                outputs[i] = out
        for i in images:
            prefix.run(items[i].x, items[i].seq.cache)
        if fast:
            x = torch.cat([items[i].x for i in fast]) if len(fast) > 1 else items[fast[0]].x
            hidden, logits = graphs.step(x, [items[i].seq.cache for i in fast])
            for k, i in enumerate(fast):
                if items[i].want_output:
                    outputs[i] = StepOutput(hidden=hidden[k], logits=logits[k])
        if not rest:
            self.forward_calls += 1
        return outputs

    def _forward_eager(self, items: Sequence[StepItem[ModelSeq]]) -> list[StepOutput | None]:
        x = torch.cat([it.x for it in items]) if len(items) > 1 else items[0].x
        seqs = [SeqSlice(it.seq.cache, it.x.shape[0], prefix=it.seq.prefix) for it in items]
        rows: list[int] = []
        end = 0
        for it in items:
            end += it.x.shape[0]
            if it.want_output:
                rows.append(end - 1)
        last = self.text(x, seqs, rows)  # the last position of each sequence that wants output
        self.forward_calls += 1
        outputs: list[StepOutput | None] = [None] * len(items)
        if rows:
            logits = self.text.logits(last).float()
            k = 0
            for i, it in enumerate(items):
                if it.want_output:
                    outputs[i] = StepOutput(hidden=last[k], logits=logits[k])
                    k += 1
        return outputs

    def run(self, program: Program, encoded: EncodedImage | None) -> TaskResult:
        """Drive one program to completion on a sequence of its own."""
        steps = self.steps(program, encoded)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                result: TaskResult = stop.value
                return result

    def steps(self, program: Program, encoded: EncodedImage | None) -> Generator[None, None, TaskResult]:
        """Drive one program, pausing after every forward step (so a stream can flush)."""
        seq = self.new_sequence(encoded)
        x = next(program)
        while True:
            with self.session():
                out = self.forward([StepItem(seq, x, want_output=True)])[0]
            assert out is not None
            yield
            try:
                x = program.send(out)
            except StopIteration as stop:
                result: TaskResult = stop.value
                return result

    # -- programs ----------------------------------------------------------------------------
    def program(self, task: Task, on_text: OnText | None = None) -> Program:
        ctx = self.model.ctx
        left = self.max_context - (self.prefix_len if task.with_image else 0)
        if isinstance(task, CaptionTask):
            return caption_program(ctx, task.length, task.settings, left, on_text)
        if isinstance(task, QueryTask):
            check_text_length("question", task.question, MAX_QUESTION_CHARS)  # before tokenizing
            question_ids = self.model.encode_text(task.question)
            # Now, not when the program first runs on the scheduler thread: the caller gets a
            # 400 before the request takes a queue place.
            refs = task.spatial_refs or None
            check_question_fits(
                ctx, question_ids, refs, left, with_image=task.with_image, reasoning=task.reasoning
            )
            return query_program(
                ctx,
                question_ids,
                task.settings,
                left,
                with_image=task.with_image,
                reasoning=task.reasoning,
                spatial_refs=refs,
                on_text=on_text,
            )
        check_text_length("object", task.object, MAX_OBJECT_CHARS)
        object_ids = self.model.encode_text(" " + task.object)
        check_object_fits(ctx, task.skill, object_ids, left)
        return region_program(ctx, task.skill, object_ids, task.settings.max_objects, left)


class _VisionJob:
    def __init__(self, runtime: MoondreamRuntime, crops: list[Crops]) -> None:
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

    def results(self) -> list[torch.Tensor]:
        if self.done < self.pixels.shape[0]:
            raise RuntimeError("the vision job is not finished")
        features = torch.cat(self.features) if len(self.features) > 1 else self.features[0]
        out: list[torch.Tensor] = []
        start = 0
        for c in self.crops:
            n = c.pixels.shape[0]
            out.append(self.runtime.vision.embed(features[start : start + n], c.tiling))
            start += n
        self.runtime.images_embedded += len(self.crops)
        return out
