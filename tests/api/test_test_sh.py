"""test.sh (curl against every route) run against the live tiny-model server."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.support import LiveServer, tiny_settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "test.sh"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def run(base_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    full.update({"BASE_URL": base_url, **env})
    return subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=240, check=False
    )


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    srv = LiveServer(tiny_settings(api_keys="sh-key")).start()
    yield srv
    srv.stop()


def test_test_sh_passes_against_the_open_server(server: LiveServer) -> None:
    out = run(server.base_url)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) >= 30
    assert "all" in out.stdout and "checks passed" in out.stdout
    assert "FAIL" not in out.stdout + out.stderr


def test_test_sh_checks_keys(keyed_server: LiveServer) -> None:
    out = run(keyed_server.base_url, API_KEY="sh-key")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok   no key -> 401 (401)" in out.stdout


def test_test_sh_fails_loudly_on_an_unexpected_status(keyed_server: LiveServer) -> None:
    out = run(keyed_server.base_url)  # no key: the first inference call gets 401, not 200
    assert out.returncode != 0
    assert "FAIL POST /v1/caption: expected HTTP 200, got 401" in out.stderr


def test_test_sh_fails_when_nothing_listens() -> None:
    out = run("http://127.0.0.1:9")
    assert out.returncode != 0
    assert "FAIL" in out.stderr
