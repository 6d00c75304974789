"""The same model in bfloat16: close to the fp32 golden values, and valid outputs.

Observed here (torch 2.13 CPU): image embeddings drift by at most 0.12 and first-step logits by
at most 0.17 from the fp32 reference; the reference run in its own bf16 drifts by 0.12 / 0.18
(see tests/fixtures/moondream2-tiny/README.md). Bounds are about twice those numbers: a bug
(e.g. wrong normalisation dtype or a lost rotary cast) moves values by whole units.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from moondream_server.model import Moondream, load
from moondream_server.model.text import SeqSlice
from tests.model.support import TINY, TINY_MH, golden


@pytest.fixture(scope="module", params=[TINY, TINY_MH], ids=["tiny", "tiny-mh"])
def case(
    request: pytest.FixtureRequest,
) -> tuple[Moondream, dict[str, object], dict[str, torch.Tensor], object]:
    folder = request.param
    model = load(folder, device="cpu", dtype="bfloat16", resampler="pil")
    return model, golden(folder), load_file(str(folder / "expected.safetensors")), folder


def test_bf16_stays_close_to_fp32_reference(case: tuple[Moondream, dict, dict, object]) -> None:  # type: ignore[type-arg]
    model, expected, tensors, folder = case
    assert model.dtype == torch.bfloat16
    for name, image in expected["images"].items():
        img = Image.open(folder / image["file"])  # type: ignore[operator]
        emb = model.embed_image(img).float()
        assert (emb - tensors[f"{name}_embed"]).abs().max().item() < 0.25
        ids = model.config.tokenizer.templates["caption"]["normal"]
        cache, prefix = model.start_cache(model.encode_image(img))
        out = model.step(model.net.text.embed(ids), SeqSlice(cache, len(ids), prefix=prefix))
        assert (out.logits - tensors[f"{name}_caption_normal_logits0"]).abs().max().item() < 0.35


def test_bf16_outputs_are_valid(case: tuple[Moondream, dict, dict, object]) -> None:  # type: ignore[type-arg]
    model, expected, _, folder = case
    image = next(iter(expected["images"].values()))
    enc = model.encode_image(Image.open(folder / image["file"]))  # type: ignore[operator]
    assert isinstance(model.caption(enc, settings={"max_tokens": 8})["caption"], str)
    assert isinstance(model.query(enc, "what?", reasoning=True, settings={"max_tokens": 8})["answer"], str)
    for box in model.detect(enc, "cat", {"max_objects": 4})["objects"]:
        assert all(math.isfinite(v) for v in box.values())
        assert box["x_min"] <= box["x_max"] and box["y_min"] <= box["y_max"]
    for point in model.point(enc, "cat", {"max_objects": 4})["points"]:
        assert 0.0 <= point["x"] < 1.0 and 0.0 <= point["y"] < 1.0
