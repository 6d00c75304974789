"""Hostile inputs for the API tests: decompression bombs and odd files, built in memory."""

from __future__ import annotations

import struct
import zlib

_ROWS_PER_CHUNK = 4096


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_of_zeros(width: int, height: int, *, depth: int = 8, color_type: int = 2) -> bytes:
    """A valid PNG of width x height black pixels: tiny on the wire, big once decoded."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes(1 + width * channels * depth // 8)  # filter byte 0, then zeros
    comp = zlib.compressobj(9)
    parts = []
    block = row * min(height, _ROWS_PER_CHUNK)
    left = height
    while left > 0:
        n = min(left, _ROWS_PER_CHUNK)
        parts.append(comp.compress(block if n == _ROWS_PER_CHUNK else row * n))
        left -= n
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )
