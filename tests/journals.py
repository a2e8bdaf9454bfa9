"""
Journals for tests: one whose appends wait until the test lets them
through, to see what happens before a message is stored.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from chatweb.model import QueuedMessage
from chatweb.testing import MemoryJournal


class HeldJournal(MemoryJournal):
    """
    A L{MemoryJournal} whose appends are held: nothing is stored, and the
    append's Deferred does not fire, until L{release}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[QueuedMessage], tuple[Any, ...]]] = []

    def append(
        self,
        session: str,
        content: str,
        received: float,
        idempotencyKey: str | None = None,
    ) -> Deferred[Any]:
        d: Deferred[QueuedMessage] = Deferred()
        self.held.append((d, (session, content, received, idempotencyKey)))
        return d

    def release(self) -> None:
        """
        Store every held message, in order, and fire its append.
        """
        held, self.held = self.held, []
        for d, args in held:
            super().append(*args).chainDeferred(d)
