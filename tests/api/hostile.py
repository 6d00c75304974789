"""Hostile inputs for the API tests: decompression bombs and odd files, built in memory."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable

import httpx
import psutil

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


# ------------------------------------------------------------------------- a server process


class ServerProcess:
    """``moondream-server`` in a process of its own, so that its RSS is its own."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "moondream_server.api.cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._proc = subprocess.Popen(
            [*cmd, *args],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.process = psutil.Process(self._proc.pid)

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"the server exited with {self._proc.returncode}: {err[-2000:]}")
            try:
                if httpx.get(self.base_url + "/health/ready", trust_env=False, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)

    @property
    def rss(self) -> int:
        """Resident anonymous memory (Linux: RssAnon), where what a request leaves behind lives
        (heap, Pillow's blocks, tensors). File-backed pages (libraries, mapped weights) are left
        out: on a shared machine the page cache evicts and refaults them with other processes'
        memory pressure, which says nothing about this server."""
        info = self.process.memory_info()
        return int(info.rss - info.shared)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        if self._proc.stderr is not None:
            self._proc.stderr.close()


def raw_post(
    port: int, path: str, headers: dict[str, str], chunks: Iterable[bytes], *, timeout: float = 30.0
) -> tuple[int, bytes]:
    """POST over a raw socket, sending ``chunks`` until the server answers; (status, body head).

    A server that refuses a body early answers while the client is still sending; this client
    stops sending then, as a browser or curl would, instead of failing on a reset connection.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        got = b""
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection after answering
                break
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in got and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            got += data
        status_line = got.split(b"\r\n", 1)[0].decode(errors="replace")
        return int(status_line.split()[1]), got
    finally:
        sock.close()
