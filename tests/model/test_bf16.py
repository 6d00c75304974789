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

from moondream_server.model import Moondream, load, loading
from moondream_server.model.text import SeqSlice
from tests.model.support import TINY, TINY_MH, golden

# Both one-row (decode) kernels the loader can keep for bf16: PyTorch's own and oneDNN's.
CASES = [(TINY, "native"), (TINY, "onednn"), (TINY_MH, "native"), (TINY_MH, "onednn")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f.name}-{k}" for f, k in CASES])
def case(
    request: pytest.FixtureRequest,
) -> tuple[Moondream, dict[str, object], dict[str, torch.Tensor], object]:
    folder, kernel = request.param
    timings = (2.0, 1.0) if kernel == "native" else (1.0, 2.0)  # (oneDNN, own kernel) seconds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "time_one_row", lambda weights, reps=0: timings)
        model = load(folder, device="cpu", dtype="bfloat16", resampler="pil")
    assert model.precision is not None and ("matrix-vector" in model.precision.decode) == (kernel == "native")
    return model, golden(folder), load_file(str(folder / "expected.safetensors")), folder


@pytest.fixture(scope="module")
def fp32_models() -> dict[object, Moondream]:
    return {f: load(f, device="cpu", dtype="float32", resampler="pil") for f in (TINY, TINY_MH)}


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


def test_bf16_decode_steps_stay_close_to_fp32(
    case: tuple[Moondream, dict, dict, object],  # type: ignore[type-arg]
    fp32_models: dict[object, Moondream],
) -> None:
    """One-token steps (the kernel the loader picked) drift no more than the first step's bound.

    Both models are fed the float32 model's greedy tokens, so the inputs stay the same.
    """
    model, expected, _, folder = case
    exact = fp32_models[folder]
    image = Image.open(folder / next(iter(expected["images"].values()))["file"])  # type: ignore[operator]
    ids = model.config.tokenizer.templates["caption"]["normal"]
    runs = []
    for m in (model, exact):
        cache, prefix = m.start_cache(m.encode_image(image))
        runs.append(
            (m, cache, prefix, m.step(m.net.text.embed(ids), SeqSlice(cache, len(ids), prefix=prefix)))
        )
    for _ in range(4):
        token = int(runs[1][3].logits.argmax())
        runs = [(m, c, p, m.step(m.net.text.embed([token]), SeqSlice(c, 1, prefix=p))) for m, c, p, _ in runs]
        assert (runs[0][3].logits - runs[1][3].logits).abs().max().item() < 0.35


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
