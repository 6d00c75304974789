"""The OpenAI surface: chat completions and the model list, for OpenAI-speaking tools and the
official ``moondream`` client's ``chat()``. Its paths sit under ``/v1`` and share the cloud
surface's error shape, which is OpenAI's own."""

from moondream_server.api.openai.router import router
from moondream_server.api.surface import Surface

SURFACE = Surface(name="openai", router=router)
