"""The seed surface: the original JSON and multipart skill routes (errors in FastAPI's default
``{"detail": ...}`` shape, so it registers no error prefix of its own)."""

from moondream_server.api.seed.router import router
from moondream_server.api.surface import Surface

SURFACE = Surface(name="seed", router=router)
