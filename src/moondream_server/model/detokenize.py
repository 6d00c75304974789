"""Incremental detokenisation that only releases whole words.

Re-decodes the pending tokens every step and releases text up to the last space, everything
after a newline (then starts afresh), or everything when the text ends in a CJK character.
The concatenation of all pieces is the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x2F800 <= cp <= 0x2FA1F


class Detokenizer:
    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._printed = 0

    def push(self, token: int) -> str:
        """Add one token; returns the newly printable text ('' if none)."""
        self._tokens.append(token)
        text = self._decode(self._tokens)
        if text.endswith("\n"):
            piece = text[self._printed :]
            self._tokens, self._printed = [], 0
            return piece
        if text and _is_cjk(text[-1]):
            piece = text[self._printed :]
        else:
            last_space = text.rfind(" ", self._printed)
            if last_space < self._printed:
                return ""
            piece = text[self._printed : last_space + 1]
        self._printed += len(piece)
        return piece

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        if not self._tokens:
            return ""
        piece = self._decode(self._tokens)[self._printed :]
        self._tokens, self._printed = [], 0
        return piece
