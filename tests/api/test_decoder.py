"""The image decoder: header caps before decoding, the in-flight pixel budget, admission first."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
from PIL import Image

from moondream_server.api.decoder import ImageBudgetError, ImageDecoder
from moondream_server.api.images import ImageError, probe_image_bytes
from moondream_server.engine.errors import QueueFullError
from tests.api.hostile import png_of_zeros
from tests.api.support import data_url, encode


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_long_thin_image_is_refused_from_its_header() -> None:
    # 1 x 200,000: few pixels, but 200,000 rows (each costs the PNG decoder a call).
    thin = png_of_zeros(1, 200_000)
    t0 = time.monotonic()
    with pytest.raises(ImageError) as caught:
        probe_image_bytes(thin, max_pixels=50_000_000, max_side=16_384)
    assert time.monotonic() - t0 < 0.5
    assert caught.value.status == 413
    assert "16,384" in caught.value.message and "1×200000" in caught.value.message


def test_a_bomb_over_the_pixel_cap_costs_nothing() -> None:
    bomb = png_of_zeros(7000, 7000)  # 143 kB declaring 49 M pixels
    decoder = ImageDecoder(max_pixels=10_000_000, workers=1)
    with pytest.raises(ImageError) as caught:
        run(decoder.decode_bytes(bomb, param="file"))
    assert caught.value.status == 413 and "10,000,000" in caught.value.message
    assert decoder.held_pixels == 0
    decoder.close()


def test_decoded_images_hold_the_budget_until_freed() -> None:
    decoder = ImageDecoder(max_pixels=1_000_000, inflight_pixels=1_500_000, workers=2)
    raw = png_of_zeros(1000, 1000)
    first = run(decoder.decode_bytes(raw, param="file"))
    assert isinstance(first, Image.Image) and first.size == (1000, 1000)
    assert decoder.held_pixels == 1_000_000
    with pytest.raises(ImageBudgetError) as caught:
        run(decoder.decode_string(data_url(raw), param="image_url"))
    assert caught.value.status == 429 and caught.value.param == "image_url"
    assert "1,500,000" in caught.value.message
    assert decoder.held_pixels == 1_000_000  # the refused one reserved nothing
    del first
    gc.collect()
    assert decoder.held_pixels == 0
    second = run(decoder.decode_string(data_url(raw), param="image_url"))
    assert isinstance(second, Image.Image) and decoder.held_pixels == 1_000_000
    decoder.close()


def test_the_budget_is_never_below_one_largest_image() -> None:
    decoder = ImageDecoder(max_pixels=1_000_000, inflight_pixels=10)
    assert decoder.inflight_pixels == 1_000_000
    decoder.close()


def test_a_failed_decode_gives_its_pixels_back() -> None:
    decoder = ImageDecoder(max_pixels=1_000_000)
    raw = encode(Image.effect_noise((300, 300), 60).convert("RGB"))
    with pytest.raises(ImageError) as caught:
        run(decoder.decode_bytes(raw[: len(raw) // 2], param="file"))
    assert caught.value.status == 400
    assert decoder.held_pixels == 0
    decoder.close()


def test_admission_is_checked_before_the_decode() -> None:
    decoder = ImageDecoder(max_pixels=1_000_000)
    decoded: list[int] = []

    def full() -> None:
        decoded.append(decoder.held_pixels)
        raise QueueFullError("full", retry_after_s=3)

    with pytest.raises(QueueFullError):
        run(decoder.decode_bytes(png_of_zeros(500, 500), param="file", admit=full))
    assert decoded == [0] and decoder.held_pixels == 0
    decoder.close()


def test_decodes_run_on_their_own_bounded_threads() -> None:
    decoder = ImageDecoder(max_pixels=4_000_000, inflight_pixels=40_000_000, workers=2)
    seen: set[str] = set()
    running = 0
    most = 0
    lock = threading.Lock()

    def admit() -> None:
        pass

    original = decoder._decode_within_budget

    def spy(probed: object) -> Image.Image:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            seen.add(threading.current_thread().name)
        try:
            time.sleep(0.05)
            return original(probed)  # type: ignore[arg-type]
        finally:
            with lock:
                running -= 1

    decoder._decode_within_budget = spy  # type: ignore[method-assign]

    async def many() -> list[Image.Image]:
        raw = png_of_zeros(200, 200)
        return list(
            await asyncio.gather(*(decoder.decode_bytes(raw, param="file", admit=admit) for _ in range(8)))
        )

    images = run(many())
    assert len(images) == 8  # type: ignore[arg-type]
    assert most == 2
    assert all(name.startswith("image-decode") for name in seen)
    decoder.close()
