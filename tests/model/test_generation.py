"""Sampling settings, limits, streaming and image modes, on a random checkpoint of our own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moondream_server.model import Moondream
from moondream_server.model.decoding import caption_program, region_program
from moondream_server.model.sampling import TextSettings, choose

GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    pixels[30:90, 40:120] = (250, 30, 30)
    return Image.fromarray(pixels)


def test_streaming_chunks_join_to_the_full_caption(random_model: Moondream, photo: Image.Image) -> None:
    full = random_model.caption(photo, "normal", settings=GREEDY)["caption"]
    chunks = list(random_model.caption(photo, "normal", stream=True, settings=GREEDY)["caption"])
    assert full and "".join(chunks) == full
    assert len(chunks) > 1  # released word by word, not in one piece at the end
    assert all(c.endswith((" ", "\n")) for c in chunks[:-1])


def test_streaming_query_joins_to_the_full_answer(random_model: Moondream, photo: Image.Image) -> None:
    full = random_model.query(photo, "what is red?", settings=GREEDY)["answer"]
    assert "".join(random_model.query(photo, "what is red?", stream=True, settings=GREEDY)["answer"]) == full


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_bounds_the_generated_tokens(
    random_model: Moondream, photo: Image.Image, max_tokens: int
) -> None:
    enc = random_model.encode_image(photo)
    settings = TextSettings.parse({"temperature": 0.0, "max_tokens": max_tokens})
    result = random_model.run(caption_program(random_model.ctx, "long", settings, 2048 - enc.pos), enc)
    assert result.text is not None
    assert len(result.text.tokens) <= max_tokens
    if len(result.text.tokens) == max_tokens:
        assert result.text.finish_reason == "length"


@pytest.mark.parametrize("max_objects", [1, 3])
def test_max_objects_bounds_detections(random_model: Moondream, photo: Image.Image, max_objects: int) -> None:
    assert len(random_model.detect(photo, "red box", {"max_objects": max_objects})["objects"]) <= max_objects
    assert len(random_model.point(photo, "red box", {"max_objects": max_objects})["points"]) <= max_objects


def test_region_budget_respects_the_context(random_model: Moondream, photo: Image.Image) -> None:
    enc = random_model.encode_image(photo)
    prompt_len = len(random_model.config.tokenizer.templates["detect"]["prefix"]) + 2 + 1
    left = prompt_len + 3 * 2  # room for exactly two objects
    ids = random_model.encode_text(" x")
    result = random_model.run(region_program(random_model.ctx, "detect", ids, 50, left), enc)
    assert len(result.objects) <= 2


def test_tiny_top_p_equals_greedy(random_model: Moondream, photo: Image.Image) -> None:
    """With top_p near 0 only the most likely token survives, so sampling must equal argmax."""
    greedy = random_model.caption(photo, settings=GREEDY)["caption"]
    torch.manual_seed(0)
    assert (
        random_model.caption(photo, settings={"temperature": 1.0, "top_p": 1e-9, "max_tokens": 24})["caption"]
        == greedy
    )


def test_choose_samples_within_the_nucleus() -> None:
    logits = torch.tensor([5.0, 4.9, 0.0, -1.0, -2.0])
    gen = torch.Generator().manual_seed(1)
    # p = [0.523, 0.473, 0.0035, ...]: mass before token 1 is 0.523, before token 2 is 0.996.
    assert {choose(logits, 1.0, 0.5, gen) for _ in range(200)} == {0}
    assert {choose(logits, 1.0, 0.6, gen) for _ in range(200)} == {0, 1}
    assert {choose(logits, 5.0, 1.0, gen) for _ in range(400)} == {0, 1, 2, 3, 4}
    assert choose(logits, 0.0, 0.1) == 0


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": -3},
        {"max_tokens": 0},
        {"max_objects": 0},
        {"max_tokens": 2.5},
        {"max_objects": True},
        {"temperature": "hot"},
        {"colour": 1},
        {"variant": "my-lora"},
    ],
)
def test_bad_settings_are_rejected(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TextSettings.parse(settings)


def test_settings_defaults_are_the_reference_ones() -> None:
    s = TextSettings.parse(None)
    assert (s.temperature, s.top_p, s.max_tokens, s.max_objects) == (0.5, 0.3, 768, 50)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_behave_like_their_rgb_conversion(
    random_model: Moondream, photo: Image.Image, mode: str
) -> None:
    converted = photo.convert(mode)
    expected = random_model.caption(converted.convert("RGB"), settings=GREEDY)
    assert random_model.caption(converted, settings=GREEDY) == expected


def test_text_only_query_and_spatial_refs_need_an_image(random_model: Moondream) -> None:
    assert isinstance(random_model.query(None, "hello?", settings=GREEDY)["answer"], str)
    with pytest.raises(ValueError, match="spatial_refs"):
        random_model.query(None, "where?", spatial_refs=[[0.5, 0.5]])


@pytest.mark.parametrize(
    "ref", [[0.5], [0.1, 0.2, 0.3], [0.6, 0.2, 0.4, 0.9], [1.5, 0.2], [float("nan"), 0.1]]
)
def test_bad_spatial_refs_are_rejected(random_model: Moondream, photo: Image.Image, ref: list[float]) -> None:
    with pytest.raises(ValueError):
        random_model.query(photo, "what?", spatial_refs=[ref])


def test_reasoning_returns_text_and_grounding(random_model: Moondream, photo: Image.Image) -> None:
    out = random_model.query(photo, "count", reasoning=True, settings=GREEDY)
    assert set(out) == {"reasoning", "answer"}
    assert isinstance(out["reasoning"]["text"], str)
    for span in out["reasoning"]["grounding"]:
        assert 0 <= span["start_idx"] <= span["end_idx"] <= len(out["reasoning"]["text"])
        assert all(len(p) == 2 for p in span["points"])


def test_encoded_image_reuse_equals_fresh_encoding(random_model: Moondream, photo: Image.Image) -> None:
    enc = random_model.encode_image(photo)
    assert random_model.detect(enc, "red", {"max_objects": 3}) == random_model.detect(
        photo, "red", {"max_objects": 3}
    )
