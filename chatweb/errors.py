"""
The errors the queue and journal raise for the API to turn into answers.
"""

from __future__ import annotations


class QueueFull(Exception):
    """
    Too many messages are waiting: in one session (C{scope="session"}) or in
    all (C{scope="total"}).
    """

    def __init__(self, scope: str, limit: int, retryAfter: float) -> None:
        super().__init__(scope, limit, retryAfter)
        self.scope = scope
        self.limit = limit
        self.retryAfter = retryAfter


class IdempotencyConflict(Exception):
    """
    An Idempotency-Key seen before with another session.
    """


class UnknownMessage(Exception):
    """
    No queued message has this id.
    """


class WrongState(Exception):
    """
    The message is not in a state that allows the operation.
    """

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state
