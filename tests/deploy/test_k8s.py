"""The Kubernetes manifest parses, hangs together, and probes routes the app really serves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from moondream_server.api.app import create_app
from moondream_server.deploy import healthcheck
from moondream_server.settings import Settings
from tests.deploy.helpers import REPO, parse_dockerfile

MANIFEST = REPO / "deploy/k8s/moondream-server.yaml"


def documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d is not None]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
    return by_kind


def container() -> dict[str, Any]:
    containers = documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


@pytest.fixture(scope="module")
def status_of() -> Callable[[str], int]:
    """GET a path of the app before its model is loaded (the lifespan is not run): the status code."""
    app = create_app(Settings(model=str(REPO / "tests/fixtures/moondream2-tiny"), device="cpu"))
    client = TestClient(app)
    return lambda path: client.get(path).status_code


def test_kinds_and_api_versions() -> None:
    docs = documents()
    assert {k: d["apiVersion"] for k, d in docs.items()} == {
        "PersistentVolumeClaim": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "PodDisruptionBudget": "policy/v1",
    }


def test_probes_point_at_app_routes(status_of: Callable[[str], int]) -> None:
    c = container()
    probes = {name: c[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(probe["port"] == "http" for probe in probes.values())
    # While the model loads: liveness (and startup) must pass, readiness must not.
    assert status_of(probes["startupProbe"]["path"]) == 200
    assert status_of(probes["livenessProbe"]["path"]) == 200
    assert status_of(probes["readinessProbe"]["path"]) == 503
    assert status_of("/no-such-route") == 404
    # the container health check (Dockerfiles, compose) uses the same routes
    assert probes["readinessProbe"]["path"] == healthcheck.READY_PATH
    assert probes["livenessProbe"]["path"] == healthcheck.LIVE_PATH
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "room for the first download"


def test_ports_selectors_and_pdb() -> None:
    docs = documents()
    c = container()
    port = Settings.model_fields["port"].default
    assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MOONDREAM_HOST"] == "0.0.0.0"
    assert env["MOONDREAM_PORT"] == str(port)
    for name in env:
        if name.startswith("MOONDREAM_"):
            assert name.removeprefix("MOONDREAM_").lower() in Settings.model_fields, name

    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        docs["Deployment"]["spec"]["selector"]["matchLabels"],
        docs["Service"]["spec"]["selector"],
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["port"] == port
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") is not None
    assert docs["Deployment"]["spec"]["replicas"] >= 2, "a PDB with one replica blocks node drains"


def test_resources_security_and_cache_volume() -> None:
    c = container()
    resources = c["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1

    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    dockerfile = parse_dockerfile(REPO / "Dockerfile")
    uid = int(dockerfile.final.all("USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid, "the image's user"

    hf_home = dockerfile.env(dockerfile.final)["HF_HOME"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"hf-cache": hf_home}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["hf-cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == documents()["PersistentVolumeClaim"]["metadata"]["name"]


def test_hpa_scales_the_deployment() -> None:
    hpa = yaml.safe_load((REPO / "deploy/k8s/hpa.yaml").read_text(encoding="utf-8"))
    deployment = documents()["Deployment"]
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] >= 2, "keeps the PodDisruptionBudget satisfiable"
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert "cpu" in container()["resources"]["requests"], "CPU utilisation needs a CPU request"


def test_hpa_queue_metric_is_one_the_app_exports() -> None:
    hpa = yaml.safe_load((REPO / "deploy/k8s/hpa.yaml").read_text(encoding="utf-8"))
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["moondream_queue_depth"]
    app = create_app(Settings(model=str(REPO / "tests/fixtures/moondream2-tiny"), device="cpu"))
    response = TestClient(app).get(
        documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    )
    assert response.status_code == 200
    samples = {line.split(" ")[0] for line in response.text.splitlines() if not line.startswith("#")}
    assert names[0] in samples


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
@pytest.mark.parametrize("name", ["moondream-server.yaml", "hpa.yaml"])
def test_valid_against_kubernetes_schemas(name: str, version: str) -> None:
    """Strict: unknown fields (typos) fail too. 1.29 is the oldest Kubernetes these files aim at."""
    wanted = kubernetes_validate.latest_version() if version == "latest" else version
    text = (REPO / "deploy/k8s" / name).read_text(encoding="utf-8")
    for doc in yaml.safe_load_all(text):
        kubernetes_validate.validate(doc, wanted, strict=True)


def test_kubernetes_schema_check_catches_typos() -> None:
    deployment = documents()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
