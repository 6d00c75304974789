"""An OpenAI chat request checked for what Moondream2 cannot honour, and its messages turned into
the turns of ``chat_question`` (which folds them into one query).

Request fields whose effect the model cannot give (``n`` > 1, ``stop``, tools, a non-text
``response_format``, ``logprobs``, penalties, ``logit_bias``, ``seed``, audio output, predicted
outputs) are refused by name with a 400; ``user``, ``metadata`` and other unknown fields are
ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from moondream_server.api.chat_question import Turn
from moondream_server.api.chat_question import refuse as _refuse
from moondream_server.api.openai.protocol import ChatCompletionRequest, ChatMessage, TextPart


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


def to_turns(messages: list[ChatMessage]) -> list[Turn]:
    turns = []
    for i, message in enumerate(messages):
        texts: list[str] = []
        images: list[tuple[str, str]] = []
        if isinstance(message.content, str):
            texts.append(message.content)
        elif message.content is not None:
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif isinstance(part.image_url, str):
                    images.append((part.image_url, f"messages[{i}].content[{j}].image_url"))
                else:
                    images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
        text = "\n".join(t for t in texts if t.strip())
        turns.append(Turn(message.role, text, images, f"messages[{i}]"))
    return turns
