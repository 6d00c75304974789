"""Parity with the official reference implementation on the golden sets (fp32).

The expected values were produced by the reference code (see tests/fixtures/*/README.md); any
difference in preprocessing, attention layout, RoPE, masks, templates, loops or decoding
changes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from moondream_server.model import EncodedImage, Moondream, load
from moondream_server.model.decoding import caption_program
from moondream_server.model.sampling import TextSettings
from moondream_server.model.text import SeqSlice
from tests.model.support import TEST_DEVICE, TINY, TINY_MH, golden

SETS = [(TINY, "", "pil"), (TINY, "vips", "vips"), (TINY_MH, "", "pil")]
SET_IDS = ["tiny-pil", "tiny-vips", "tiny-mh"]
TEXT = {"max_tokens": 12, "temperature": 0.0}
REGION = {"max_objects": 4}
QUESTION = "What is in this image?"


class GoldenRun:
    def __init__(self, folder: Path, sub: str, resampler: str) -> None:
        self.folder = folder
        self.expected = golden(folder, sub)
        self.tensors = load_file(str(folder / sub / "expected.safetensors"), device=TEST_DEVICE)
        self.model: Moondream = load(folder, device=TEST_DEVICE, dtype=torch.float32, resampler=resampler)  # type: ignore[arg-type]
        self._encoded: dict[str, EncodedImage] = {}

    def image(self, name: str) -> Image.Image:
        return Image.open(self.folder / self.expected["images"][name]["file"])

    def encoded(self, name: str) -> EncodedImage:
        if name not in self._encoded:
            self._encoded[name] = self.model.encode_image(self.image(name))
        return self._encoded[name]

    def call(self, name: str, task: str) -> dict[str, Any]:
        m, enc = self.model, self.encoded(name)
        calls = {
            "caption_short": lambda: m.caption(enc, "short", settings=TEXT),
            "caption_normal": lambda: m.caption(enc, "normal", settings=TEXT),
            "caption_long": lambda: m.caption(enc, "long", settings=TEXT),
            "query": lambda: m.query(enc, QUESTION, settings=TEXT),
            "query_spatial_point": lambda: m.query(enc, QUESTION, spatial_refs=[[0.25, 0.5]], settings=TEXT),
            "query_spatial_box": lambda: m.query(
                enc, QUESTION, spatial_refs=[[0.1, 0.2, 0.6, 0.7]], settings=TEXT
            ),
            "detect": lambda: m.detect(enc, "cat", settings=REGION),
            "point": lambda: m.point(enc, "cat", settings=REGION),
            "query_reasoning": lambda: m.query(enc, QUESTION, reasoning=True, settings=TEXT),
        }
        return calls[task]()


_RUNS: dict[int, GoldenRun] = {}


def _cases() -> list[Any]:
    out = []
    for (folder, sub, _), set_id in zip(SETS, SET_IDS, strict=True):
        data = golden(folder, sub)
        for name, image in data["images"].items():
            for task in image["tasks"]:
                out.append(pytest.param(set_id, name, task, id=f"{set_id}-{name}-{task}"))
    return out


def _images() -> list[Any]:
    return [
        pytest.param(set_id, name, id=f"{set_id}-{name}")
        for (folder, sub, _), set_id in zip(SETS, SET_IDS, strict=True)
        for name in golden(folder, sub)["images"]
    ]


def _get_run(set_id: str) -> GoldenRun:
    index = SET_IDS.index(set_id)
    if index not in _RUNS:
        _RUNS[index] = GoldenRun(*SETS[index])
    return _RUNS[index]


@pytest.mark.parametrize(("set_id", "name"), _images())
def test_tiling_and_crops(set_id: str, name: str) -> None:
    run = _get_run(set_id)
    exp = run.expected["images"][name]
    crops = run.model.crops(run.image(name))
    assert list(crops.tiling) == exp["tiling"]
    assert crops.pixels.shape[0] == exp["n_crops"]
    assert [hashlib.sha256(c.tobytes()).hexdigest() for c in crops.pixels] == exp["crop_sha256"]


@pytest.mark.parametrize(("set_id", "name"), _images())
def test_vision_features_and_embedding(set_id: str, name: str) -> None:
    run = _get_run(set_id)
    m, t = run.model, run.tensors
    crops = m.crops(run.image(name))
    with torch.inference_mode():
        features = m.net.vision.encode(m.net.vision.normalize(crops.pixels))
        pooled = m.net.vision.pool_local(features[1:], crops.tiling)
        embed = m.net.vision.project(features[0], pooled)
    assert (features[0] - t[f"{name}_vis_global"]).abs().max().item() <= 1e-4
    assert (pooled - t[f"{name}_vis_local_pooled"]).abs().max().item() <= 1e-4
    assert (embed - t[f"{name}_embed"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("set_id", "name"), _images())
def test_first_step_logits(set_id: str, name: str) -> None:
    run = _get_run(set_id)
    m = run.model
    ids = m.config.tokenizer.templates["caption"]["normal"]
    cache, prefix = m.start_cache(run.encoded(name))
    out = m.step(m.net.text.embed(ids), SeqSlice(cache, len(ids), prefix=prefix))
    expected = run.tensors[f"{name}_caption_normal_logits0"]
    assert (out.logits - expected).abs().max().item() <= 2e-4


@pytest.mark.parametrize(("set_id", "name", "task"), _cases())
def test_task_result(set_id: str, name: str, task: str) -> None:
    run = _get_run(set_id)
    exp = run.expected["images"][name]["tasks"][task]
    got = json.loads(json.dumps(run.call(name, task)))  # tuples -> lists, as stored
    assert got == exp["result"]


@pytest.mark.parametrize(("set_id", "name"), _images())
def test_caption_token_ids(set_id: str, name: str) -> None:
    """The greedy ids themselves, not only the decoded string (ids >= 600 decode to nothing)."""
    run = _get_run(set_id)
    m = run.model
    for length in ("short", "normal", "long"):
        exp = run.expected["images"][name]["tasks"][f"caption_{length}"]
        program = caption_program(m.ctx, length, TextSettings.parse(TEXT), 2048 - 730)
        result = m.run(program, run.encoded(name))
        assert result.text is not None
        assert result.text.tokens == exp["generated_ids"]
        assert result.text.finish_reason == ("stop" if exp["stopped_by"] == "eos" else "length")


@pytest.mark.parametrize("set_id", SET_IDS)
def test_text_only_query(set_id: str) -> None:
    run = _get_run(set_id)
    exp = run.expected["text_only"]["q0"]
    assert run.model.query(None, QUESTION, settings=TEXT) == exp["result"]


def test_golden_images_cover_every_tiling_branch() -> None:
    """The golden set exercises (1,1), a grid limited by max_crops and wide/tall grids."""
    tilings = {tuple(i["tiling"]) for i in golden(TINY)["images"].values()}
    assert {(1, 1), (2, 4), (3, 3), (2, 6)} <= tilings
