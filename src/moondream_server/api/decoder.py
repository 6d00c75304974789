"""Where uploaded images are decoded: a few dedicated threads and a budget of decoded pixels.

Decoding is the one step of a request whose memory grows with what the client sent (a 143 kB
PNG can declare 7000×7000 pixels), so it is bounded three ways:

* the header is checked first (``api/images.py``): over the pixel cap or the side cap → 413,
  before any pixel is decoded;
* at most ``workers`` images are decoded at once, on threads of their own (not the shared
  thread pool, where a burst of large images would also starve every other blocking call);
* the decoded images that requests still hold (waiting for the model or being served) may
  together hold at most ``inflight_pixels`` pixels. A decode that would go over is refused
  (429, like a full queue) instead of queued: its memory is the thing being protected. The
  reservation is released when the decoded image is freed (a ``weakref.finalize``), so it
  follows the image's real lifetime whatever path the request takes.

``admit`` (the engine's capacity check) runs between the header check and the decode, so a
request the queue cannot take is refused before its image costs anything; the engine checks
again when it is submitted.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from moondream_server.api.images import (
    DEFAULT_MAX_SIDE,
    ImageError,
    ProbedImage,
    decode_probed,
    probe_image_bytes,
    probe_image_string,
)


class ImageBudgetError(ImageError):
    """The in-flight decoded-pixel budget cannot take this image now (HTTP 429)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, status=429, param=param)


class ImageDecoder:
    def __init__(
        self,
        *,
        max_pixels: int,
        max_side: int = DEFAULT_MAX_SIDE,
        workers: int = 2,
        inflight_pixels: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.max_pixels = max_pixels
        self.max_side = max_side
        # Never below one largest image: otherwise an accepted size could never be decoded.
        self.inflight_pixels = max(inflight_pixels or 4 * max_pixels, max_pixels)
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-decode")
        self._lock = threading.Lock()
        self._held = 0

    @property
    def held_pixels(self) -> int:
        """Pixels of decoded images still alive (reserved by a decode or held by a request)."""
        with self._lock:
            return self._held

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def decode_string(
        self, value: str, *, param: str, admit: Callable[[], None] | None = None
    ) -> Image.Image:
        """A data URL or bare base64 → RGB image (base64 decoding happens on a decode thread too)."""

        def probe() -> ProbedImage:
            return probe_image_string(value, max_pixels=self.max_pixels, max_side=self.max_side, param=param)

        return await self._decode(probe, admit)

    async def decode_bytes(
        self, data: bytes, *, param: str, admit: Callable[[], None] | None = None
    ) -> Image.Image:
        def probe() -> ProbedImage:
            return probe_image_bytes(data, max_pixels=self.max_pixels, max_side=self.max_side, param=param)

        return await self._decode(probe, admit)

    async def _decode(
        self, probe: Callable[[], ProbedImage], admit: Callable[[], None] | None
    ) -> Image.Image:
        loop = asyncio.get_running_loop()
        probed = await loop.run_in_executor(self._pool, probe)
        if admit is not None:
            admit()  # the queue may have filled while this request waited for a decode thread
        return await loop.run_in_executor(self._pool, self._decode_within_budget, probed)

    def _decode_within_budget(self, probed: ProbedImage) -> Image.Image:
        # Reserved and released on the decode thread: a caller that stops waiting (disconnect)
        # cannot release pixels that are still being decoded.
        n = probed.pixels
        self._reserve(n, probed.param)
        try:
            image = decode_probed(probed)
        except BaseException:
            self._release(n)
            raise
        weakref.finalize(image, self._release, n)
        return image

    def _reserve(self, n: int, param: str) -> None:
        with self._lock:
            if self._held + n > self.inflight_pixels:
                held = self._held
                raise ImageBudgetError(
                    f"the server is holding {held:,} decoded pixels for other requests; this image's "
                    f"{n:,} would exceed the in-flight limit of {self.inflight_pixels:,} pixels",
                    param=param,
                )
            self._held += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._held -= n
