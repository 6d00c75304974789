"""Request and response schemas of the OpenAI surface: ``POST /v1/chat/completions`` and
``GET /v1/models``, in the shapes the official ``openai`` client sends and parses.

Fields that would change the answer but cannot be honoured by Moondream2 are declared so that a
request using them is refused with a 400 naming the field (see ``conversation.refuse_unsupported``);
unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moondream_server.api.moondream_wire import GroundingOut
from moondream_server.engine.params import MAX_TOKENS, TEMPERATURE, TOP_P


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str = Field(..., description="A data URL (data:image/<any>;base64,...). http(s) URLs are refused.")
    detail: str | None = Field(None, description="Accepted; Moondream2 always sees the image the same way.")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str = Field(..., description="The served model's name or an alias (see GET /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The engine's bounds (one set, from the model), as on Moondream's own routes.
    max_completion_tokens: int | None = Field(
        None, ge=MAX_TOKENS.ge, gt=MAX_TOKENS.gt, le=MAX_TOKENS.le, description="Wins over max_tokens."
    )
    max_tokens: int | None = Field(
        None,
        ge=MAX_TOKENS.ge,
        gt=MAX_TOKENS.gt,
        le=MAX_TOKENS.le,
        description="Older name of max_completion_tokens.",
    )
    temperature: float | None = Field(
        None, ge=TEMPERATURE.ge, gt=TEMPERATURE.gt, le=TEMPERATURE.le, description="0 = greedy decoding."
    )
    top_p: float | None = Field(None, ge=TOP_P.ge, gt=TOP_P.gt, le=TOP_P.le)
    reasoning: bool | None = Field(
        None, description="Moondream's own flag: think first; the message then carries `reasoning`."
    )
    # Declared only to be refused (or, for n = 1 and empty values, accepted) by name.
    n: int | None = Field(None, ge=1, description="Only 1: the model gives one answer per request.")
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning: str | None = Field(None, description="With `reasoning: true`: the model's thinking.")
    reasoning_details: ReasoningDetails | None = None


class ReasoningDetails(BaseModel):
    grounding: list[GroundingOut]


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="The prompt's text tokens plus the image's tokens.")
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ResponseMessage.model_rebuild()
