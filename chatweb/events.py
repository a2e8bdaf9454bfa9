"""
Live events in the process: L{EventHub} hands each L{chatweb.model.Event}
to whoever subscribed, after the store has committed it.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

from chatweb.model import Event

_log = Logger()

Subscriber = Callable[[Event], None]


class EventHub:
    """
    An in-process publisher of events.

    The journal gives it each event once its transaction has committed
    (C{journal.eventSink = hub.publish}), in id order; it calls every
    subscriber of that event's session, and every subscriber of all
    sessions, in the order they subscribed.  A subscriber that raises is
    logged; the others, and the publisher, carry on.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, str | None]] = []
        #: The id of the last event published (0: none yet).
        self.lastId = 0

    def subscribe(
        self, callback: Subscriber, session: str | None = None
    ) -> Callable[[], None]:
        """
        Call C{callback} with each event published from now on (of
        C{session} only, if given).

        @return: a callable that ends the subscription (calling it twice is
            harmless).
        """
        entry = (callback, session)
        self._subscribers.append(entry)

        def unsubscribe() -> None:
            try:
                self._subscribers.remove(entry)
            except ValueError:
                pass

        return unsubscribe

    def publish(self, event: Event) -> None:
        """
        Hand C{event} to its subscribers.
        """
        self.lastId = max(self.lastId, event.id)
        for callback, session in list(self._subscribers):
            if session is not None and session != event.session:
                continue
            try:
                callback(event)
            except Exception:
                _log.failure(
                    "An event subscriber failed on event {id} ({kind})",
                    id=event.id,
                    kind=event.kind.value,
                )

    def subscriberCount(self) -> int:
        return len(self._subscribers)
