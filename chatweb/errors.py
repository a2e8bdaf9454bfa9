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


class Refusal(Exception):
    """
    A store operation refused what it was asked, before writing anything:
    the other operations of its group commit without being run again (see
    L{chatweb.store._sqlite.runOperations}).
    """


class IdempotencyConflict(Refusal):
    """
    An Idempotency-Key seen before with another session.
    """


class UnknownMessage(Refusal):
    """
    No queued message has this id.
    """


class NoSuchMessage(Refusal, IndexError):
    """
    A session has no message at this index.
    """


class WrongState(Refusal):
    """
    The message is not in a state that allows the operation.
    """

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state
