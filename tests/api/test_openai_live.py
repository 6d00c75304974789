"""The official ``openai`` client against the live server's OpenAI surface (tiny model, greedy).

Expected answers come from the model called directly with the same image and question; token
counts from the model's own record of that call (``last_result``) and its image prefix length.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from moondream_server.model import Moondream
from tests.api.support import IMAGES, LiveServer, encoded, file_data_url

IMG1, IMG2, *_ = IMAGES
QUESTION = "What is in this image?"
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture
def oai(server: LiveServer) -> Iterator[openai.OpenAI]:
    http = httpx.Client(trust_env=False, timeout=120)
    client = openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", http_client=http, max_retries=0
    )
    yield client
    http.close()


def image_part(path: Any = IMG1) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": file_data_url(path)}}


def user_turn(question: str = QUESTION, path: Any = IMG1) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": question}, image_part(path)]}


def expected(model: Moondream, question: str, path: Any = IMG1) -> tuple[str, Any]:
    answer = model.query(encoded(model, path), question, settings=GREEDY)["answer"]
    return answer, model.last_result


def image_tokens(model: Moondream) -> int:
    return 1 + model.config.vision.grid**2


def test_plain_answer_is_the_models_query_answer(oai: openai.OpenAI, tiny_model: Moondream) -> None:
    answer, last = expected(tiny_model, QUESTION)
    out = oai.chat.completions.create(
        model="moondream2", messages=[user_turn()], temperature=0, max_completion_tokens=12
    )
    assert out.object == "chat.completion" and out.model == "moondream2" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == answer
    assert choice.finish_reason == last.text.finish_reason
    assert out.usage is not None
    assert out.usage.prompt_tokens == last.prompt_tokens + image_tokens(tiny_model)
    assert out.usage.completion_tokens == len(last.text.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_answer_with_usage(oai: openai.OpenAI, tiny_model: Moondream) -> None:
    answer, last = expected(tiny_model, QUESTION, IMG2)
    chunks = list(
        oai.chat.completions.create(
            model="moondream2",
            messages=[user_turn(path=IMG2)],
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [last.text.finish_reason]
    *_, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == last.prompt_tokens + image_tokens(tiny_model)
    assert usage_chunk.usage.completion_tokens == len(last.text.tokens)


def test_stream_ends_with_done(server: LiveServer) -> None:
    body = {"model": "moondream2", "messages": [user_turn()], "stream": True, "max_tokens": 4}
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(lines)  # only with stream_options.include_usage


def test_system_message_and_earlier_turns_are_folded_into_the_question(
    oai: openai.OpenAI, tiny_model: Moondream
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Answer briefly."},
        user_turn("What is this?"),
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "What colour is it?"},
    ]
    folded = (
        "Answer briefly.\n\nEarlier in this conversation:\nUser: What is this?\nAssistant: A picture."
        "\n\nWhat colour is it?"
    )
    answer, _ = expected(tiny_model, folded)
    out = oai.chat.completions.create(model="moondream2", messages=messages, temperature=0, max_tokens=12)
    assert out.choices[0].message.content == answer


def test_a_text_only_chat_is_a_text_only_query(oai: openai.OpenAI, tiny_model: Moondream) -> None:
    answer = tiny_model.query(None, "Tell me a story.", settings=GREEDY)["answer"]
    out = oai.chat.completions.create(
        model="moondream2",
        messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=0,
        max_tokens=12,
    )
    assert out.choices[0].message.content == answer
    assert out.usage is not None and out.usage.prompt_tokens == tiny_model.last_result.prompt_tokens


def test_models_lists_the_served_model(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["moondream2"]
    assert oai.models.retrieve("moondream2").id == "moondream2"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


@pytest.mark.parametrize(
    "name", ["moondream2", "moondream3-preview", "moondream/moondream3-preview", "MOONDREAM2"]
)
def test_the_served_model_and_its_aliases_are_served(oai: openai.OpenAI, name: str) -> None:
    out = oai.chat.completions.create(model=name, messages=[user_turn()], max_tokens=2)
    assert out.model == "moondream2"  # the model that answered, whatever alias was asked for


@pytest.mark.parametrize("name", ["gpt-4o", "moondream3-preview/ft-abc123@40", "moondream2:q4"])
def test_another_model_is_a_404_never_a_substitute(oai: openai.OpenAI, name: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model=name, messages=[user_turn()])
    assert caught.value.code == "model_not_found"
    assert name in caught.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"stop": ["\n"]}, "stop"),
        ({"seed": 7}, "seed"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_parameters_the_model_cannot_honour_are_refused(
    oai: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="moondream2", messages=[user_turn()], **extra)
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (
            [
                {
                    "role": "user",
                    "content": [image_part(IMG1), image_part(IMG2), {"type": "text", "text": "?"}],
                }
            ],
            None,
        ),
        ([user_turn(), {"role": "assistant", "content": "A picture."}], "messages[1]"),
        ([{"role": "user", "content": [image_part()]}], "messages[0].content"),
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}, user_turn()], "messages[0]"),
    ],
    ids=["two-images", "last-not-user", "no-question", "tool-message"],
)
def test_conversations_the_model_cannot_answer_are_refused(
    oai: openai.OpenAI, messages: list[Any], param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="moondream2", messages=messages)
    if param is not None:
        assert caught.value.param == param


def test_image_urls_are_not_fetched(oai: openai.OpenAI) -> None:
    part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, part]}]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="moondream2", messages=messages)
    assert "data URL" in caught.value.message
    assert caught.value.param == "messages[0].content[1].image_url.url"
