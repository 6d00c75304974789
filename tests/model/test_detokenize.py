"""Word-boundary streaming rules (reference behaviour), with a stand-in decoder."""

from __future__ import annotations

from collections.abc import Sequence

from moondream_server.model.detokenize import Detokenizer

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n", 6: "猫", 7: " ok", 8: "!"}


def decode(ids: Sequence[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def test_text_is_released_up_to_the_last_space() -> None:
    d = Detokenizer(decode)
    assert [d.push(i) for i in (1, 2, 3, 4)] == ["", "", "Hello ", ""]
    assert d.flush() == "world"


def test_newline_releases_everything_and_restarts() -> None:
    d = Detokenizer(decode)
    assert [d.push(i) for i in (1, 5, 2)] == ["", "Hel\n", ""]
    assert d.flush() == "lo"


def test_cjk_is_released_at_once() -> None:
    d = Detokenizer(decode)
    assert [d.push(i) for i in (6, 7, 8)] == ["猫", " ", ""]
    assert d.flush() == "ok!"


def test_pieces_always_join_to_the_full_text() -> None:
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 3, 3]
    d = Detokenizer(decode)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == decode(ids)
