"""The name this server answers to, and the refusal of every other model a request may ask for.

The server serves exactly one model: Moondream2 (``SERVED_NAME``). A request's ``model`` field
is served when, compared case-insensitively and after dropping an optional ``vikhyatk/`` or
``moondream/`` owner prefix and an optional ``:latest`` tag (Ollama's default tag), it is

* ``moondream2`` (also ``moondream-2``, ``moondream-2b``), or ``moondream`` (Ollama's library
  name for Moondream2);
* ``moondream3-preview``: **only** because the official ``moondream`` client sends it from
  ``chat()`` when its user named no model, so the client's defaults work. The answer still comes
  from Moondream2, and every response that names a model says ``moondream2``;
* the configured ``--model`` value itself, or that folder's name.

Anything else (another model, an Ollama tag other than ``latest``, a fine-tune such as
``moondream3-preview/<id>@<step>``) is a 404 ``model_not_found``, never a silent substitution.
A LoRA ``variant`` (client 0.1.x, or inside ``settings``) is a 400 ``variant_not_supported``.
"""

from __future__ import annotations

from fastapi import Request

from moondream_server.api.errors import ApiError
from moondream_server.api.health import public_model_name
from moondream_server.engine.base import Engine

SERVED_NAME = "moondream2"
OWNER = "vikhyatk"
_NAMES = frozenset({"moondream2", "moondream-2", "moondream-2b", "moondream", "moondream3-preview"})
_OWNER_PREFIXES = ("vikhyatk/", "moondream/")


def served_model_id(request: Request) -> str:
    """What the server was started with (a Hub id, or a local folder by its name)."""
    engine: Engine = request.app.state.engine
    return public_model_name(engine.info.model_id)


def is_served(name: str, configured: str) -> bool:
    wanted = name.strip().lower()
    if wanted in {configured.lower(), public_model_name(configured).lower()}:
        return True
    if wanted.endswith(":latest"):
        wanted = wanted[: -len(":latest")]
    for prefix in _OWNER_PREFIXES:
        if wanted.startswith(prefix):
            wanted = wanted[len(prefix) :]
            break
    return wanted in _NAMES


def check_model(request: Request, name: str | None, *, param: str = "model") -> None:
    """None (no model named) or a name of the served model; anything else is a 404."""
    if name is None:
        return
    configured = request.app.state.engine.info.model_id
    if is_served(name, configured):
        return
    if "@" in name or "/ft" in name.lower():
        reason = "fine-tuned models are not served here; this server runs the base Moondream2 weights"
    else:
        reason = f"this server serves only {SERVED_NAME!r}"
    raise ApiError(
        404,
        f"The model {name!r} does not exist or is not served here: {reason} (see GET /v1/models).",
        code="model_not_found",
        param=param,
    )


def check_variant(variant: object, *, param: str = "variant") -> None:
    """A LoRA variant cannot be honoured: refuse it rather than answer with the base model."""
    if variant is None or variant == "":
        return
    raise ApiError(
        400,
        f"LoRA variants are not supported: this server runs the base Moondream2 weights only "
        f"(got {param}={variant!r})",
        code="variant_not_supported",
        param=param,
    )
