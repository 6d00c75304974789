"""Errors an engine raises; the API layer maps each to one HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error an engine raises on purpose."""


class InvalidRequestError(EngineError):
    """The request cannot be served as asked (e.g. the prompt does not fit the context). HTTP 400."""


class QueueFullError(EngineError):
    """Admission refused: the request queue is at capacity. HTTP 429 with Retry-After."""

    def __init__(self, message: str = "the request queue is full", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(EngineError):
    """The model is not loaded (yet, or any more). HTTP 503 with Retry-After."""

    def __init__(self, message: str = "the model is not ready", retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(EngineError):
    """The request did not finish within its deadline. HTTP 504."""
