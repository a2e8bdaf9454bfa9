"""
A session adapter of your own: sessions kept in memory, each message
"processed" for a moment before the session is idle again.

Run it:  python docs/examples/notes_adapter.py   (then post to 127.0.0.1:7780)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from chatweb import Delivery, ISessionAdapter, Message, Session


@implementer(ISessionAdapter)
class NotesAdapter:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._sessions: dict[str, list[Message]] = {}
        self._seen: set[int] = set()
        self._busy: set[str] = set()
        self._idle: dict[str, list[Deferred[None]]] = {}

    def listSessions(self) -> Deferred[list[str]]:
        return succeed(sorted(self._sessions))

    def getSession(self, sessionId: str) -> Deferred[Session | None]:
        if sessionId not in self._sessions:
            return succeed(None)
        return succeed(Session(id=sessionId, messages=tuple(self._sessions[sessionId])))

    def isBusy(self, sessionId: str) -> bool:
        return sessionId in self._busy

    def whenIdle(self, sessionId: str) -> Deferred[None]:
        if sessionId not in self._busy:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._idle[sessionId].remove(d))
        self._idle.setdefault(sessionId, []).append(waiter)
        return waiter

    def deliver(self, delivery: Delivery) -> Deferred[None]:
        messages = self._sessions.setdefault(delivery.session, [])
        if delivery.id in self._seen:  # delivered again after a crash
            return succeed(None)
        self._seen.add(delivery.id)
        messages.append(Message(role="user", content=delivery.content, created=delivery.received))
        self._busy.add(delivery.session)
        # The work: here, a pause.  Cancelling the Deferred cancels it.
        work = deferLater(self._clock, 0.5, lambda: None)

        def idle(result: Any) -> Any:
            self._busy.discard(delivery.session)
            for waiter in self._idle.pop(delivery.session, []):
                waiter.callback(None)
            return result

        return work.addBoth(idle)


if __name__ == "__main__":
    import os
    import sys
    import tempfile

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from chatweb import ChatWebService

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    service = ChatWebService(
        apiKeys=[os.environ.get("CHATWEB_API_KEY", "example-key")],
        dataDir=tempfile.mkdtemp(prefix="chatweb-example-"),
        endpoint="tcp:7780:interface=127.0.0.1",
        adapter=NotesAdapter(reactor),
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
