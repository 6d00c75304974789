"""Request and response schemas of the Ollama surface (``/api/...``), in the shapes the official
``ollama`` client and Ollama-speaking integrations send and parse.

Ollama's own defaults hold: ``stream`` is true unless a request says false. Images are base64
without a data-URL prefix. Durations are nanoseconds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moondream_server.api.errors import ErrorInfo


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    role: str
    content: str | None = None
    images: list[str] | None = Field(None, description="Base64 images (a data URL works too).")


class _Request(_Lenient):
    model: str = Field(..., description="`moondream2` or an alias (see GET /api/tags).")
    stream: bool = Field(True, description="NDJSON chunks unless false (Ollama's default).")
    options: dict[str, Any] | None = Field(
        None, description="temperature, top_p and num_predict are honoured; see docs/api.md for the rest."
    )
    format: Any = Field(None, description="Only plain text answers: a JSON format is refused.")
    think: bool | str | None = Field(None, description="true: the model reasons first (query skill).")
    keep_alive: Any = Field(None, description="Accepted; the model stays loaded.")
    tools: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(default_factory=list)


class GenerateRequest(_Request):
    prompt: str | None = None
    images: list[str] | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None


class ShowRequest(_Lenient):
    model: str | None = None
    name: str | None = Field(None, description="Older clients' name for `model`.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | None = None


class _Final(BaseModel):
    """What the last object of an answer adds (absent from the streamed pieces before it)."""

    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatResponse(_Final):
    model: str
    created_at: str
    message: AssistantMessage
    done: bool


class GenerateResponse(_Final):
    model: str
    created_at: str
    response: str
    thinking: str | None = None
    done: bool


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ModelEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ModelEntry]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


class ErrorBody(BaseModel):
    error: str


def error_body(error: ErrorInfo) -> dict[str, Any]:
    """Ollama's error shape carries one string: it names the field when the message does not."""
    if error.param is None or error.param in error.message:
        return {"error": error.message}
    return {"error": f"{error.param}: {error.message}"}
