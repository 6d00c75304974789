"""The small modules the images run: the health check and the model prefetch (bake)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from moondream_server.deploy import healthcheck
from tests.deploy.helpers import REPO

TINY = REPO / "tests/fixtures/moondream2-tiny"


class _Handler(BaseHTTPRequestHandler):
    status: ClassVar[dict[str, int]] = {"/health": 200, healthcheck.READY_PATH: 503}

    def do_GET(self) -> None:
        self.send_response(self.status.get(self.path, 404))
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_follows_readiness(fake_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_PORT", str(fake_server))
    assert healthcheck.main([]) == 1  # 503: loading
    assert healthcheck.main(["--live"]) == 0
    monkeypatch.setitem(_Handler.status, healthcheck.READY_PATH, 200)
    assert healthcheck.main([]) == 0


def test_healthcheck_fails_when_nothing_listens(fake_server: int) -> None:
    port = fake_server
    assert healthcheck.main(["--port", "1", "--timeout", "2"]) == 1
    assert healthcheck.main(["--port", str(port), "--live"]) == 0


def _run_module(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


def test_prefetch_local_folder_lists_its_files() -> None:
    result = _run_module("moondream_server.deploy.prefetch", "--model", str(TINY), env={})
    assert result.returncode == 0, result.stderr
    assert f"weights: {TINY / 'model.safetensors'}" in result.stdout
    assert f"tokenizer: {TINY / 'tokenizer.json'}" in result.stdout


def test_prefetch_offline_with_empty_cache_fails_cleanly(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "MOONDREAM_MODEL": "vikhyatk/moondream2"}
    result = _run_module("moondream_server.deploy.prefetch", env=env)
    assert result.returncode == 1
    assert "prefetch failed" in result.stderr and "Traceback" not in result.stderr


def test_prefetch_reads_the_hub_cache(tmp_path: Path) -> None:
    """A cache populated in the Hub's layout is found offline: what the baked image relies on."""
    # huggingface_hub's cache layout: hub/models--{org}--{name}/{refs/<rev>, snapshots/<commit>/...}
    commit = "0" * 40
    for repo, files in (
        ("vikhyatk/moondream2", ("model.safetensors", "config.json")),
        ("moondream/starmie-v1", ("tokenizer.json",)),
    ):
        folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (folder / "refs").mkdir()
        for ref in ("main", "2025-06-21"):
            (folder / "refs" / ref).write_text(commit)
        for name in files:
            (snapshot / name).write_bytes((TINY / name).read_bytes())
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = _run_module("moondream_server.deploy.prefetch", env=env)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "hub") in result.stdout
