"""Fixtures for the model tests: the golden sets copied from the reference run, and random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moondream_server.model import Moondream, MoondreamConfig, load
from moondream_server.model.random_weights import write_checkpoint
from tests.model.support import TINY, TOKENIZER


@pytest.fixture(scope="session")
def tiny_pil() -> Moondream:
    return load(TINY, device="cpu", dtype=torch.float32, resampler="pil")


@pytest.fixture(scope="session")
def tiny_config() -> MoondreamConfig:
    return MoondreamConfig.from_json(TINY / "config.json")


@pytest.fixture(scope="session")
def random_folder(tmp_path_factory: pytest.TempPathFactory, tiny_config: MoondreamConfig) -> Path:
    """A tiny random checkpoint written by our own writer in the official layout."""
    return write_checkpoint(tmp_path_factory.mktemp("random"), tiny_config, TOKENIZER, seed=7)


@pytest.fixture(scope="session")
def random_model(random_folder: Path) -> Moondream:
    return load(random_folder, device="cpu", dtype=torch.float32)
