"""Folding a chat into one Moondream2 question: what is kept, where, and what is refused."""

from __future__ import annotations

import pytest

from moondream_server.api.chat_question import Turn, to_question
from moondream_server.api.errors import ApiError


def test_one_user_message_is_asked_as_written() -> None:
    q = to_question([Turn("user", "What is it?", [("IMG", "messages[0].images[0]")], "messages[0]")])
    assert (q.text, q.image, q.image_param) == ("What is it?", "IMG", "messages[0].images[0]")


def test_system_and_earlier_turns_come_before_the_question_in_order() -> None:
    q = to_question(
        [
            Turn("system", "Be brief.", (), "messages[0]"),
            Turn("user", "What is it?", [("IMG", "p")], "messages[1]"),
            Turn("assistant", "A cat.", (), "messages[2]"),
            Turn("developer", "No emoji.", (), "messages[3]"),
            Turn("user", "What colour?", (), "messages[4]"),
        ]
    )
    assert q.text == (
        "Be brief.\n\nNo emoji.\n\nEarlier in this conversation:\nUser: What is it?\nAssistant: A cat."
        "\n\nWhat colour?"
    )
    assert q.image == "IMG"  # a follow-up about the image sent earlier


@pytest.mark.parametrize(
    ("turns", "param"),
    [
        ([], "messages"),
        (
            [Turn("user", "Hi", (), "messages[0]"), Turn("assistant", "Hello", (), "messages[1]")],
            "messages[1]",
        ),
        ([Turn("user", "  ", [("IMG", "p")], "messages[0]")], "messages[0].content"),
        ([Turn("user", "Compare", [("A", "a"), ("B", "b")], "messages[0]")], "b"),
        ([Turn("tool", "42", (), "messages[0]"), Turn("user", "So?", (), "messages[1]")], "messages[0]"),
        (
            [Turn("assistant", "x", [("A", "a")], "messages[0]"), Turn("user", "So?", (), "messages[1]")],
            "messages[0]",
        ),
    ],
    ids=["empty", "last-not-user", "no-text", "two-images", "tool", "assistant-image"],
)
def test_what_cannot_be_one_question_is_refused(turns: list[Turn], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        to_question(turns)
    assert caught.value.status == 400 and caught.value.param == param
