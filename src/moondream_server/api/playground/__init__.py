"""The playground surface: a static page at ``GET /`` that tries every skill from a browser by
calling the server's own ``/v1`` routes (see ``router.py``)."""

from moondream_server.api.playground.router import router
from moondream_server.api.surface import Surface

SURFACE = Surface(name="playground", router=router)
