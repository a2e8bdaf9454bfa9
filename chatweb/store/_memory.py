"""
A journal in memory that answers synchronously: L{MemoryJournal}, for
queue tests driven by L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from typing import Any
import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from chatweb.errors import IdempotencyConflict, UnknownMessage, WrongState
from chatweb.interfaces import IJournal
from chatweb.store._journal import DISCARD, REQUEUE, Change, changed, contentDigest
from chatweb.store._journal import IDEMPOTENCY_WINDOW, EventSink, changeEvent, failureEventData
from chatweb.model import DELIVERED, FAILED, PENDING, Event, EventKind, QueuedMessage


@implementer(IJournal)
class MemoryJournal:
    """
    A journal in memory, answering at once.  C{failAppends} makes appends
    fail (a full disk, say).

    Like the SQLite journal, it remembers an idempotency key for 24 hours,
    measured by the C{received} times the queue gives (from its clock, so a
    L{twisted.internet.task.Clock} drives the window).
    """

    def __init__(self, now: Any = None, eventSink: EventSink | None = None) -> None:
        self.rows: dict[int, QueuedMessage] = {}
        self.failAppends = False
        #: Idempotency key: (session, message id, content digest, received).
        self._keys: dict[str, tuple[str, int, str, float]] = {}
        self._next = 1
        #: The event log, in id order.
        self.events: list[Event] = []
        self._nextEvent = 1
        self._now = now or (lambda: 0.0)
        self.eventSink = eventSink

    def _event(self, kind: EventKind, session: str, when: float, data: dict[str, Any]) -> Event:
        event = Event(self._nextEvent, kind, session, when, data)
        self._nextEvent += 1
        self.events.append(event)
        if self.eventSink is not None:
            self.eventSink(event)
        return event

    def logEvent(
        self, kind: EventKind, session: str, data: dict[str, Any] | None = None
    ) -> Deferred[Any]:
        return succeed(self._event(EventKind(kind), session, self._now(), data or {}))

    def eventsSince(
        self, afterId: int, session: str | None = None, limit: int = 1000
    ) -> Deferred[list[Event]]:
        return succeed(
            [
                e
                for e in self.events
                if e.id > afterId and (session is None or e.session == session)
            ][:limit]
        )

    def pruneEvents(self, before: float) -> Deferred[int]:
        kept = [e for e in self.events if e.time >= before]
        dropped = len(self.events) - len(kept)
        self.events = kept
        return succeed(dropped)

    def pendingSessions(self) -> Deferred[dict[str, tuple[int, int]]]:
        counts: dict[str, tuple[int, int]] = {}
        for m in self.rows.values():
            if m.state == PENDING:
                count, last = counts.get(m.session, (0, 0))
                counts[m.session] = (count + 1, max(last, m.id))
        return succeed(counts)

    def nextPending(
        self, session: str, afterId: int = 0
    ) -> Deferred[QueuedMessage | None]:
        return succeed(
            next(
                (
                    m
                    for _, m in sorted(self.rows.items())
                    if m.session == session and m.state == PENDING and m.id > afterId
                ),
                None,
            )
        )

    def append(
        self,
        session: str,
        content: str,
        received: float,
        idempotencyKey: str | None = None,
    ) -> Deferred[Any]:
        if self.failAppends:
            return fail(OSError("disk full"))
        if idempotencyKey is not None:
            # Forget the keys older than the window, as the SQLite journal does.
            oldest = received - IDEMPOTENCY_WINDOW
            self._keys = {k: v for k, v in self._keys.items() if v[3] >= oldest}
        if idempotencyKey is not None and idempotencyKey in self._keys:
            keySession, messageId, digest, _ = self._keys[idempotencyKey]
            if keySession != session or digest != contentDigest(content):
                return fail(IdempotencyConflict(idempotencyKey))
            return succeed(attrs.evolve(self.rows[messageId], duplicate=True))
        message = QueuedMessage(self._next, session, content, received)
        self.rows[message.id] = message
        if idempotencyKey is not None:
            self._keys[idempotencyKey] = (
                session, message.id, contentDigest(content), received
            )
        self._next += 1
        self._event(EventKind.MESSAGE_QUEUED, session, received, {"message": message.id})
        return succeed(message)

    def failedSessions(self) -> Deferred[list[str]]:
        return succeed(sorted({m.session for m in self.rows.values() if m.state == FAILED}))

    def _change(self, messageId: int, change: Change) -> Deferred[Any]:
        try:
            row = changed(self.rows.get(messageId), messageId, change)
        except (UnknownMessage, WrongState) as e:
            return fail(e)
        self.rows[messageId] = row
        kind, data = changeEvent(row)
        self._event(kind, row.session, self._now(), data)
        return succeed(row)

    def requeue(self, messageId: int) -> Deferred[Any]:
        return self._change(messageId, REQUEUE)

    def discard(self, messageId: int) -> Deferred[Any]:
        return self._change(messageId, DISCARD)

    def pending(self) -> Deferred[list[QueuedMessage]]:
        return succeed([m for _, m in sorted(self.rows.items()) if m.state == PENDING])

    def markDelivered(self, messageId: int) -> Deferred[None]:
        row = self.rows[messageId] = attrs.evolve(self.rows[messageId], state=DELIVERED)
        self._event(
            EventKind.DELIVERY_DONE,
            row.session,
            self._now(),
            {"message": messageId, "attempt": row.attempts + 1},
        )
        return succeed(None)

    def recordFailure(self, messageId: int, error: str, final: bool) -> Deferred[Any]:
        row = self.rows[messageId]
        row = attrs.evolve(
            row,
            attempts=row.attempts + 1,
            lastError=error,
            state=FAILED if final else PENDING,
        )
        self.rows[messageId] = row
        self._event(
            EventKind.DELIVERY_FAILED, row.session, self._now(), failureEventData(row, final)
        )
        return succeed(row)

    def messageHistory(self, messageId: int) -> Deferred[Any]:
        message = self.rows.get(messageId)
        if message is None:
            return succeed((None, []))
        kinds = {
            EventKind.MESSAGE_QUEUED,
            EventKind.DELIVERY_STARTED,
            EventKind.DELIVERY_DONE,
            EventKind.DELIVERY_FAILED,
            EventKind.MESSAGE_DISCARDED,
        }
        return succeed(
            (
                message,
                [
                    e
                    for e in self.events
                    if e.kind in kinds
                    and e.session == message.session
                    and e.data.get("message") == messageId
                ],
            )
        )

    def messages(self, session: str) -> Deferred[list[QueuedMessage]]:
        return succeed(
            [
                m
                for _, m in sorted(self.rows.items())
                if m.session == session and m.state in (PENDING, FAILED)
            ]
        )
