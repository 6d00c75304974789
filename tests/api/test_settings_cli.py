"""Settings from the environment and from CLI flags; the console script's uvicorn call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from moondream_server.api import cli
from moondream_server.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MOONDREAM_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 8001)
    assert (s.model, s.revision) == ("vikhyatk/moondream2", "2025-06-21")
    assert (s.device, s.dtype, s.engine, s.cpu_weights) == ("auto", "auto", "batched", "auto")
    assert s.max_body_bytes == 20 * 1024 * 1024
    assert s.max_image_pixels == 50_000_000
    assert (s.max_queue, s.request_timeout_s, s.max_batch_size, s.image_cache_mb) == (64, 300.0, 8, 2048)
    assert s.threads is None and s.kv_pool == "auto" and s.cuda_graphs == "auto"
    assert s.quantize == "none"
    assert s.resolved_api_keys() == frozenset()


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n\n  other-file-key  \n")
    monkeypatch.setenv("MOONDREAM_PORT", "9100")
    monkeypatch.setenv("MOONDREAM_HOST", "0.0.0.0")
    monkeypatch.setenv("MOONDREAM_API_KEYS", " a , b,,")
    monkeypatch.setenv("MOONDREAM_API_KEY_FILE", str(keys))
    monkeypatch.setenv("MOONDREAM_ENGINE", "batched")
    monkeypatch.setenv("MOONDREAM_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MOONDREAM_THREADS", "3")
    s = Settings()
    assert (s.host, s.port, s.engine, s.log_level, s.threads) == ("0.0.0.0", 9100, "batched", "debug", 3)
    assert s.resolved_api_keys() == {"a", "b", "file-key", "other-file-key"}


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_MAX_QUEUE", "0")
    with pytest.raises(ValueError):
        Settings()


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_PORT", "9100")
    monkeypatch.setenv("MOONDREAM_MODEL", "from-env")
    s = cli.parse_settings(
        ["--port", "1234", "--api-key", "k1,k2", "--device", "cpu", "--dtype", "float32", "--max-queue", "5"]
    )
    assert (s.port, s.model, s.device, s.dtype, s.max_queue) == (1234, "from-env", "cpu", "float32", 5)
    assert s.resolved_api_keys() == {"k1", "k2"}
    s = cli.parse_settings(["--request-timeout", "2.5", "--engine", "serial", "--revision", "main"])
    assert (s.request_timeout_s, s.engine, s.revision) == (2.5, "serial", "main")
    assert cli.parse_settings(["--kv-pool", "on"]).kv_pool == "on"
    assert cli.parse_settings(["--cuda-graphs", "off"]).cuda_graphs == "off"
    with pytest.raises(SystemExit):
        cli.parse_settings(["--kv-pool", "sometimes"])
    assert cli.parse_settings(["--quantize", "int8"]).quantize == "int8"
    monkeypatch.setenv("MOONDREAM_QUANTIZE", "int8")
    assert cli.parse_settings([]).quantize == "int8"
    with pytest.raises(SystemExit):
        cli.parse_settings(["--quantize", "int4"])


def test_main_runs_uvicorn_with_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(server: uvicorn.Server, *args: Any) -> None:
        seen["app"] = server.config.app
        seen["config"] = server.config

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    cli.main(
        [
            *("--host", "0.0.0.0", "--port", "8123", "--model", "tests/fixtures/moondream2-tiny"),
            *("--api-key", "x", "--header-timeout", "3", "--keep-alive-timeout", "7"),
        ]
    )
    assert isinstance(seen["app"], FastAPI)
    config: uvicorn.Config = seen["config"]
    assert (config.host, config.port, config.timeout_keep_alive) == ("0.0.0.0", 8123, 7)
    assert getattr(config.http, "header_timeout_s", None) == 3
    assert seen["app"].state.settings.model == "tests/fixtures/moondream2-tiny"
    assert seen["app"].state.api_keys == {"x"}


@pytest.mark.parametrize("launcher", ["console-script", "python-m"])
def test_console_script_serves_and_shuts_down_cleanly(tmp_path: Path, launcher: str) -> None:
    """`moondream-server` (and `python -m moondream_server`) as a real process: flags and env reach
    the server; SIGTERM shuts it down gracefully (uvicorn finishes the lifespan, stopping the
    engine, then re-raises the signal)."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from tests.api.support import GREEDY, TINY

    exe = shutil.which("moondream-server", path=os.path.dirname(sys.executable))
    assert exe is not None, "the console script is not installed"
    command = [exe] if launcher == "console-script" else [sys.executable, "-m", "moondream_server"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOONDREAM_") and "proxy" not in k.lower()}
    env["MOONDREAM_API_KEYS"] = "env-key"
    args = [*command, "--model", str(TINY), "--device", "cpu", "--dtype", "float32", "--port", str(port)]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([*args, "--log-level", "info"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(base + "/health/ready", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        health = httpx.get(base + "/health", trust_env=False).json()
        assert (health["model"], health["device"], health["dtype"]) == (TINY.name, "cpu", "float32")
        body = {"question": "hi", "settings": GREEDY}
        assert (
            httpx.post(base + "/v1/query", json=body, trust_env=False).status_code == 401
        )  # the key came from the env
        r = httpx.post(
            base + "/v1/query", json=body, headers={"X-Moondream-Auth": "env-key"}, trust_env=False
        )
        assert r.status_code == 200 and isinstance(r.json()["answer"], str)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert code in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text, text
    assert "model is loaded and warm" in text
    assert (
        "authentication on: 1 key(s) from --api-key/MOONDREAM_API_KEYS; /metrics is behind the keys" in text
    )


def test_main_reports_bad_settings_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("must not start"))
    with pytest.raises(SystemExit) as caught:
        cli.main(["--port", "99999"])
    assert "port" in str(caught.value.code)
    with pytest.raises(SystemExit) as caught:
        cli.main(["--api-key-file", str(tmp_path / "missing")])
    assert "cannot read the API key file" in str(caught.value.code)
    monkeypatch.setenv("MOONDREAM_MAX_QUEUE", "lots")
    with pytest.raises(SystemExit) as caught:
        cli.main([])
    assert "max_queue" in str(caught.value.code)


def test_every_setting_and_flag_is_documented() -> None:
    """README's configuration table and docs/api.md's name every setting's variable and flag."""
    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    api = (repo / "docs/api.md").read_text(encoding="utf-8")
    flags = {dest: flag for flag, dest, _ in cli._FLAGS}
    missing = []
    for name in Settings.model_fields:
        if f"`MOONDREAM_{name.upper()}`" not in readme:
            missing.append(f"README: MOONDREAM_{name.upper()}")
        if f"| `{name.upper()}` |" not in api:
            missing.append(f"docs/api.md: {name.upper()}")
    for dest, flag in flags.items():
        assert dest in Settings.model_fields, flag
        for doc, text in (("README", readme), ("docs/api.md", api)):
            if f"`{flag}`" not in text:
                missing.append(f"{doc}: {flag}")
    assert missing == []
