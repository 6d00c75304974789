"""Ollama request fields and ``options`` turned into the model's sampling settings, or refused.

Honoured: ``temperature``, ``top_p``, ``num_predict`` (a positive count; -1 and -2, Ollama's
"no limit" and "fill the context", take the server's default budget). Options that only tune
Ollama's own runtime (context size, threads, GPU layers, memory mapping, batch size) have no
meaning here and are ignored, as is ``keep_alive``. Every other option changes how the answer is
sampled in a way Moondream2's decoder does not offer (``top_k``, ``seed``, ``stop``, penalties,
mirostat, ...): a 400 names it rather than answering as if it had been applied.
"""

from __future__ import annotations

from typing import Any

from moondream_server.api.chat_question import refuse
from moondream_server.api.ollama.protocol import GenerateRequest, _Request
from moondream_server.engine.params import SamplingSettings

RUNTIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "low_vram",
        "f16_kv",
        "use_mmap",
        "use_mlock",
        "numa",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "num_keep",
    }
)


def _number(options: dict[str, Any], name: str) -> float | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(f"options.{name}", f"options.{name} must be a number")
    return float(value)


def sampling_settings(options: dict[str, Any] | None) -> SamplingSettings:
    options = options or {}
    for name in options:
        if name not in RUNTIME_OPTIONS and name not in ("temperature", "top_p", "num_predict"):
            raise refuse(
                f"options.{name}",
                f"option {name!r} is not supported by this server "
                "(it honours temperature, top_p and num_predict)",
            )
    num_predict = _number(options, "num_predict")
    if num_predict is not None and (num_predict == 0 or num_predict < -2 or not num_predict.is_integer()):
        raise refuse("options.num_predict", "num_predict must be a positive whole number, or -1 / -2")
    try:
        return SamplingSettings(
            temperature=_number(options, "temperature"),
            top_p=_number(options, "top_p"),
            max_tokens=int(num_predict) if num_predict is not None and num_predict > 0 else None,
        )
    except ValueError as exc:
        raise refuse("options", f"invalid options: {exc}") from None


def refuse_unsupported(body: _Request) -> None:
    """A 400 for request fields whose effect the model cannot give."""
    if body.format not in (None, ""):
        raise refuse("format", "structured (JSON) output is not supported: answers are plain text")
    if body.tools:
        raise refuse("tools", "tools are not supported: Moondream2 cannot call tools")
    if body.logprobs or body.top_logprobs:
        raise refuse("logprobs", "logprobs are not supported by this server")
    if body.think is not None and not isinstance(body.think, bool):
        raise refuse("think", "think must be true or false (Moondream2 has one way of reasoning)")
    if isinstance(body, GenerateRequest):
        if body.raw:
            raise refuse("raw", "raw prompts are not supported: the prompt is the model's question")
        for name in ("template", "suffix"):
            if getattr(body, name):
                raise refuse(name, f"{name} is not supported by this server")
        if body.context:
            raise refuse(
                "context", "context from an earlier answer is not supported: the model is single-turn"
            )
