"""docs/deploy.md names only things that exist: settings, files, the builder, the health routes."""

from __future__ import annotations

import re

from moondream_server.deploy import healthcheck, ray_serve
from moondream_server.settings import Settings
from tests.deploy.helpers import REPO
from tests.deploy.test_docker import torch_pin

DOC = (REPO / "docs/deploy.md").read_text(encoding="utf-8")


def test_env_names_are_settings() -> None:
    extra = {"MOONDREAM_PUBLISH_PORT"}  # compose-only: the host port
    for name in set(re.findall(r"MOONDREAM_[A-Z_]+[A-Z]", DOC)) - extra:
        assert name.removeprefix("MOONDREAM_").lower() in Settings.model_fields, name


def test_builder_arguments_exist() -> None:
    table = DOC.split("Builder arguments", 1)[1].split("Unknown arguments", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    names = {name for cell in rows for name in re.findall(r"`(\w+)`", cell)}
    assert len(names) >= 8, names
    assert names <= set(ray_serve.ScaleOptions.model_fields), names - set(ray_serve.ScaleOptions.model_fields)
    assert "serve run moondream_server.deploy.ray_serve:app_builder" in DOC


def test_paths_routes_and_pins() -> None:
    for link in re.findall(r"\]\(\.\./([^)#]+)\)", DOC):
        assert (REPO / link).exists(), link
    for path in ("Dockerfile.cpu", "docker-compose.cpu.yml", "deploy/k8s/hpa.yaml", "deploy/ray/serve.yaml"):
        assert path in DOC and (REPO / path).exists(), path
    assert f"`GET {healthcheck.READY_PATH}`" in DOC and f"`GET {healthcheck.LIVE_PATH}`" in DOC
    assert set(re.findall(r"torch==([\w.+]+)", DOC)) == {torch_pin()}
    assert "pip install .\n" in DOC and "moondream-server --host 0.0.0.0 --port 8001" in DOC
