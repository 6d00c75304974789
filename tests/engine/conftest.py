"""Fixtures for the engine tests that run the real tiny checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from moondream_server.model import Moondream, MoondreamConfig
from moondream_server.model.random_weights import write_checkpoint
from tests.engine.support import TINY, load_tiny


@pytest.fixture(scope="session")
def reference_model() -> Moondream:
    """The checkpoint called one request at a time: the independent source of expected values."""
    return load_tiny()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three fixture images with different tilings (1x1, 2x4 and 1x1 local crops); kept small for speed."""
    out = []
    for i, size in ((1, None), (2, None), (5, (320, 160))):
        with Image.open(TINY / "images" / f"img{i}.png") as im:
            rgb = im.convert("RGB")
        out.append(rgb if size is None else rgb.resize(size, Image.Resampling.BILINEAR))
    return out


@pytest.fixture(scope="session")
def never_stop_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with end-of-text unreachable: generation always runs to max_tokens."""
    folder = tmp_path_factory.mktemp("never-stop")
    config = MoondreamConfig.from_json(TINY / "config.json")
    return write_checkpoint(folder, config, TINY / "tokenizer.json", never_stop=True)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from threads, and on a busy machine spinning workers cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
