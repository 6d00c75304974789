"""The cloud surface: Moondream Cloud's ``/v1`` skill routes, for the official ``moondream`` client."""

from moondream_server.api.cloud.router import router
from moondream_server.api.errors import openai_style_body
from moondream_server.api.surface import Surface

SURFACE = Surface(name="cloud", router=router, error_body=openai_style_body, error_prefixes=("/v1",))
