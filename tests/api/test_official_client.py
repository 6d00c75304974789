"""The official ``moondream==2.6.1`` client against the live server, unchanged:
``md.vl(endpoint="http://127.0.0.1:PORT/v1", api_key=...)``.

Expected values come from the model called directly on the image the client actually uploads
(it re-encodes every image as JPEG q95; we decode that same data URL with Pillow here).
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
from collections.abc import Iterator
from typing import Any, Literal

import moondream as md
import pytest
from PIL import Image

from moondream_server.model import Moondream
from tests.api.support import GREEDY, IMAGES, LiveServer, tiny_settings

IMG1, IMG2, *_ = IMAGES
QUESTION = "What is in this image?"
KEY = "test-key-123"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours http_proxy even for 127.0.0.1 (see docs/api.md); keep the client direct."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    srv = LiveServer(tiny_settings(api_keys=KEY)).start()
    yield srv
    srv.stop()


def uploaded(model: Any, img: Image.Image) -> Image.Image:
    """The image exactly as the client sends it: its own JPEG data URL, decoded by Pillow."""
    url: str = model.encode_image(img).image_url
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as decoded:
        return decoded.convert("RGB")


@pytest.fixture
def vl(server: LiveServer) -> Any:
    return md.vl(endpoint=f"{server.base_url}/v1")


@pytest.fixture(scope="module")
def img1() -> Image.Image:
    with Image.open(IMG1) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def img2() -> Image.Image:
    with Image.open(IMG2) as img:
        return img.copy()  # mode L: the client converts it to RGB itself


@pytest.mark.parametrize("length", ["short", "normal", "long"])
def test_caption(
    vl: Any, tiny_model: Moondream, img1: Image.Image, length: Literal["short", "normal", "long"]
) -> None:
    settings = {"temperature": 0.0, "max_tokens": 40}
    out = vl.caption(img1, length=length, settings=settings)
    assert set(out) == {"caption"} and isinstance(out["caption"], str)
    assert (
        out["caption"] == tiny_model.caption(uploaded(vl, img1), length=length, settings=settings)["caption"]
    )


def test_caption_stream(vl: Any, tiny_model: Moondream, img1: Image.Image) -> None:
    settings = {"temperature": 0.0, "max_tokens": 40}
    out = vl.caption(img1, stream=True, settings=settings)
    pieces = list(out["caption"])
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tiny_model.caption(uploaded(vl, img1), settings=settings)["caption"]


def test_query(vl: Any, tiny_model: Moondream, img2: Image.Image) -> None:
    out = vl.query(img2, QUESTION, settings=GREEDY)
    assert set(out) == {"answer"}
    assert out["answer"] == tiny_model.query(uploaded(vl, img2), QUESTION, settings=GREEDY)["answer"]


def test_query_stream(vl: Any, tiny_model: Moondream, img2: Image.Image) -> None:
    out = vl.query(img2, QUESTION, stream=True, settings=GREEDY)
    joined = "".join(out["answer"])
    assert joined == vl.query(img2, QUESTION, settings=GREEDY)["answer"]
    assert joined == tiny_model.query(uploaded(vl, img2), QUESTION, settings=GREEDY)["answer"]


def test_query_reasoning(vl: Any, tiny_model: Moondream, img2: Image.Image) -> None:
    out = vl.query(img2, QUESTION, reasoning=True, settings=GREEDY)
    want = tiny_model.query(uploaded(vl, img2), QUESTION, reasoning=True, settings=GREEDY)
    assert set(out) == {"answer", "reasoning"}
    assert out["answer"] == want["answer"]
    assert out["reasoning"]["text"] == want["reasoning"]["text"]
    assert isinstance(out["reasoning"]["grounding"], list)
    assert len(out["reasoning"]["grounding"]) == len(want["reasoning"]["grounding"])
    for span in out["reasoning"]["grounding"]:
        assert {"start_idx", "end_idx", "points"} <= set(span)


def test_query_text_only(vl: Any, tiny_model: Moondream) -> None:
    out = vl.query(question=QUESTION, settings=GREEDY)
    assert out["answer"] == tiny_model.query(None, QUESTION, settings=GREEDY)["answer"]


def test_query_spatial_refs(vl: Any, tiny_model: Moondream, img2: Image.Image) -> None:
    refs = [[0.1, 0.2, 0.6, 0.7]]
    out = vl.query(img2, QUESTION, spatial_refs=refs, settings=GREEDY)
    want = tiny_model.query(uploaded(vl, img2), QUESTION, spatial_refs=refs, settings=GREEDY)
    assert out["answer"] == want["answer"]


def test_detect(vl: Any, tiny_model: Moondream, img2: Image.Image) -> None:
    out = vl.detect(img2, "cat", settings={"max_objects": 4})
    assert set(out) == {"objects"}
    want = tiny_model.detect(uploaded(vl, img2), "cat", settings={"max_objects": 4})["objects"]
    assert out["objects"] == want
    for box in out["objects"]:
        assert set(box) == {"x_min", "y_min", "x_max", "y_max"}


def test_point(vl: Any, tiny_model: Moondream, img2: Image.Image) -> None:
    out = vl.point(img2, "cat", settings={"max_objects": 4})
    assert set(out) == {"points"}
    assert out["points"] == tiny_model.point(uploaded(vl, img2), "cat", settings={"max_objects": 4})["points"]
    for p in out["points"]:
        assert set(p) == {"x", "y"} and 0.0 <= p["x"] <= 1.0 and 0.0 <= p["y"] <= 1.0


def test_encoded_image_is_reusable_and_trailing_slash_endpoint_works(
    server: LiveServer, img1: Image.Image
) -> None:
    vl_slash = md.vl(endpoint=f"{server.base_url}/v1/")  # the client then requests /v1//caption
    encoded = vl_slash.encode_image(img1)
    first = vl_slash.caption(encoded, settings=GREEDY)["caption"]
    assert vl_slash.caption(encoded, settings=GREEDY)["caption"] == first


def test_with_api_key(keyed_server: LiveServer, tiny_model: Moondream, img1: Image.Image) -> None:
    vl = md.vl(endpoint=f"{keyed_server.base_url}/v1", api_key=KEY)
    assert (
        vl.caption(img1, settings=GREEDY)["caption"]
        == tiny_model.caption(uploaded(vl, img1), settings=GREEDY)["caption"]
    )
    assert (
        "".join(vl.query(img1, QUESTION, stream=True, settings=GREEDY)["answer"])
        == (vl.query(img1, QUESTION, settings=GREEDY)["answer"])
    )
    assert isinstance(vl.detect(img1, "cat")["objects"], list)
    assert isinstance(vl.point(img1, "cat", settings={"max_objects": 4})["points"], list)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_raises_http_401(
    keyed_server: LiveServer, img1: Image.Image, key: str | None
) -> None:
    vl = md.vl(endpoint=f"{keyed_server.base_url}/v1", api_key=key)
    with pytest.raises(urllib.error.HTTPError) as caught:
        vl.caption(img1)
    assert caught.value.code == 401
    caught.value.close()
    stream = vl.query(img1, QUESTION, stream=True)["answer"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        next(iter(stream))
    assert caught.value.code == 401
    caught.value.close()


# ------------------------------------------------------------------------------ chat() and segment()


def chat_turn(vl: Any, img: Image.Image, question: str = QUESTION) -> list[dict[str, Any]]:
    url = vl.encode_image(img).image_url
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": content}]


def test_chat_answers_as_the_query_skill(vl: Any, tiny_model: Moondream, img2: Image.Image) -> None:
    out = vl.chat(chat_turn(vl, img2), settings=GREEDY)
    tiny_model.query(uploaded(vl, img2), QUESTION, settings=GREEDY)
    last = tiny_model.last_result
    assert out["message"]["role"] == "assistant"
    assert out["message"]["content"] == last.text.text
    assert out["finish_reason"] == last.text.finish_reason


def test_chat_stream(vl: Any, tiny_model: Moondream, img1: Image.Image) -> None:
    pieces = list(vl.chat(chat_turn(vl, img1), stream=True, settings=GREEDY)["message"])
    assert len(pieces) >= 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == tiny_model.query(uploaded(vl, img1), QUESTION, settings=GREEDY)["answer"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_reasoning_flag(vl: Any, tiny_model: Moondream, img2: Image.Image, stream: bool) -> None:
    want = tiny_model.query(uploaded(vl, img2), QUESTION, reasoning=True, settings=GREEDY)
    out = vl.chat(chat_turn(vl, img2), stream=stream, settings=GREEDY, reasoning=True)
    if stream:
        assert "".join(out["message"]) == want["answer"]
        return
    message = out["message"]
    assert message["content"] == want["answer"]
    assert message["reasoning"] == want["reasoning"]["text"]
    assert len(message["reasoning_details"]["grounding"]) == len(want["reasoning"]["grounding"])


def test_chat_with_api_key_sends_bearer(keyed_server: LiveServer, img1: Image.Image) -> None:
    vl = md.vl(endpoint=f"{keyed_server.base_url}/v1", api_key=KEY)
    assert isinstance(vl.chat(chat_turn(vl, img1), settings=GREEDY)["message"]["content"], str)
    with pytest.raises(urllib.error.HTTPError) as caught:
        md.vl(endpoint=f"{keyed_server.base_url}/v1", api_key="wrong").chat(chat_turn(vl, img1))
    assert caught.value.code == 401
    caught.value.close()


@pytest.mark.parametrize("model", ["moondream3-preview/ft-abc123@40", "moondream-9b"])
def test_a_model_the_server_does_not_serve_is_a_404(
    server: LiveServer, img1: Image.Image, model: str
) -> None:
    vl = md.vl(endpoint=f"{server.base_url}/v1", model=model)
    for call in (
        lambda: vl.chat(chat_turn(vl, img1)),
        lambda: vl.caption(img1),
        lambda: vl.detect(img1, "cat"),
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            call()
        assert caught.value.code == 404
        body = json.loads(caught.value.read())
        caught.value.close()
        assert body["error"]["code"] == "model_not_found" and model in body["error"]["message"]


def test_segment_raises_the_documented_501(vl: Any, img1: Image.Image) -> None:
    for stream in (False, True):
        with pytest.raises(urllib.error.HTTPError) as caught:
            out = vl.segment(img1, "cat", stream=stream)
            if stream:
                next(iter(out))
        assert caught.value.code == 501
        body = json.loads(caught.value.read())
        caught.value.close()
        assert "segmentation" in body["error"]["message"] and body["error"]["type"] == "not_implemented_error"
