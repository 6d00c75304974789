"""Routes of the OpenAI surface: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A chat turn is answered by the model's query skill (see ``conversation``). Streaming is OpenAI's
SSE format: a first chunk with ``delta.role``, one chunk per text piece, a last chunk with the
``finish_reason`` (and, with ``stream_options.include_usage``, one more with ``usage`` and no
choices), then ``data: [DONE]``. An error after the stream began arrives as an ``error`` event
(which the ``openai`` client raises). Errors before it are real statuses in OpenAI's error shape.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from moondream_server.api import serving
from moondream_server.api.app_state import ready_engine
from moondream_server.api.auth import require_api_key
from moondream_server.api.chat_question import to_question
from moondream_server.api.cloud.protocol import V1ErrorBody
from moondream_server.api.image_input import image_from_string
from moondream_server.api.json_body import BoundedJSONRoute
from moondream_server.api.moondream_wire import reasoning_out
from moondream_server.api.openai.conversation import refuse_unsupported, to_turns
from moondream_server.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    ReasoningDetails,
    ResponseMessage,
    Usage,
)
from moondream_server.api.openapi_docs import SSE_EVENT_SCHEMA, error_responses
from moondream_server.api.served_model import OWNER, SERVED_NAME, check_model
from moondream_server.engine.errors import EngineError
from moondream_server.engine.types import FinishReason, SamplingSettings, TextResult

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1",
    tags=["OpenAI-compatible (/v1)"],
    dependencies=[Depends(require_api_key)],
    route_class=BoundedJSONRoute,
)

_STARTED = int(time.time())
_STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with `stream: true` OpenAI's `text/event-stream` of chunks ending "
        "with `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    }
}


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI format)")
async def models() -> ModelList:
    return ModelList(data=[ModelCard(id=SERVED_NAME, created=_STARTED, owned_by=OWNER)])


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    responses=error_responses(404, model=V1ErrorBody),
    summary="One model (OpenAI format)",
)
async def model(model_id: str, request: Request) -> ModelCard:
    check_model(request, model_id)
    return ModelCard(id=SERVED_NAME, created=_STARTED, owned_by=OWNER)


def _usage(result: TextResult | None) -> Usage:
    if result is None:
        return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    m = result.metrics
    prompt = m.input_tokens + m.image_tokens
    total = prompt + m.output_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=m.output_tokens, total_tokens=total)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    responses={
        **_STREAM_RESPONSE,
        **error_responses(400, 401, 404, 413, 422, 429, 500, 503, 504, model=V1ErrorBody),
    },
    summary="Chat completion (OpenAI format), answered by the query skill",
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
    check_model(request, body.model)
    refuse_unsupported(body)
    question = to_question(to_turns(body.messages))
    engine = ready_engine(request)
    image = (
        None
        if question.image is None
        else await image_from_string(request, question.image, question.image_param)
    )
    settings = SamplingSettings(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
    )
    job = serving.QueryJob(image, question.text, reasoning=bool(body.reasoning), settings=settings)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        generation = await serving.stream(engine, job)
        return _event_stream(generation, completion_id, created, include_usage)
    result = await serving.run(engine, job)
    reasoning = reasoning_out(result.reasoning)
    message = ResponseMessage(
        content=result.text,
        reasoning=None if reasoning is None else reasoning.text,
        reasoning_details=None if reasoning is None else ReasoningDetails(grounding=reasoning.grounding),
    )
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=SERVED_NAME,
        choices=[Choice(message=message, finish_reason=result.finish_reason)],
        usage=_usage(result),
    )


def _event_stream(
    generation: serving.Generation, completion_id: str, created: int, include_usage: bool
) -> EventSourceResponse:
    def chunk(
        delta: Delta, finish: FinishReason | None = None, usage: Usage | None = None, last: bool = False
    ) -> dict[str, str]:
        out = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=SERVED_NAME,
            choices=[] if last else [ChunkChoice(delta=delta, finish_reason=finish)],
            usage=usage,
        )
        # With include_usage, OpenAI sends "usage": null on every chunk but the last one.
        return {"data": out.model_dump_json(exclude_none=not include_usage)}

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            yield chunk(Delta(role="assistant", content=""))
            try:
                async for piece in generation.pieces():
                    yield chunk(Delta(content=piece))
            except EngineError as exc:
                yield {"data": json.dumps(_stream_error(str(exc) or type(exc).__name__, "engine_error"))}
                yield {"data": "[DONE]"}
                return
            except Exception:
                log.exception("stream %s failed", completion_id)
                yield {"data": json.dumps(_stream_error("internal server error", "internal_error"))}
                yield {"data": "[DONE]"}
                return
            result = generation.result
            yield chunk(Delta(), finish=result.finish_reason if result is not None else "stop")
            if include_usage:
                yield chunk(Delta(), usage=_usage(result), last=True)
            yield {"data": "[DONE]"}
        finally:
            await generation.aclose()

    return EventSourceResponse(events(), sep="\n", headers={"X-Request-ID": completion_id})


def _stream_error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
