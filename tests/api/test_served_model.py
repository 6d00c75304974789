"""The served model's names: the alias rule, and refusals of other models and LoRA variants."""

from __future__ import annotations

import httpx
import pytest

from moondream_server.api.served_model import is_served
from tests.api.support import IMAGES, file_data_url

IMAGE = file_data_url(IMAGES[0])


@pytest.mark.parametrize(
    "name",
    [
        "moondream2",
        "Moondream2",
        "vikhyatk/moondream2",
        "moondream-2b",
        "moondream",
        "moondream:latest",
        "moondream2:latest",
        "moondream3-preview",
        "moondream/moondream3-preview",
        "/models/my-folder",
        "my-folder",
    ],
)
def test_names_of_the_served_model(name: str) -> None:
    assert is_served(name, "/models/my-folder")


@pytest.mark.parametrize(
    "name",
    ["gpt-4o", "moondream3-preview/ft-1@40", "moondream2:q4_K_M", "moondream-9b", "", "llava", "moondream3"],
)
def test_other_models_are_not_served(name: str) -> None:
    assert not is_served(name, "vikhyatk/moondream2")


@pytest.mark.parametrize(
    ("body", "param"),
    [({"variant": "my-lora"}, "variant"), ({"settings": {"variant": "my-lora"}}, "settings.variant")],
)
def test_a_lora_variant_is_refused_not_ignored(
    client: httpx.Client, body: dict[str, object], param: str
) -> None:
    for path, fields in (
        ("/v1/caption", {}),
        ("/v1/query", {"question": "Why?"}),
        ("/v1/point", {"object": "x"}),
    ):
        r = client.post(path, json={"image_url": IMAGE, **fields, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "variant_not_supported" and error["param"] == param
        assert "my-lora" in error["message"]


def test_the_served_name_is_answered_on_the_cloud_routes(client: httpx.Client) -> None:
    r = client.post("/v1/detect", json={"image_url": IMAGE, "object": "cat", "model": "moondream2"})
    assert r.status_code == 200
    r = client.post("/v1/detect", json={"image_url": IMAGE, "object": "cat", "model": "llava"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
