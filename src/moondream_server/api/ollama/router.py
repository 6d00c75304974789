"""Routes of the Ollama surface: ``POST /api/chat``, ``POST /api/generate``, ``GET /api/tags``,
``POST /api/show``, ``GET /api/version``.

A chat or a generate call is answered by the model's query skill (the conversation folded as in
``chat_question``; generate's ``system`` goes before its ``prompt``). Streaming (Ollama's default)
is NDJSON: one ``{"model", "created_at", "message"|"response", "done": false}`` line per text
piece, then a last line with ``done: true``, ``done_reason`` and the token counts and durations.
An error after the stream began is a last ``{"error": "..."}`` line, as Ollama sends it.
A chat without messages, or a generate without prompt and images, only "loads" the model:
``done_reason: "load"`` (integrations use it to warm a model up).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

import moondream_server
from moondream_server.api import serving
from moondream_server.api.app_state import ready_engine
from moondream_server.api.auth import require_api_key
from moondream_server.api.chat_question import Question, Turn, to_question
from moondream_server.api.errors import ApiError
from moondream_server.api.image_input import image_from_string
from moondream_server.api.json_body import BoundedJSONRoute
from moondream_server.api.ollama.options import refuse_unsupported, sampling_settings
from moondream_server.api.ollama.protocol import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    ModelDetails,
    ModelEntry,
    ShowRequest,
    ShowResponse,
    TagsResponse,
    VersionResponse,
)
from moondream_server.api.openapi_docs import error_responses
from moondream_server.api.served_model import SERVED_NAME, check_model, served_model_id
from moondream_server.engine.errors import EngineError
from moondream_server.engine.types import QueryResult, TextResult

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/api",
    tags=["Ollama-compatible (/api)"],
    dependencies=[Depends(require_api_key)],
    route_class=BoundedJSONRoute,
)

TAG = f"{SERVED_NAME}:latest"
_STARTED = datetime.now(UTC)
_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 500, 503, 504, model=ErrorBody)
_NDJSON: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One JSON object, or (the default, `stream` not false) NDJSON lines ending with "
        "`done: true`.",
        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
    }
}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(request: Request) -> ModelDetails:
    dtype = request.app.state.engine.info.dtype
    return ModelDetails(
        format="safetensors",
        family="moondream",
        families=["moondream"],
        parameter_size="1.9B",
        quantization_level=str(dtype).upper(),
    )


def _final_fields(result: TextResult | None, started: float) -> dict[str, Any]:
    m = result.metrics if result is not None else None
    return {
        "done_reason": result.finish_reason if result is not None else "stop",
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": 0 if m is None else m.input_tokens + m.image_tokens,
        "prompt_eval_duration": 0 if m is None else int(m.prefill_time_ms * 1e6),
        "eval_count": 0 if m is None else m.output_tokens,
        "eval_duration": 0 if m is None else int(m.decode_time_ms * 1e6),
    }


def _thinking(result: TextResult | None) -> str | None:
    if isinstance(result, QueryResult) and result.reasoning is not None:
        return result.reasoning.text
    return None


async def _answer(
    request: Request, body: ChatRequest | GenerateRequest, question: Question, *, chat: bool
) -> Response | ChatResponse | GenerateResponse:
    started = time.perf_counter()
    settings = sampling_settings(body.options)
    engine = ready_engine(request)
    image = (
        None
        if question.image is None
        else await image_from_string(request, question.image, question.image_param)
    )
    job = serving.QueryJob(image, question.text, reasoning=bool(body.think), settings=settings)

    def piece(text: str, *, thinking: str | None = None, done: bool = False, **final: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"model": TAG, "created_at": _now()}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        out["done"] = done
        return {**out, **final}

    if not body.stream:
        result = await serving.run(engine, job)
        final = _final_fields(result, started)
        if chat:
            message = AssistantMessage(content=result.text, thinking=_thinking(result))
            return ChatResponse(model=TAG, created_at=_now(), message=message, done=True, **final)
        return GenerateResponse(
            model=TAG, created_at=_now(), response=result.text, thinking=_thinking(result), done=True, **final
        )

    generation = await serving.stream(engine, job)

    async def lines() -> AsyncIterator[bytes]:
        try:
            try:
                async for text in generation.pieces():
                    yield (json.dumps(piece(text)) + "\n").encode()
            except EngineError as exc:
                yield (json.dumps({"error": str(exc) or type(exc).__name__}) + "\n").encode()
                return
            except Exception:
                log.exception("ollama stream failed")
                yield (json.dumps({"error": "internal server error"}) + "\n").encode()
                return
            result = generation.result
            last = piece("", thinking=_thinking(result), done=True, **_final_fields(result, started))
            yield (json.dumps(last) + "\n").encode()
        finally:
            await generation.aclose()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _loaded(*, chat: bool) -> ChatResponse | GenerateResponse:
    if chat:
        return ChatResponse(
            model=TAG, created_at=_now(), message=AssistantMessage(content=""), done=True, done_reason="load"
        )
    return GenerateResponse(model=TAG, created_at=_now(), response="", done=True, done_reason="load")


@router.post(
    "/chat",
    response_model=ChatResponse,
    response_model_exclude_none=True,
    responses={**_NDJSON, **_ERRORS},
    summary="Chat (Ollama format), answered by the query skill",
)
async def chat(body: ChatRequest, request: Request) -> Response | ChatResponse | GenerateResponse:
    check_model(request, body.model)
    refuse_unsupported(body)
    if not body.messages:
        return _loaded(chat=True)
    turns = [
        Turn(
            m.role,
            m.content or "",
            [(image, f"messages[{i}].images[{j}]") for j, image in enumerate(m.images or [])],
            f"messages[{i}]",
        )
        for i, m in enumerate(body.messages)
    ]
    return await _answer(request, body, to_question(turns), chat=True)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses={**_NDJSON, **_ERRORS},
    summary="Generate (Ollama format), answered by the query skill",
)
async def generate(body: GenerateRequest, request: Request) -> Response | ChatResponse | GenerateResponse:
    check_model(request, body.model)
    refuse_unsupported(body)
    if not body.prompt and not body.images:
        return _loaded(chat=False)
    images = [(image, f"images[{j}]") for j, image in enumerate(body.images or [])]
    turns = [Turn("system", body.system or "", (), "system")] if body.system else []
    turns.append(Turn("user", body.prompt or "", images, "prompt"))
    question = to_question(turns)
    return await _answer(request, body, question, chat=False)


@router.get("/tags", response_model=TagsResponse, summary="The served model (Ollama format)")
async def tags(request: Request) -> TagsResponse:
    info = request.app.state.engine.info
    # Identifies the configuration (model and revision), not file content: the server never hashes weights.
    digest = hashlib.sha256(f"{served_model_id(request)}@{info.revision}".encode()).hexdigest()
    entry = ModelEntry(
        name=TAG,
        model=TAG,
        modified_at=_STARTED.isoformat().replace("+00:00", "Z"),
        size=0,
        digest=digest,
        details=_details(request),
    )
    return TagsResponse(models=[entry])


@router.post(
    "/show",
    response_model=ShowResponse,
    responses=error_responses(400, 401, 404, 422, model=ErrorBody),
    summary="The served model's details and capabilities (Ollama format)",
)
async def show(body: ShowRequest, request: Request) -> ShowResponse:
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model is required", param="model")
    check_model(request, name)
    info = request.app.state.engine.info
    return ShowResponse(
        modelfile=f"# {TAG}: Moondream2 served by moondream-server from {served_model_id(request)}\n",
        parameters="",
        template="",
        details=_details(request),
        model_info={
            "general.architecture": "moondream",
            "general.basename": SERVED_NAME,
            "general.revision": info.revision,
        },
        capabilities=["completion", "vision"],
        modified_at=_STARTED.isoformat().replace("+00:00", "Z"),
    )


@router.get("/version", response_model=VersionResponse, summary="The server's version")
async def version() -> VersionResponse:
    return VersionResponse(version=moondream_server.__version__)
