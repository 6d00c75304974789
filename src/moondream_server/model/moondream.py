"""The Moondream2 model with the official public API (caption, query, detect, point).

Calls take a PIL image or an ``EncodedImage`` (reuse skips the vision encoder and the image
prefill). One ``Moondream`` object runs one request at a time; the engine batches many
requests through the same programs (``decoding.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from moondream_server.model.config import MoondreamConfig
from moondream_server.model.cuda_graphs import DecodeGraphs
from moondream_server.model.decoding import (
    Context,
    Program,
    SpatialRef,
    StepOutput,
    TaskResult,
    caption_program,
    query_program,
    region_program,
)
from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.net import MoondreamNet
from moondream_server.model.sampling import TextSettings
from moondream_server.model.text import SeqSlice
from moondream_server.model.tiling import Crops, Resampler, default_resampler, overlap_crops


@dataclass
class EncodedImage:
    """The image prefix (BOS + image tokens) as cached keys/values [layers, heads, pos, head_dim]."""

    pos: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Moondream:
    def __init__(
        self,
        net: MoondreamNet,
        tokenizer: Tokenizer,
        config: MoondreamConfig,
        *,
        model_id: str = "local",
        revision: str | None = None,
        resampler: Resampler | None = None,
    ) -> None:
        # Inference only: no autograd graphs, even for ops outside inference_mode.
        self.net = net.eval().requires_grad_(False)
        # What the last finished call produced (token counts, finish reason), for callers that
        # use the dict-returning public API but also want usage figures.
        self.last_result = TaskResult()
        # perf_counter() when the last run's prompt prefill produced its first output (ttft)
        self.last_first_output_at: float | None = None
        self.tokenizer = tokenizer
        self.config = config
        self.model_id = model_id
        self.revision = revision
        self.resampler: Resampler = resampler or default_resampler()
        # Decode steps through ``DecodeGraphs`` (CUDA graphs): None = on CUDA devices only.
        self.decode_graphs: bool | None = None
        self._graphs: DecodeGraphs | None = None
        self.ctx = Context(
            text=net.text,
            region=net.region,
            ids=config.tokenizer,
            decode=lambda ids: tokenizer.decode(list(ids)),
        )

    # -- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.net.text.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.text.wte.dtype

    @property
    def prefix_len(self) -> int:
        return 1 + self.config.vision.grid**2

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    # -- images -----------------------------------------------------------------------------
    def crops(self, image: Image.Image) -> Crops:
        v = self.config.vision
        return overlap_crops(
            np.asarray(image.convert("RGB")),
            crop_size=v.crop_size,
            patch_size=v.enc_patch_size,
            overlap_margin=v.overlap_margin,
            max_crops=v.max_crops,
            resampler=self.resampler,
        )

    @torch.inference_mode()
    def embed_image(self, image: Image.Image) -> torch.Tensor:
        """Image -> the [729, dim] embeddings the text model receives at positions 1..729."""
        crops = self.crops(image)
        features = self.net.vision.encode(self.net.vision.normalize(crops.pixels))
        return self.net.vision.embed(features, crops.tiling)

    @torch.inference_mode()
    def prefill_image(self, embeddings: torch.Tensor) -> EncodedImage:
        """Run BOS + image embeddings through the text model (bidirectional prefix)."""
        x = torch.cat([self.net.text.embed([self.config.tokenizer.bos_id]), embeddings])
        cache = self.net.text.new_cache(capacity=x.shape[0])
        self.net.text(x, [SeqSlice(cache, x.shape[0], prefix=x.shape[0])])
        k, v = cache.prefix(x.shape[0])
        return EncodedImage(pos=x.shape[0], k=k, v=v)

    def encode_image(self, image: Image.Image | EncodedImage) -> EncodedImage:
        if isinstance(image, EncodedImage):
            return image
        if not isinstance(image, Image.Image):
            raise TypeError("image must be a PIL image or an EncodedImage")
        return self.prefill_image(self.embed_image(image))

    # -- driving programs -------------------------------------------------------------------
    @property
    def graphs(self) -> DecodeGraphs | None:
        """The decode graphs of one-request-at-a-time runs, built on first use (None when off)."""
        enabled = self.decode_graphs if self.decode_graphs is not None else self.device.type == "cuda"
        if not enabled:
            return None
        if self._graphs is None:
            # One sequence's full-context slot plus the graphs' scratch slot.
            self._graphs = DecodeGraphs(self.net.text, self.net.text.new_pool(2), max_batch=1)
        return self._graphs

    def start_cache(self, image: EncodedImage | None, pool: KVPool | None = None) -> tuple[KVCache, int]:
        """A fresh sequence cache holding the image prefix (or empty), and its bidirectional prefix."""
        if image is None:
            return self.net.text.new_cache(capacity=64, pool=pool), 0
        max_context = self.config.text.max_context
        cache = KVCache.from_prefix(image.k, image.v, max_context, extra_capacity=64, pool=pool)
        return cache, image.pos

    @torch.inference_mode()
    def step(self, x: torch.Tensor, seq: SeqSlice) -> StepOutput:
        graphs = self._graphs
        if graphs is not None and graphs.accepts(seq.cache, seq.length, seq.prefix):
            hiddens, logits = graphs.step(x, [seq.cache])
            return StepOutput(hidden=hiddens[0], logits=logits[0])
        hidden = self.net.text(x, [seq])[-1]
        return StepOutput(hidden=hidden, logits=self.net.text.logits(hidden).float())

    def run(self, program: Program, image: EncodedImage | None) -> TaskResult:
        """Drive one program to completion."""
        for _ in self._steps(program, image):
            pass
        return self.last_result

    def _steps(self, program: Program, image: EncodedImage | None) -> Iterator[None]:
        """Drive a program, pausing after every forward step (so streams can flush)."""
        graphs = self.graphs
        # A pooled cache when the slot is free (a stream left unfinished may still hold it).
        cache, prefix = self.start_cache(image, pool=graphs.pool if graphs is not None else None)
        self.last_first_output_at = None
        x = next(program)
        while True:
            out = self.step(x, SeqSlice(cache, x.shape[0], prefix=prefix))
            if self.last_first_output_at is None:
                self.last_first_output_at = time.perf_counter()
            yield
            try:
                x = program.send(out)
            except StopIteration as stop:
                self.last_result = stop.value
                return

    def _stream(
        self, make: Callable[[Callable[[str], None]], Program], image: EncodedImage | None
    ) -> Iterator[str]:
        pending: list[str] = []
        for _ in self._steps(make(pending.append), image):
            yield from pending
            pending.clear()
        yield from pending

    def _context_left(self, image: EncodedImage | None) -> int:
        return self.config.text.max_context - (image.pos if image is not None else 0)

    # -- public API (mirrors the official one) ----------------------------------------------
    def caption(
        self,
        image: Image.Image | EncodedImage,
        length: Literal["normal", "short", "long"] = "normal",
        stream: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        parsed = TextSettings.parse(settings)
        if length not in self.config.tokenizer.templates["caption"]:
            raise ValueError(f"unsupported caption length {length!r}")
        enc = self.encode_image(image)
        left = self._context_left(enc)

        def make(on_text: Callable[[str], None] | None) -> Program:
            return caption_program(self.ctx, length, parsed, left, on_text)

        if stream:
            return {"caption": self._stream(make, enc)}
        result = self.run(make(None), enc)
        assert result.text is not None
        return {"caption": result.text.text}

    def query(
        self,
        image: Image.Image | EncodedImage | None = None,
        question: str | None = None,
        reasoning: bool = False,
        spatial_refs: Sequence[SpatialRef] | None = None,
        stream: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if question is None:
            raise ValueError("question must be provided")
        if spatial_refs and image is None:
            raise ValueError("spatial_refs can only be used with an image")
        validate_spatial_refs(spatial_refs)
        parsed = TextSettings.parse(settings)
        enc = self.encode_image(image) if image is not None else None
        left = self._context_left(enc)
        question_ids = self.encode_text(question)

        def make(on_text: Callable[[str], None] | None) -> Program:
            return query_program(
                self.ctx,
                question_ids,
                parsed,
                left,
                with_image=enc is not None,
                reasoning=reasoning,
                spatial_refs=spatial_refs,
                on_text=on_text,
            )

        if stream and not reasoning:
            return {"answer": self._stream(make, enc)}
        result = self.run(make(None), enc)
        assert result.text is not None
        out: dict[str, Any] = {}
        if reasoning:
            out["reasoning"] = {"text": result.reasoning_text, "grounding": result.grounding}
        out["answer"] = iter([result.text.text]) if stream else result.text.text
        return out

    def detect(
        self, image: Image.Image | EncodedImage, object: str, settings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"objects": self._region("detect", image, object, settings)}

    def point(
        self, image: Image.Image | EncodedImage, object: str, settings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"points": self._region("point", image, object, settings)}

    def _region(
        self,
        task: Literal["detect", "point"],
        image: Image.Image | EncodedImage,
        obj: str,
        settings: dict[str, Any] | None,
    ) -> list[dict[str, float]]:
        parsed = TextSettings.parse(settings)
        enc = self.encode_image(image)
        program = region_program(
            self.ctx, task, self.encode_text(" " + obj), parsed.max_objects, self._context_left(enc)
        )
        return self.run(program, enc).objects


def validate_spatial_refs(refs: Sequence[SpatialRef] | None) -> None:
    import math

    for ref in refs or ():
        if len(ref) not in (2, 4):
            raise ValueError("each spatial reference must be [x, y] or [x_min, y_min, x_max, y_max]")
        if not all(isinstance(v, int | float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in ref):
            raise ValueError("spatial reference values must be finite numbers in [0, 1]")
        if len(ref) == 4 and (ref[0] > ref[2] or ref[1] > ref[3]):
            raise ValueError("spatial reference boxes must have x_min <= x_max and y_min <= y_max")
