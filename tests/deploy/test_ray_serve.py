"""The Ray Serve deployment: option mapping (no Ray needed) and a live run of two replicas of the tiny
model behind Ray's HTTP proxy on 127.0.0.1 (skipped only when ray is not installed; the dev extra
installs it, so CI runs it)."""

from __future__ import annotations

import base64
import importlib
import os
import socket
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import httpx
import pytest

from moondream_server.deploy.ray_serve import (
    REPLICA_HEADER,
    ScaleOptions,
    deployment_options,
    replica_settings,
    split_args,
)
from tests.deploy.helpers import REPO

TINY = REPO / "tests/fixtures/moondream2-tiny"


# --------------------------------------------------------------------------- option mapping


def test_settings_map_to_ray_options() -> None:
    settings, scale = split_args(
        {
            "model": str(TINY),
            "device": "cpu",
            "engine": "serial",
            "max_queue": "16",
            "num_replicas": "3",
            "num_cpus": "0.5",
        }
    )
    options = deployment_options(settings, scale)
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 2  # serial engine: one at a time, one waiting
    assert options["max_queued_requests"] == 16
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert replica_settings(settings, options)["max_queue"] == 16


def test_batched_engine_autoscaling_and_gpu_fraction() -> None:
    settings, scale = split_args(
        {
            "engine": "batched",
            "max_batch_size": "4",
            "min_replicas": "1",
            "max_replicas": "4",
            "num_gpus": "0.5",
        }
    )
    options = deployment_options(settings, scale)
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["target_ongoing_requests"] == 4.0
    assert (options["autoscaling_config"]["min_replicas"], options["autoscaling_config"]["max_replicas"]) == (
        1,
        4,
    )
    assert options["max_ongoing_requests"] == 8
    assert options["ray_actor_options"]["num_gpus"] == 0.5
    # a GPU device defaults to one whole GPU per replica
    gpu_settings, gpu_scale = split_args({"device": "cuda"})
    assert deployment_options(gpu_settings, gpu_scale)["ray_actor_options"]["num_gpus"] == 1.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown argument"):
        split_args({"replicas": "2"})
    with pytest.raises(ValueError, match="not both"):
        settings, scale = split_args({"num_replicas": "2", "max_replicas": "3"})
        deployment_options(settings, scale)
    with pytest.raises(ValueError):
        split_args({"num_gpus": "-1"})
    assert ScaleOptions().num_cpus == 1.0


def test_builder_returns_an_application() -> None:
    serve = _import_ray_serve()
    from moondream_server.deploy.ray_serve import app_builder

    app = app_builder({"model": str(TINY), "device": "cpu", "num_replicas": "2"})
    assert isinstance(app, serve.Application)


def test_serve_config_file() -> None:
    """deploy/ray/serve.yaml is a valid Serve config whose args the builder accepts."""
    _import_ray_serve()
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text(encoding="utf-8"))
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.port == 8001
    (application,) = config["applications"]
    assert application["import_path"] == "moondream_server.deploy.ray_serve:app_builder"
    settings, scale = split_args(application["args"])
    options = deployment_options(settings, scale)
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"]["num_gpus"] == 1


# --------------------------------------------------------------------------- live: a local Ray cluster


def _import_ray_serve() -> ModuleType:
    # Local Ray only, set before ray is first imported (it reads them then): no usage reporting, and
    # Ray's local-only mode, in which every Ray service binds and dials 127.0.0.1, not the host address.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ray's own deprecation warnings; pytest turns warnings into errors
        pytest.importorskip("ray")
        return importlib.import_module("ray.serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[ModuleType, str]]:
    """Local Ray with Serve's HTTP proxy on 127.0.0.1; used by the last tests of this module only."""
    serve = _import_ray_serve()
    import ray

    port = _free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield serve, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def ray_serve_url(ray_cluster: tuple[ModuleType, str]) -> Iterator[str]:
    from moondream_server.deploy.ray_serve import app_builder

    serve, url = ray_cluster
    app = app_builder(
        {
            "model": str(TINY),
            "device": "cpu",
            "dtype": "float32",
            "threads": "1",
            "num_replicas": "2",
            "num_cpus": "0.5",
            "ready_timeout_s": "120",
        }
    )
    serve.run(app, name="moondream", route_prefix="/")
    yield url
    serve.delete("moondream")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore")
def test_two_replicas_serve_concurrent_requests(ray_serve_url: str) -> None:
    image = base64.b64encode((TINY / "images/img1.png").read_bytes()).decode()
    body = {"image_url": f"data:image/png;base64,{image}", "length": "short", "settings": {"max_tokens": 4}}

    with httpx.Client(base_url=ray_serve_url, timeout=120) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.headers[REPLICA_HEADER]

        def caption(_: int) -> httpx.Response:
            return client.post("/v1/caption", json=body)

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(caption, range(16)))
        elapsed = time.monotonic() - started

    failures = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not failures, failures
    assert all(isinstance(r.json()["caption"], str) for r in responses)
    replicas = {r.headers[REPLICA_HEADER] for r in responses}
    assert len(replicas) == 2, f"both replicas should serve some requests, got {replicas}"
    assert elapsed < 60, elapsed


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore")
def test_a_model_that_fails_to_load_fails_the_deployment(ray_cluster: tuple[ModuleType, str]) -> None:
    """No half-alive replica: a load error fails the replica's start, and Ray reports the deployment."""
    from moondream_server.deploy.ray_serve import app_builder

    serve, _ = ray_cluster
    app = app_builder({"model": "/nonexistent/moondream", "device": "cpu", "num_cpus": "0.5"})
    with pytest.raises(RuntimeError, match="failed"):
        serve.run(app, name="broken", route_prefix="/broken")
    serve.delete("broken")
