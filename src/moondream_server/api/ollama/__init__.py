"""The Ollama surface: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show`` and
``/api/version`` for Ollama-speaking integrations; errors are Ollama's ``{"error": "..."}``."""

from moondream_server.api.ollama.protocol import error_body
from moondream_server.api.ollama.router import router
from moondream_server.api.surface import Surface

SURFACE = Surface(name="ollama", router=router, error_body=error_body, error_prefixes=("/api",))
