"""A chat conversation (OpenAI's or Ollama's) turned into one Moondream2 query, or a 400 saying why.

Moondream2 answers one question about at most one image; it has no chat template. So:

* the **last message must be the user's**; its text is the question and must not be empty;
* **one image** at most in the whole conversation, in any user message (a follow-up question
  about an image sent earlier is common); two or more are refused;
* **system / developer messages and earlier turns are folded into the question** as plain text
  before it: system text first, then ``Earlier in this conversation:`` with one ``User:`` /
  ``Assistant:`` line per turn. Nothing the client sent is dropped, and a conversation of one
  user message without a system message is asked exactly as written;
* other roles (``tool``, ``function``) are refused: the model cannot call tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from moondream_server.api.errors import ApiError

_FOLDED_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Turn:
    role: str
    text: str
    images: Sequence[tuple[str, str]] = field(default_factory=tuple)  # (image string, its param)
    param: str = ""  # where the message is in the request, e.g. messages[2]


@dataclass(frozen=True)
class Question:
    text: str
    image: str | None  # the one image (data URL or bare base64), if the conversation has one
    image_param: str  # where it was, for error messages


def refuse(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="unsupported_parameter", param=param)


def to_question(turns: Sequence[Turn]) -> Question:
    if not turns:
        raise refuse("messages", "messages must not be empty")
    system: list[str] = []
    earlier: list[str] = []
    images: list[tuple[str, str]] = []
    *before, last = turns
    for turn in turns:
        if turn.role not in _FOLDED_ROLES:
            raise refuse(turn.param, f"{turn.role} messages are not supported: Moondream2 cannot call tools")
        if turn.images and turn.role != "user":
            raise refuse(turn.param, "images are only taken from user messages")
        images.extend(turn.images)
    if last.role != "user":
        raise refuse(last.param, "the last message must be the user's question")
    if not last.text.strip():
        raise refuse(f"{last.param}.content", "the last user message has no text: ask a question")
    if len(images) > 1:
        raise refuse(
            images[1][1],
            f"Moondream2 answers about one image per request; this conversation has {len(images)} images",
        )
    for turn in before:
        if not turn.text.strip():
            continue
        if turn.role in ("system", "developer"):
            system.append(turn.text)
        else:
            earlier.append(f"{_FOLDED_ROLES[turn.role]}: {turn.text}")
    parts = [*system]
    if earlier:
        parts.append("Earlier in this conversation:\n" + "\n".join(earlier))
    parts.append(last.text)
    image, param = images[0] if images else (None, "")
    return Question("\n\n".join(parts), image, param)
