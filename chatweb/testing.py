"""
Helpers for tests of programs that use chatweb (and of chatweb itself).

  - L{MemoryAdapter}: an L{ISessionAdapter} whose sessions live in memory,
    whose busy state a test sets, and whose deliveries a test completes or
    fails by hand (or lets complete at once).
  - L{MemoryJournal}: an L{IJournal} in memory that answers synchronously, for
    queue tests driven by L{twisted.internet.task.Clock}.
  - L{startChatWeb}: a real L{ChatWebService} listening on 127.0.0.1 (a free
    port) for the length of one trial test, with a treq client for it.
  - L{ChatWebProcess}: the real C{twistd -n chatweb} as a child process,
    ended when the test ends.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
from typing import Any, Sequence

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from chatweb.errors import IdempotencyConflict, UnknownMessage, WrongState
from chatweb.interfaces import IJournal, ISessionAdapter
from chatweb.journal import DISCARD, REQUEUE, Change, changed, contentDigest
from chatweb.journal import IDEMPOTENCY_WINDOW, EventSink, changeEvent, failureEventData
from chatweb.model import (
    DELIVERED,
    FAILED,
    PENDING,
    Delivery,
    Event,
    EventKind,
    Message,
    QueuedMessage,
    Session,
)


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
        L{failNext} is called.
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

    def setBusy(self, sessionId: str, busy: bool = True) -> None:
        """
        Mark a session busy (as if a user were working in it), or idle
        again, which fires its L{whenIdle} Deferreds.
        """
        if busy:
            self._busy.add(sessionId)
        else:
            self._busy.discard(sessionId)
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

    def messages(self, session: str) -> Deferred[list[QueuedMessage]]:
        return succeed(
            [
                m
                for _, m in sorted(self.rows.items())
                if m.session == session and m.state in (PENDING, FAILED)
            ]
        )


@attrs.frozen
class RunningChatWeb:
    """
    A chatweb service listening for one test.

    @ivar url: its base URL, C{http://127.0.0.1:PORT}.
    @ivar client: a treq L{HTTPClient} that keeps no connection open (so the
        reactor is clean when the test ends).
    @ivar headers: the headers that authenticate a request.
    """

    service: Any
    url: str
    apiKey: str
    client: HTTPClient

    @property
    def headers(self) -> dict[bytes | str, bytes | str]:
        return {"X-API-Key": self.apiKey}

    def post(self, session: str, content: str, **kwargs: Any) -> Deferred[Any]:
        """
        POST a message; fires with the treq response.
        """
        return self.client.post(
            self.url + "/",
            json={"session": session, "content": content},
            headers=self.headers,
            **kwargs,
        )

    def get(self, path: str, **kwargs: Any) -> Deferred[Any]:
        return self.client.get(self.url + path, headers=self.headers, **kwargs)


async def startChatWeb(
    testCase: TestCase,
    apiKey: str = "test-api-key",
    dataDir: str | None = None,
    **kwargs: Any,
) -> RunningChatWeb:
    """
    Start a L{ChatWebService} on a free port of 127.0.0.1, with its data in
    a temporary directory of C{testCase} unless C{dataDir} is given; it
    stops when the test ends.  C{kwargs} go to L{ChatWebService}.

    Use it from a trial test::

        async def test_post(self):
            chatweb = await startChatWeb(self, responder="echo")
            response = await chatweb.post("ci", "hello")
            self.assertEqual(response.code, 204)
    """
    from twisted.internet import reactor

    from chatweb.service import ChatWebService

    if dataDir is None:
        dataDir = os.path.abspath(testCase.mktemp())
    os.makedirs(dataDir, exist_ok=True)
    service = ChatWebService(
        [apiKey], dataDir, endpoint="tcp:0:interface=127.0.0.1", **kwargs
    )
    service.startService()
    testCase.addCleanup(_stopChatWeb, service)
    assert service.listening is not None
    port = await service.listening
    await service.ready
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    return RunningChatWeb(service, f"http://127.0.0.1:{port.getHost().port}", apiKey, client)


async def _stopChatWeb(service: Any) -> None:
    """
    Stop a service started by L{startChatWeb}, and close every connection
    to it, including those that treq's default (persistent) connection pool
    keeps open, so that trial finds the reactor clean.
    """
    import treq.api

    globalPool = treq.api.get_global_pool()
    if globalPool is not None:
        await globalPool.closeCachedConnections()
    await service.site.closeConnections()
    if service.running:
        await service.stopService()
    await service.site.closeConnections()


class _ProcessOutput(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()
        self._watchers: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for watcher in list(self._watchers):
            pattern, d = watcher
            match = pattern.search(self.output)
            if match:
                self._watchers.remove(watcher)
                d.callback(match)

    errReceived = outReceived

    def waitFor(self, pattern: bytes) -> Deferred[re.Match[bytes]]:
        d: Deferred[re.Match[bytes]] = Deferred()
        self._watchers.append((re.compile(pattern), d))
        self.outReceived(b"")
        return d

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.ended.callback(code if code is not None else -(signal or 0))
        for _, d in self._watchers:
            d.errback(RuntimeError("chatweb exited: " + self.output.decode("utf-8", "replace")))
        self._watchers = []


def twistdCommand() -> list[str]:
    """
    How to run this environment's twistd.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


#: The processes started and not yet ended, by pid: killed at exit, should a
#: test have left one running.
_running: dict[int, Any] = {}


@atexit.register
def _killLeftovers() -> None:
    for pid in list(_running):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class ChatWebProcess:
    """
    The real C{twistd -n chatweb}, as a child process on 127.0.0.1 (a free
    port), for end-to-end tests.

    Pass the test as C{testCase}: the process is then stopped when the test
    ends, whether or not it called L{stop}.  (A process left running anyway
    is killed when the Python process exits.)

    @ivar url: set by L{start}.
    @ivar output: everything the process printed.
    """

    #: The line that says it listens (whole: a port split across two reads
    #: must not be read as a shorter one).
    LISTENING = rb"chatweb listening on 127\.0\.0\.1:(\d+)\r?\n"

    def __init__(
        self,
        dataDir: str,
        apiKey: str = "test-api-key",
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        testCase: TestCase | None = None,
    ) -> None:
        self.testCase = testCase
        self.dataDir = dataDir
        self.apiKey = apiKey
        self.args = list(args)
        self.env = env
        self.url: str | None = None
        #: The endpoint it listens on.
        self.listen = "tcp:0:interface=127.0.0.1"
        self._protocol: _ProcessOutput | None = None
        self._process: Any = None

    @property
    def pid(self) -> int | None:
        """
        The process id, once started.
        """
        return self._process.pid if self._process is not None else None

    @property
    def output(self) -> str:
        return self._protocol.output.decode("utf-8", "replace") if self._protocol else ""

    async def start(self, timeout: float = 60.0) -> str:
        """
        Start it; fires with its base URL once it listens.
        """
        from twisted.internet import reactor

        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("CHATWEB_API_KEY", self.apiKey)
        command = twistdCommand() + [
            "--nodaemon",
            "--pidfile=",
            "chatweb",
            "--data-dir",
            self.dataDir,
            "--listen",
            self.listen,
            *self.args,
        ]
        self._protocol = _ProcessOutput()
        self._process = reactor.spawnProcess(
            self._protocol, command[0], command, env=env
        )
        pid = self._process.pid
        _running[pid] = self

        def ended(result: object) -> object:
            _running.pop(pid, None)
            return result

        self._protocol.ended.addBoth(ended)
        if self.testCase is not None:
            self.testCase.addCleanup(self.stop)
        listening = self._protocol.waitFor(self.LISTENING)
        listening.addTimeout(timeout, reactor)
        match = await listening
        self.url = f"http://127.0.0.1:{int(match.group(1))}"
        return self.url

    def signal(self, name: str) -> None:
        """
        Send a signal: C{"TERM"} to stop it, C{"KILL"} to crash it.
        """
        if self._protocol is not None and not self._protocol.ended.called:
            self._process.signalProcess(name)

    async def stop(self, timeout: float = 30.0) -> int:
        """
        SIGTERM, then wait for the exit (SIGKILL after C{timeout}).
        """
        from twisted.internet import reactor

        if self._protocol is None:
            return 0
        if self._protocol.ended.called:
            return await self._protocol.ended
        self.signal("TERM")
        kill = reactor.callLater(timeout, self.signal, "KILL")
        code = await self._protocol.ended
        if kill.active():
            kill.cancel()
        return code

    async def exited(self) -> int:
        """
        Wait for the process to end by itself; its exit code (or minus the
        signal that ended it).
        """
        assert self._protocol is not None
        return await self._protocol.ended

    async def crash(self) -> int:
        """
        SIGKILL: no chance to clean up.
        """
        assert self._protocol is not None
        self.signal("KILL")
        return await self._protocol.ended
