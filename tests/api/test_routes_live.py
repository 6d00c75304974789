"""Every inference route of both families against a live server, checked against the model
called directly with the same inputs and settings (the model's own exactness is tested against
golden data elsewhere)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from PIL import Image, ImageOps

from moondream_server.model import Moondream
from tests.api.support import GREEDY, IMAGES, TINY, LiveServer, encoded, file_data_url, open_rgb

IMG1, IMG2, IMG3, IMG4, IMG5 = IMAGES
QUESTION = "What is in this image?"


def boxes(objs: list[dict[str, Any]]) -> list[tuple[float, float, float, float]]:
    return [(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in objs]


def pts(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(p["x"], p["y"]) for p in points]


def expected_boxes(m: Moondream, img: Image.Image, obj: str, settings: dict[str, Any] | None) -> list[Any]:
    return boxes(m.detect(img, obj, settings=settings)["objects"])


def expected_points(m: Moondream, img: Image.Image, obj: str, settings: dict[str, Any] | None) -> list[Any]:
    return pts(m.point(img, obj, settings=settings)["points"])


def check_v1_envelope(body: dict[str, Any], skill: str) -> None:
    assert isinstance(body["request_id"], str) and f"_{skill}_" in body["request_id"]
    assert set(body["metrics"]) == {
        "input_tokens",
        "output_tokens",
        "prefill_time_ms",
        "decode_time_ms",
        "ttft_ms",
    }
    if skill in ("caption", "query"):
        assert body["finish_reason"] in ("stop", "length")


# ------------------------------------------------------------------------------ health, docs


def test_health_reports_the_loaded_model(client: httpx.Client) -> None:
    for path in ("/health", "/v1/health"):
        r = client.get(path)
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok"
        assert body["ready"] is True and body["model_loaded"] is True
        assert body["model"] == TINY.name
        assert body["device"] == "cpu"
        assert body["dtype"] == "float32"
        assert body["engine"] == "batched"  # the default
    for path in ("/health/ready", "/v1/health/ready"):
        r = client.get(path)
        assert r.status_code == 200 and r.json()["ready"] is True


def test_docs_and_openapi_describe_every_route(client: httpx.Client) -> None:
    assert "swagger" in client.get("/docs").text.lower()
    assert "redoc" in client.get("/redoc").text.lower()
    spec = client.get("/openapi.json").json()
    inference = [
        "/v1/caption",
        "/v1/query",
        "/v1/detect",
        "/v1/point",
        "/caption",
        "/query",
        "/detect",
        "/point",
        "/upload/caption",
        "/upload/query",
        "/upload/detect",
        "/upload/point",
    ]
    for path in inference:
        op = spec["paths"][path]["post"]
        assert "requestBody" in op, path
        for status in ("200", "400", "401", "413", "422", "429", "503", "504"):
            assert status in op["responses"], (path, status)
        assert "$ref" in json.dumps(op["responses"]["200"]), path  # a typed response model
    for path in ("/health", "/health/ready"):
        assert "get" in spec["paths"][path]
    assert "X-Moondream-Auth" in json.dumps(spec["components"]["securitySchemes"])


# ------------------------------------------------------------------------------ /v1 family


@pytest.mark.parametrize("path", [IMG1, IMG2, IMG5], ids=lambda p: p.stem)  # RGB, L, 13 crops
def test_v1_caption_matches_model(client: httpx.Client, tiny_model: Moondream, path: Path) -> None:
    r = client.post("/v1/caption", json={"image_url": file_data_url(path), "settings": GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    check_v1_envelope(body, "caption")
    assert body["caption"] == tiny_model.caption(encoded(tiny_model, path), settings=GREEDY)["caption"]


@pytest.mark.parametrize("length", ["short", "normal", "long"])
def test_v1_caption_lengths(
    client: httpx.Client, tiny_model: Moondream, length: Literal["short", "normal", "long"]
) -> None:
    settings = {"temperature": 0.0, "max_tokens": 40}
    r = client.post(
        "/v1/caption", json={"image_url": file_data_url(IMG1), "length": length, "settings": settings}
    )
    assert r.status_code == 200, r.text
    assert (
        r.json()["caption"]
        == tiny_model.caption(encoded(tiny_model, IMG1), length=length, settings=settings)["caption"]
    )


def test_v1_caption_lengths_differ_on_the_server(client: httpx.Client) -> None:
    """The length really reaches the model (the fixture's three captions of img1 differ)."""
    settings = {"temperature": 0.0, "max_tokens": 40}
    got = {
        client.post(
            "/v1/caption", json={"image_url": file_data_url(IMG1), "length": length, "settings": settings}
        ).json()["caption"]
        for length in ("short", "normal", "long")
    }
    assert len(got) == 3


@pytest.mark.parametrize("path", [IMG1, IMG2, IMG4], ids=lambda p: p.stem)
def test_v1_query_matches_model(client: httpx.Client, tiny_model: Moondream, path: Path) -> None:
    r = client.post(
        "/v1/query", json={"image_url": file_data_url(path), "question": QUESTION, "settings": GREEDY}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    check_v1_envelope(body, "query")
    assert "reasoning" not in body
    assert body["answer"] == tiny_model.query(encoded(tiny_model, path), QUESTION, settings=GREEDY)["answer"]


def test_v1_query_text_only(client: httpx.Client, tiny_model: Moondream) -> None:
    r = client.post("/v1/query", json={"question": QUESTION, "stream": False, "settings": GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == tiny_model.query(None, QUESTION, settings=GREEDY)["answer"]


@pytest.mark.parametrize("path", [IMG1, IMG2], ids=lambda p: p.stem)
def test_v1_query_reasoning(client: httpx.Client, tiny_model: Moondream, path: Path) -> None:
    body = {"image_url": file_data_url(path), "question": QUESTION, "reasoning": True, "settings": GREEDY}
    r = client.post("/v1/query", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    want = tiny_model.query(encoded(tiny_model, path), QUESTION, reasoning=True, settings=GREEDY)
    assert got["answer"] == want["answer"]
    assert got["reasoning"]["text"] == want["reasoning"]["text"]
    assert [
        (g["start_idx"], g["end_idx"], [tuple(p) for p in g["points"]]) for g in got["reasoning"]["grounding"]
    ] == [
        (g["start_idx"], g["end_idx"], [tuple(p) for p in g["points"]])
        for g in want["reasoning"]["grounding"]
    ]


@pytest.mark.parametrize("refs", [[[0.25, 0.5]], [[0.1, 0.2, 0.6, 0.7]]], ids=["point", "box"])
def test_v1_query_spatial_refs(client: httpx.Client, tiny_model: Moondream, refs: list[list[float]]) -> None:
    body = {"image_url": file_data_url(IMG2), "question": QUESTION, "spatial_refs": refs, "settings": GREEDY}
    r = client.post("/v1/query", json=body)
    assert r.status_code == 200, r.text
    want = tiny_model.query(encoded(tiny_model, IMG2), QUESTION, spatial_refs=refs, settings=GREEDY)["answer"]
    assert r.json()["answer"] == want


@pytest.mark.parametrize("path", [IMG1, IMG2, IMG5], ids=lambda p: p.stem)
def test_v1_detect_matches_model(client: httpx.Client, tiny_model: Moondream, path: Path) -> None:
    r = client.post(
        "/v1/detect", json={"image_url": file_data_url(path), "object": "cat", "settings": {"max_objects": 4}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    check_v1_envelope(body, "detect")
    assert boxes(body["objects"]) == expected_boxes(
        tiny_model, encoded(tiny_model, path), "cat", {"max_objects": 4}
    )


def test_v1_detect_default_settings(client: httpx.Client, tiny_model: Moondream) -> None:
    r = client.post("/v1/detect", json={"image_url": file_data_url(IMG2), "object": "dog"})
    assert r.status_code == 200, r.text
    assert boxes(r.json()["objects"]) == expected_boxes(tiny_model, encoded(tiny_model, IMG2), "dog", None)


@pytest.mark.parametrize("path", [IMG2], ids=lambda p: p.stem)
def test_v1_point_matches_model(client: httpx.Client, tiny_model: Moondream, path: Path) -> None:
    r = client.post("/v1/point", json={"image_url": file_data_url(path), "object": "cat"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_v1_envelope(body, "point")
    want = expected_points(tiny_model, encoded(tiny_model, path), "cat", None)
    assert pts(body["points"]) == want
    assert body["count"] == len(want)


def test_v1_serves_a_model_alias_and_ignores_unknown_keys(
    client: httpx.Client, tiny_model: Moondream
) -> None:
    # (a LoRA variant or another model is refused: tests/api/test_served_model.py)
    body = {
        "image_url": file_data_url(IMG1),
        "length": "normal",
        "stream": False,
        "model": "moondream3-preview",
        "something_new": [1, 2, 3],
        "settings": {**GREEDY, "future_knob": 1},
    }
    r = client.post("/v1/caption", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == tiny_model.caption(encoded(tiny_model, IMG1), settings=GREEDY)["caption"]


def test_double_and_trailing_slashes_are_served_without_redirect(client: httpx.Client) -> None:
    body = {"image_url": file_data_url(IMG1), "settings": GREEDY}
    plain = client.post("/v1/caption", json=body).json()["caption"]
    for path in ("/v1//caption", "/v1///caption", "/v1/caption/"):
        r = client.post(path, json=body, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.json()["caption"] == plain


def test_responses_are_never_compressed(client: httpx.Client) -> None:
    big = {"question": QUESTION, "settings": {"temperature": 0.0, "max_tokens": 200}}
    r = client.post("/v1/query", json=big, headers={"Accept-Encoding": "gzip, br, deflate"})
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert r.headers["content-type"].startswith("application/json")


def test_bare_base64_and_other_mimes_accepted(client: httpx.Client, tiny_model: Moondream) -> None:
    url = file_data_url(IMG1)
    bare = url.split(",", 1)[1]
    want = tiny_model.caption(encoded(tiny_model, IMG1), settings=GREEDY)["caption"]
    for image in (bare, url.replace("image/png", "image/jpeg"), url.replace("image/png", "image/x-whatever")):
        r = client.post("/v1/caption", json={"image_url": image, "settings": GREEDY})
        assert r.status_code == 200, r.text
        assert r.json()["caption"] == want


# ------------------------------------------------------------------------------ seed family


def test_seed_caption(client: httpx.Client, tiny_model: Moondream) -> None:
    r = client.post("/caption", json={"image": file_data_url(IMG2), "length": "short", "settings": GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    assert (
        body["caption"]
        == tiny_model.caption(encoded(tiny_model, IMG2), length="short", settings=GREEDY)["caption"]
    )


def test_seed_query(client: httpx.Client, tiny_model: Moondream) -> None:
    r = client.post("/query", json={"image": file_data_url(IMG2), "question": QUESTION, "settings": GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    assert body["answer"] == tiny_model.query(encoded(tiny_model, IMG2), QUESTION, settings=GREEDY)["answer"]


def test_seed_detect(client: httpx.Client, tiny_model: Moondream) -> None:
    r = client.post(
        "/detect", json={"image": file_data_url(IMG1), "object": "cat", "settings": {"max_objects": 4}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    assert boxes(body["detections"]) == expected_boxes(
        tiny_model, encoded(tiny_model, IMG1), "cat", {"max_objects": 4}
    )


def test_seed_point(client: httpx.Client, tiny_model: Moondream) -> None:
    r = client.post(
        "/point", json={"image": file_data_url(IMG2), "object": "cat", "settings": {"max_objects": 4}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    want = expected_points(tiny_model, encoded(tiny_model, IMG2), "cat", {"max_objects": 4})
    assert pts(body["coordinates"]["points"]) == want
    assert body["coordinates"]["count"] == len(want)


def _file(path: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes(), "image/png")}


def test_upload_caption(client: httpx.Client, tiny_model: Moondream) -> None:
    data = {"length": "long", "settings": json.dumps(GREEDY)}
    r = client.post("/upload/caption", files=_file(IMG4), data=data)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success"
    assert (
        r.json()["caption"]
        == tiny_model.caption(encoded(tiny_model, IMG4), length="long", settings=GREEDY)["caption"]
    )


def test_upload_query(client: httpx.Client, tiny_model: Moondream) -> None:
    data = {"question": QUESTION, "settings": json.dumps(GREEDY), "spatial_refs": "[[0.25, 0.5]]"}
    r = client.post("/upload/query", files=_file(IMG2), data=data)
    assert r.status_code == 200, r.text
    want = tiny_model.query(encoded(tiny_model, IMG2), QUESTION, spatial_refs=[[0.25, 0.5]], settings=GREEDY)[
        "answer"
    ]
    assert r.json()["answer"] == want


def test_upload_detect(client: httpx.Client, tiny_model: Moondream) -> None:
    data = {"object": "cat", "settings": json.dumps({"max_objects": 4})}
    r = client.post("/upload/detect", files=_file(IMG4), data=data)
    assert r.status_code == 200, r.text
    assert boxes(r.json()["detections"]) == expected_boxes(
        tiny_model, open_rgb(IMG4), "cat", {"max_objects": 4}
    )


def test_upload_point(client: httpx.Client, tiny_model: Moondream) -> None:
    r = client.post(
        "/upload/point", files=_file(IMG3), data={"object": "cat", "settings": '{"max_objects": 4}'}
    )
    assert r.status_code == 200, r.text
    assert pts(r.json()["coordinates"]["points"]) == expected_points(
        tiny_model, open_rgb(IMG3), "cat", {"max_objects": 4}
    )


def test_seed_and_v1_agree(server: LiveServer, client: httpx.Client) -> None:
    url = file_data_url(IMG2)
    seed = client.post("/query", json={"image": url, "question": "hi", "settings": GREEDY}).json()
    v1 = client.post("/v1/query", json={"image_url": url, "question": "hi", "settings": GREEDY}).json()
    assert seed["answer"] == v1["answer"]


def _as(fmt: str, exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    src = open_rgb(IMG2)
    kwargs: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    src.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "orientation"),
    [("JPEG", None), ("WEBP", None), ("GIF", None), ("BMP", None), ("TIFF", None), ("JPEG", 6)],
    ids=["jpeg", "webp", "gif", "bmp", "tiff", "jpeg-exif-rotated"],
)
def test_image_formats_and_exif_through_the_server(
    client: httpx.Client, tiny_model: Moondream, fmt: str, orientation: int | None
) -> None:
    data = _as(fmt, orientation)
    with Image.open(io.BytesIO(data)) as img:
        upright = ImageOps.exif_transpose(img).convert("RGB")  # what the server must see
    if orientation == 6:
        assert upright.size == (480, 640)
    mime = f"image/{fmt.lower()}"
    r = client.post(
        "/upload/point",
        files={"file": ("x", data, mime)},
        data={"settings": '{"max_objects": 4}'} | {"object": "cat"},
    )
    assert r.status_code == 200, r.text
    want = expected_points(tiny_model, upright, "cat", {"max_objects": 4})
    assert pts(r.json()["coordinates"]["points"]) == want
