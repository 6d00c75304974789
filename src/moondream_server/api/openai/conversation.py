"""A chat conversation turned into one Moondream2 query, or refused with a 400 saying why.

Moondream2 answers one question about at most one image; it has no chat template. So:

* the **last message must be the user's**, and its text parts (joined by newlines) are the
  question; it must have some text;
* **one image** at most in the whole conversation, in any user message (a follow-up question
  about an image sent earlier is common); two or more are refused;
* **system / developer messages and earlier turns are folded into the question** as plain text
  before it (system text first, then ``Earlier in this conversation:`` with one ``User:`` /
  ``Assistant:`` line per turn), so nothing the client sent is dropped. A single user message
  with no system message is asked exactly as written;
* ``tool`` / ``function`` messages, and request fields whose effect the model cannot give
  (``n`` > 1, ``stop``, tools, a non-text ``response_format``, ``logprobs``, penalties,
  ``logit_bias``, ``seed``, audio output, predicted outputs) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from moondream_server.api.errors import ApiError
from moondream_server.api.openai.protocol import ChatCompletionRequest, ChatMessage, ImagePart, TextPart


@dataclass(frozen=True)
class Question:
    text: str
    image_url: str | None  # the one image's URL, if the conversation has one
    image_param: str  # where it was, for error messages: messages[i].content[j].image_url.url


def _refuse(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="unsupported_parameter", param=param)


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """A 400 for each field that would change the answer in a way the model cannot honour."""
    if body.n is not None and body.n != 1:
        raise _refuse("n", "n must be 1: Moondream2 gives one answer per request")
    if body.stop:
        raise _refuse("stop", "stop sequences are not supported by this server")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise _refuse(name, f"{name} are not supported: Moondream2 cannot call tools")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none", "auto"):
            raise _refuse(name, f"{name} is not supported: Moondream2 cannot call tools")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise _refuse("response_format", "only the text response format is supported")
    if body.logprobs or body.top_logprobs:
        raise _refuse("logprobs", "logprobs are not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise _refuse(name, f"{name} is not supported by this server")
    if body.logit_bias:
        raise _refuse("logit_bias", "logit_bias is not supported by this server")
    if body.seed is not None:
        raise _refuse("seed", "per-request seeds are not supported; use temperature 0 for repeatable answers")
    if body.audio is not None or (body.modalities and set(body.modalities) != {"text"}):
        raise _refuse("modalities", "only text output is supported")
    if body.prediction is not None:
        raise _refuse("prediction", "predicted outputs are not supported by this server")


def _texts(message: ChatMessage, i: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The message's text pieces and its images as (url, param)."""
    if message.content is None:
        return [], []
    if isinstance(message.content, str):
        return [message.content], []
    texts: list[str] = []
    images: list[tuple[str, str]] = []
    for j, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            suffix = "" if isinstance(part.image_url, str) else ".url"
            images.append((url, f"messages[{i}].content[{j}].image_url{suffix}"))
    return texts, images


def to_question(messages: list[ChatMessage]) -> Question:
    system: list[str] = []
    turns: list[str] = []
    images: list[tuple[str, str]] = []
    last = len(messages) - 1
    if messages[last].role != "user":
        raise _refuse(f"messages[{last}]", "the last message must be the user's question")
    question = ""
    for i, message in enumerate(messages):
        if message.role in ("tool", "function"):
            raise _refuse(f"messages[{i}]", f"{message.role} messages are not supported: no tool calls here")
        texts, found = _texts(message, i)
        if found and message.role != "user":
            raise _refuse(f"messages[{i}]", "images are only taken from user messages")
        images.extend(found)
        text = "\n".join(t for t in texts if t.strip())
        if i == last:
            question = text
        elif message.role in ("system", "developer"):
            if text:
                system.append(text)
        elif text:
            turns.append(f"{'User' if message.role == 'user' else 'Assistant'}: {text}")
    if not question.strip():
        raise _refuse(f"messages[{last}].content", "the last user message has no text: ask a question")
    if len(images) > 1:
        raise _refuse(
            images[1][1],
            f"Moondream2 answers about one image per request; this conversation has {len(images)} images",
        )
    parts = [*system]
    if turns:
        parts.append("Earlier in this conversation:\n" + "\n".join(turns))
    parts.append(question)
    url, param = images[0] if images else (None, "")
    return Question("\n\n".join(parts), url, param)
