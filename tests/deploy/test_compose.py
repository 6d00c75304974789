"""The compose files, validated against the Compose Specification JSON schema (vendored in
tests/fixtures/compose-spec; no Docker engine or compose plugin exists here) and against the server:
port 8001, MOONDREAM_* names that are real settings, the health check, the HF cache volume."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import yaml

from moondream_server.settings import Settings
from tests.deploy.helpers import COMPOSE_FILES, REPO, parse_dockerfile

SCHEMA = json.loads((REPO / "tests/fixtures/compose-spec/compose-spec.json").read_text(encoding="utf-8"))


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with an empty environment."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def service(name: str) -> dict[str, Any]:
    services = load(name)["services"]
    assert list(services) == ["moondream"]
    svc = services["moondream"]
    assert isinstance(svc, dict)
    return svc


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_valid_against_compose_spec(name: str) -> None:
    validator = jsonschema.Draft7Validator(SCHEMA)
    errors = sorted(validator.iter_errors(load(name)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_file() -> None:
    """The vendored schema really checks something."""
    broken = load(COMPOSE_FILES[0])
    broken["services"]["moondream"]["restart"] = ["always"]
    broken["services"]["moondream"]["helthcheck"] = {}
    assert len(list(jsonschema.Draft7Validator(SCHEMA).iter_errors(broken))) >= 2


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_service_wiring(name: str) -> None:
    svc = service(name)
    port = Settings.model_fields["port"].default
    assert [interpolate(p).split(":")[-1] for p in svc["ports"]] == [str(port)]
    assert [interpolate(p) for p in svc["ports"]] == [f"{port}:{port}"], "default publish port"
    assert svc["restart"] in ("unless-stopped", "always")
    assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "moondream_server.deploy.healthcheck"]

    dockerfile = parse_dockerfile(REPO / svc["build"]["dockerfile"])
    hf_home = dockerfile.env(dockerfile.final)["HF_HOME"]
    top_volumes = load(name)["volumes"]
    mounts = [v.split(":") for v in svc["volumes"]]
    assert [m[1] for m in mounts] == [hf_home], "the named volume holds the Hugging Face cache"
    assert mounts[0][0] in top_volumes, "a named volume, so the model downloads once"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_environment_is_settings(name: str) -> None:
    env = {k: interpolate(str(v)) for k, v in service(name)["environment"].items()}
    names = {k.removeprefix("MOONDREAM_").lower(): v for k, v in env.items() if k.startswith("MOONDREAM_")}
    assert set(names) <= set(Settings.model_fields), set(names) - set(Settings.model_fields)
    settings = Settings(**names)  # the defaults the file passes parse
    assert settings.host == "0.0.0.0"
    assert settings.port == 8001
    assert set(env) - {f"MOONDREAM_{n.upper()}" for n in names} <= {"HF_HUB_OFFLINE", "HF_TOKEN"}


def test_gpu_file_reserves_a_gpu_and_cpu_file_does_not() -> None:
    gpu, cpu = (service(n) for n in COMPOSE_FILES)
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["build"]["dockerfile"] == "Dockerfile"
    assert interpolate(gpu["environment"]["MOONDREAM_DEVICE"]) == "cuda"
    assert "reservations" not in cpu.get("deploy", {}).get("resources", {})
    assert cpu["build"]["dockerfile"] == "Dockerfile.cpu"
    assert cpu["environment"]["MOONDREAM_DEVICE"] == "cpu"
    for svc in (gpu, cpu):
        assert "BAKE_MODEL" in svc["build"]["args"], "the model can be baked from compose too"
