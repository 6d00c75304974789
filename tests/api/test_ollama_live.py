"""The official ``ollama`` client against the live server's Ollama surface (tiny model, greedy).

Expected answers come from the model called directly with the same image and question; token
counts from the model's own record of that call and its image prefix length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest

from moondream_server.model import Moondream
from tests.api.support import IMAGES, LiveServer, encoded

IMG1, IMG2, *_ = IMAGES
QUESTION = "What is in this image?"
GREEDY = {"temperature": 0.0, "max_tokens": 12}
OPTIONS = {"temperature": 0, "num_predict": 12}


@pytest.fixture
def client(server: LiveServer) -> Iterator[ollama.Client]:
    c = ollama.Client(host=server.base_url, trust_env=False, timeout=120)
    yield c
    c._client.close()


def expected(model: Moondream, question: str, path: Any = IMG1) -> tuple[str, Any]:
    answer = model.query(encoded(model, path), question, settings=GREEDY)["answer"]
    return answer, model.last_result


def image_tokens(model: Moondream) -> int:
    return 1 + model.config.vision.grid**2


def test_chat_plain(client: ollama.Client, tiny_model: Moondream) -> None:
    answer, last = expected(tiny_model, QUESTION)
    out = client.chat(
        model="moondream2",
        messages=[{"role": "user", "content": QUESTION, "images": [IMG1.read_bytes()]}],
        stream=False,
        options=OPTIONS,
    )
    assert out.message.role == "assistant" and out.message.content == answer
    assert out.done is True and out.done_reason == last.text.finish_reason
    assert out.model == "moondream2:latest"
    assert out.prompt_eval_count == last.prompt_tokens + image_tokens(tiny_model)
    assert out.eval_count == len(last.text.tokens)
    assert out.total_duration is not None and out.total_duration > 0


def test_chat_streams_by_default(client: ollama.Client, tiny_model: Moondream, server: LiveServer) -> None:
    answer, last = expected(tiny_model, QUESTION, IMG2)
    messages = [{"role": "user", "content": QUESTION, "images": [IMG2.read_bytes()]}]
    parts = list(client.chat(model="moondream", messages=messages, stream=True, options=OPTIONS))
    *pieces, final = parts
    assert all(p.done is False for p in pieces) and final.done is True
    assert "".join(p.message.content or "" for p in parts) == answer
    assert final.done_reason == last.text.finish_reason and final.eval_count == len(last.text.tokens)
    # no "stream" key at all: Ollama's default is to stream, as NDJSON
    raw = {"model": "moondream2", "messages": messages[:1], "options": OPTIONS}
    raw["messages"] = [{**messages[0], "images": [ollama._types.Image(value=IMG2).model_dump()]}]
    with httpx.Client(trust_env=False, timeout=120) as c:
        r = c.post(f"{server.base_url}/api/chat", json=raw)
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) >= 2 and lines[-1]["done"] is True
    assert "".join(line["message"]["content"] for line in lines) == answer


@pytest.mark.parametrize("stream", [False, True])
def test_generate(client: ollama.Client, tiny_model: Moondream, stream: bool) -> None:
    answer, last = expected(tiny_model, QUESTION, IMG2)
    out = client.generate(model="moondream2", prompt=QUESTION, images=[IMG2], stream=stream, options=OPTIONS)
    if stream:
        parts = list(out)
        text, final = "".join(p.response for p in parts), parts[-1]
    else:
        text, final = out.response, out
    assert text == answer
    assert final.done is True and final.prompt_eval_count == last.prompt_tokens + image_tokens(tiny_model)


def test_generate_with_a_system_prompt_folds_it_before_the_question(
    client: ollama.Client, tiny_model: Moondream
) -> None:
    answer, _ = expected(tiny_model, "Be brief.\n\n" + QUESTION)
    out = client.generate(
        model="moondream2", prompt=QUESTION, system="Be brief.", images=[IMG1], stream=False, options=OPTIONS
    )
    assert out.response == answer


def test_think_reasons_first(client: ollama.Client, tiny_model: Moondream) -> None:
    want = tiny_model.query(encoded(tiny_model, IMG1), QUESTION, reasoning=True, settings=GREEDY)
    out = client.chat(
        model="moondream2",
        messages=[{"role": "user", "content": QUESTION, "images": [IMG1]}],
        think=True,
        stream=False,
        options=OPTIONS,
    )
    assert out.message.content == want["answer"]
    assert out.message.thinking == want["reasoning"]["text"]


def test_an_empty_chat_only_loads_the_model(client: ollama.Client) -> None:
    out = client.chat(model="moondream2", messages=[], stream=False)
    assert out.done is True and out.done_reason == "load"


def test_tags_show_version(client: ollama.Client) -> None:
    models = client.list().models
    assert [m.model for m in models] == ["moondream2:latest"]
    assert models[0].details is not None and models[0].details.family == "moondream"
    shown = client.show("moondream2")
    assert shown.capabilities is not None and "vision" in shown.capabilities
    assert client.show("moondream:latest").capabilities == shown.capabilities
    with httpx.Client(trust_env=False) as c:
        version = c.get(f"{str(client._client.base_url).rstrip('/')}/api/version").json()["version"]
    assert isinstance(version, str) and version


@pytest.mark.parametrize("name", ["llava:latest", "moondream2:q4_0", "moondream3-preview/ft-1@40"])
def test_another_model_is_a_404(client: ollama.Client, name: str) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=name, messages=[{"role": "user", "content": "hi"}], stream=False)
    assert caught.value.status_code == 404 and name in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.show(name)
    assert caught.value.status_code == 404


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"options": {"top_k": 10}}, "top_k"),
        ({"options": {"seed": 1}}, "seed"),
        ({"options": {"stop": ["\n"]}}, "stop"),
        ({"format": "json"}, "format"),
        ({"options": {"num_predict": 0}}, "num_predict"),
    ],
)
def test_what_the_model_cannot_honour_is_refused(
    client: ollama.Client, kwargs: dict[str, Any], what: str
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="moondream2", messages=[{"role": "user", "content": "hi"}], stream=False, **kwargs)
    assert caught.value.status_code == 400 and what in caught.value.error


def test_runtime_options_are_accepted(client: ollama.Client, tiny_model: Moondream) -> None:
    out = client.chat(
        model="moondream2",
        messages=[{"role": "user", "content": "Tell me a story."}],
        stream=False,
        options={**OPTIONS, "num_ctx": 4096, "num_thread": 2},
        keep_alive="5m",
    )
    assert out.message.content == tiny_model.query(None, "Tell me a story.", settings=GREEDY)["answer"]


def test_two_images_are_refused(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(
            model="moondream2",
            messages=[{"role": "user", "content": "Compare.", "images": [IMG1, IMG2]}],
            stream=False,
        )
    assert caught.value.status_code == 400 and "one image" in caught.value.error
