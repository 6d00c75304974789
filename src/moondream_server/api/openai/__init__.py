"""The OpenAI surface: chat completions and the model list, for OpenAI-speaking tools and the
official ``moondream`` client's ``chat()``. Its paths sit under ``/v1`` beside the cloud surface's,
with the same error shape (Moondream Cloud took OpenAI's)."""

from moondream_server.api.errors import openai_style_body
from moondream_server.api.openai.router import router
from moondream_server.api.surface import Surface

SURFACE = Surface(
    name="openai",
    router=router,
    error_body=openai_style_body,
    error_prefixes=("/v1/chat", "/v1/models"),
)
