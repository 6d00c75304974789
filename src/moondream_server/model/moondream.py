"""The Moondream2 model with the official public API (caption, query, detect, point).

Calls take a PIL image or an ``EncodedImage`` (reuse skips the vision encoder and the image
prefill). The dict API is a thin layer: it builds a typed task (``tasks.py``) from its arguments
and drives that task's decode program through a ``MoondreamRuntime``, one request at a time; the
engine drives many requests through the same programs and runtime code (``model/seam.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from moondream_server.model.background_packing import BackgroundPacking
from moondream_server.model.config import MoondreamConfig
from moondream_server.model.cuda_graphs import DecodeGraphs
from moondream_server.model.decoding import Context, Program, StepOutput, TaskResult
from moondream_server.model.kv_cache import KVCache, KVPool
from moondream_server.model.moondream_runtime import EncodedImage, MoondreamRuntime
from moondream_server.model.net import MoondreamNet
from moondream_server.model.params import CaptionLength, TextSettings
from moondream_server.model.params import spatial_refs as parse_spatial_refs
from moondream_server.model.precision import Precision
from moondream_server.model.seam import CPU_VISION_CROPS, OnText
from moondream_server.model.tasks import CaptionTask, QueryTask, RegionSkill, RegionTask, Task
from moondream_server.model.text import SeqSlice
from moondream_server.model.tiling import Crops, Resampler, default_resampler, overlap_crops

__all__ = ["EncodedImage", "Moondream"]


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
        self.tokenizer = tokenizer
        # What load() chose for this machine (number formats, decode kernel), for /health.
        self.precision: Precision | None = None
        # Layers load() left to pack after it returned (float32 on the CPU); None when none.
        self.packing: BackgroundPacking | None = None
        self.config = config
        self.model_id = model_id
        self.revision = revision
        self.resampler: Resampler = resampler or default_resampler()
        self.ctx = Context(
            text=net.text,
            region=net.region,
            ids=config.tokenizer,
            decode=lambda ids: tokenizer.decode(list(ids)),
        )
        # Decode steps of the dict API through ``DecodeGraphs`` (CUDA graphs): None = on CUDA only.
        self.decode_graphs: bool | None = None
        self._solo_runtime: MoondreamRuntime | None = None
        # The token counts and finish reason of the dict API's last finished call (tests and
        # callers of the official-shaped API read usage figures from it).
        self.last_result = TaskResult()

    # -- what the engine reads (model/seam.py LoadedModel) ----------------------------------
    @property
    def device(self) -> torch.device:
        return self.net.text.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.text.wte.dtype

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def on_gpu(self) -> bool:
        return self.device.type != "cpu"

    def wait_packed(self, timeout: float | None = None) -> bool:
        """True once no layer is left to pack (at once when there were none), within `timeout` s."""
        return self.packing is None or self.packing.wait(timeout)

    @property
    def precision_name(self) -> str | None:
        if self.precision is None:
            return None
        packing = self.packing
        if packing is None or packing.done:
            return str(self.precision)
        return f"{self.precision}; packing in the background: {packing.packed} of {packing.total} layers"

    def runtime(
        self, *, max_vision_crops: int, kv_pool_slots: int, decode_graphs: bool | None = None
    ) -> MoondreamRuntime:
        return MoondreamRuntime(
            self, max_vision_crops=max_vision_crops, kv_pool_slots=kv_pool_slots, decode_graphs=decode_graphs
        )

    @property
    def _solo(self) -> MoondreamRuntime:
        """The dict API's runtime, built on first use: one request at a time, every crop of an
        image in one encoder pass on a GPU and ``CPU_VISION_CROPS`` at a time on a CPU (as the
        engine does); with decode graphs, one sequence's pooled slot for them."""
        graphs = self.decode_graphs if self.decode_graphs is not None else self.device.type == "cuda"
        if self._solo_runtime is None or (self._solo_runtime.decode_graphs is not None) != graphs:
            self._solo_runtime = self.runtime(
                max_vision_crops=self.config.vision.max_crops + 1 if self.on_gpu else CPU_VISION_CROPS,
                kv_pool_slots=1 if graphs else 0,
                decode_graphs=graphs,
            )
        return self._solo_runtime

    @property
    def graphs(self) -> DecodeGraphs | None:
        """The decode graphs of the dict API's runs (None when off)."""
        return self._solo.decode_graphs

    @property
    def prefix_len(self) -> int:
        """Positions of the image prefix: BOS + one per patch of the global crop."""
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
        return self._solo.embed_images([image])[0]

    @torch.inference_mode()
    def prefill_image(self, embeddings: torch.Tensor) -> EncodedImage:
        """Run BOS + image embeddings through the text model (bidirectional prefix)."""
        return self._solo.prefill(embeddings)

    def encode_image(self, image: Image.Image | EncodedImage) -> EncodedImage:
        if isinstance(image, EncodedImage):
            return image
        if not isinstance(image, Image.Image):
            raise TypeError("image must be a PIL image or an EncodedImage")
        return self.prefill_image(self.embed_image(image))

    # -- driving programs -------------------------------------------------------------------
    def start_cache(self, image: EncodedImage | None, pool: KVPool | None = None) -> tuple[KVCache, int]:
        """A fresh sequence cache holding the image prefix (or empty), and its bidirectional prefix."""
        seq = self._solo.new_sequence(image, pool)
        return seq.cache, seq.prefix

    @torch.inference_mode()
    def step(self, x: torch.Tensor, seq: SeqSlice) -> StepOutput:
        """One forward of ``x`` on one sequence: the output of its last position."""
        hidden = self.net.text(x, [seq])[-1]
        return StepOutput(hidden=hidden, logits=self.net.text.logits(hidden).float())

    def program(self, task: Task, on_text: OnText | None = None) -> Program:
        return self._solo.program(task, on_text)

    def run(self, program: Program, image: EncodedImage | None) -> TaskResult:
        """Drive one program to completion."""
        self.last_result = self._solo.run(program, image)
        return self.last_result

    def _stream(self, make: Callable[[OnText], Program], image: EncodedImage | None) -> Iterator[str]:
        pending: list[str] = []
        steps = self._solo.steps(make(pending.append), image)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                self.last_result = stop.value
                break
            yield from pending
            pending.clear()
        yield from pending

    # -- public API (mirrors the official one) ----------------------------------------------
    def caption(
        self,
        image: Image.Image | EncodedImage,
        length: CaptionLength = "normal",
        stream: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        task = CaptionTask(length, TextSettings.parse(settings))
        enc = self.encode_image(image)
        if stream:
            return {"caption": self._stream(lambda on_text: self.program(task, on_text), enc)}
        result = self.run(self.program(task), enc)
        assert result.text is not None
        return {"caption": result.text.text}

    def query(
        self,
        image: Image.Image | EncodedImage | None = None,
        question: str | None = None,
        reasoning: bool = False,
        spatial_refs: Sequence[Sequence[float]] | None = None,
        stream: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if question is None:
            raise ValueError("question must be provided")
        task = QueryTask(
            question,
            with_image=image is not None,
            reasoning=reasoning,
            spatial_refs=parse_spatial_refs(spatial_refs),
            settings=TextSettings.parse(settings),
        )
        enc = self.encode_image(image) if image is not None else None
        if stream and not reasoning:
            return {"answer": self._stream(lambda on_text: self.program(task, on_text), enc)}
        result = self.run(self.program(task), enc)
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
        skill: RegionSkill,
        image: Image.Image | EncodedImage,
        obj: str,
        settings: dict[str, Any] | None,
    ) -> list[dict[str, float]]:
        task = RegionTask(skill, obj, TextSettings.parse(settings))
        return self.run(self.program(task), self.encode_image(image)).objects
