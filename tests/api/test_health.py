"""/health shows no filesystem paths: a local model folder appears by its name only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from moondream_server.api.health import public_model_name, redact_paths
from tests.api.support import TINY, LiveServer, tiny_settings


def test_public_model_name() -> None:
    assert public_model_name("vikhyatk/moondream2") == "vikhyatk/moondream2"
    assert public_model_name(str(TINY)) == "moondream2-tiny"
    assert public_model_name("/srv/models/md2/") == "md2"
    assert public_model_name("~/models/md2") == "md2"
    assert public_model_name("./md2") == "md2"


def test_redact_paths() -> None:
    model = "/srv/secret/md2"
    assert redact_paths(f"no file {model}/model.safetensors", model) == "no file md2/model.safetensors"
    assert redact_paths("repo not found", "vikhyatk/moondream2") == "repo not found"


def test_live_health_names_the_folder_only(server: LiveServer) -> None:
    with server.client() as c:
        for path in ("/health", "/v1/health"):
            text = c.get(path).text
            assert '"model":"moondream2-tiny"' in text.replace(" ", "")
            assert str(TINY.parent) not in text


def test_a_load_error_shows_no_path(start_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    missing = tmp_path / "private" / "weights"
    missing.mkdir(parents=True)  # a folder without model.safetensors: the load fails
    srv = start_server(tiny_settings(model=str(missing)), wait_ready=False)
    with srv.client() as c:
        for _ in range(200):
            health = c.get("/health").json()
            if health["error"]:
                break
            time.sleep(0.05)
        assert health["error"], health
        ready = c.get("/health/ready")
        assert ready.status_code == 503
        for text in (c.get("/health").text, ready.text):
            assert str(tmp_path) not in text and "private" not in text, text
            assert "weights" in text
