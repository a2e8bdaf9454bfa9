"""
An L{ISessionAdapter} in memory, for tests: L{MemoryAdapter}.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from chatweb.interfaces import ISessionAdapter
from chatweb.model import Delivery, Message, Session


@implementer(ISessionAdapter)
class MemoryAdapter:
    """
    Sessions in memory.

    @ivar delivered: every L{Delivery} handed over, in order (repeats
        included).
    @ivar sessions: session id to L{Session}; a completed delivery adds a
        user message.
    @ivar autoComplete: when true (the default), a delivery completes at
        once; when false, it waits in L{waiting} until L{complete} or
        L{failWaiting} is called.
    @ivar failures: how many of the next deliveries fail at once.
    """

    def __init__(self, autoComplete: bool = True) -> None:
        self.autoComplete = autoComplete
        self.failures = 0
        self.delivered: list[Delivery] = []
        self.sessions: dict[str, Session] = {}
        self.waiting: list[tuple[Delivery, Deferred[None]]] = []
        self.cancelled: list[Delivery] = []
        self._busy: set[str] = set()
        self._idle: dict[str, list[Deferred[None]]] = {}

    # -- ISessionAdapter

    def listSessions(self) -> Deferred[list[str]]:
        return succeed(sorted(self.sessions))

    def getSession(self, sessionId: str) -> Deferred[Session | None]:
        return succeed(self.sessions.get(sessionId))

    def isBusy(self, sessionId: str) -> bool:
        return sessionId in self._busy or any(
            d.session == sessionId for d, _ in self.waiting
        )

    def whenIdle(self, sessionId: str) -> Deferred[None]:
        if not self.isBusy(sessionId):
            return succeed(None)
        waiter: Deferred[None] = Deferred(
            lambda d: self._idle.get(sessionId, []).remove(d)
        )
        self._idle.setdefault(sessionId, []).append(waiter)
        return waiter

    def deliver(self, delivery: Delivery) -> Deferred[None]:
        self.delivered.append(delivery)
        if self.failures > 0:
            self.failures -= 1
            return fail(RuntimeError(f"delivery of {delivery.id} failed"))
        if self.autoComplete:
            self._record(delivery)
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            self.waiting[:] = [(x, y) for x, y in self.waiting if y is not d]
            self.cancelled.append(delivery)
            self._maybeIdle(delivery.session)

        d: Deferred[None] = Deferred(cancel)
        self.waiting.append((delivery, d))
        return d

    # -- driving it from a test

    def setBusy(self, sessionId: str, busy: bool = True, notify: bool = True) -> None:
        """
        Mark a session busy (as if a user were working in it), or idle
        again, which fires its L{whenIdle} Deferreds.

        @param notify: with C{False}, the session becomes idle quietly (a
            backend that cannot say when): only the queue's sweep finds
            out, on its next tick.
        """
        if busy:
            self._busy.add(sessionId)
        else:
            self._busy.discard(sessionId)
            if notify:
                self._maybeIdle(sessionId)

    def complete(self, index: int = 0) -> Delivery:
        """
        Complete the waiting delivery at C{index} (the oldest by default).
        """
        delivery, d = self.waiting.pop(index)
        self._record(delivery)
        d.callback(None)
        self._maybeIdle(delivery.session)
        return delivery

    def failWaiting(self, index: int = 0, error: Exception | None = None) -> Delivery:
        """
        Fail the waiting delivery at C{index}.
        """
        delivery, d = self.waiting.pop(index)
        d.errback(error or RuntimeError("delivery failed"))
        self._maybeIdle(delivery.session)
        return delivery

    def contents(self, sessionId: str) -> list[str | None]:
        """
        The contents of a session's messages, in order.
        """
        session = self.sessions.get(sessionId)
        return [m.content for m in session.messages] if session else []

    def _record(self, delivery: Delivery) -> None:
        session = self.sessions.get(delivery.session, Session(id=delivery.session))
        message = Message(role="user", content=delivery.content, created=delivery.received)
        self.sessions[delivery.session] = attrs.evolve(
            session, messages=session.messages + (message,)
        )

    def _maybeIdle(self, sessionId: str) -> None:
        if not self.isBusy(sessionId):
            for waiter in self._idle.pop(sessionId, []):
                waiter.callback(None)
