"""Live-server fixtures: real uvicorn servers on 127.0.0.1 serving the real tiny checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from moondream_server.engine.base import Engine
from moondream_server.model import Moondream, MoondreamConfig, load
from moondream_server.model.random_weights import write_checkpoint
from moondream_server.settings import Settings
from tests.api.support import TINY, LiveServer, tiny_settings


@pytest.fixture(scope="session")
def tiny_model() -> Moondream:
    """The same checkpoint, called directly: the independent source of expected values."""
    return load(str(TINY), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    srv = LiveServer(tiny_settings()).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def never_stop_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with end-of-text unreachable: every generation runs to max_tokens."""
    folder = tmp_path_factory.mktemp("never-stop")
    return write_checkpoint(
        folder, MoondreamConfig.from_json(TINY / "config.json"), TINY / "tokenizer.json", never_stop=True
    )


@pytest.fixture
def start_server() -> Iterator[Callable[..., LiveServer]]:
    """Start extra servers with other settings; all are stopped at the end of the test."""
    started: list[LiveServer] = []

    def start(settings: Settings, engine: Engine | None = None, *, wait_ready: bool = True) -> LiveServer:
        srv = LiveServer(settings, engine).start(wait_ready=wait_ready)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
