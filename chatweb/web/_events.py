"""
Live events over Server-Sent Events: C{GET /events} (every session) and
C{GET /sessions/{id}/events} (one session).

Each event is written as::

    id: 42
    event: message.added
    data: {"id": 42, "kind": "message.added", "session": "ci", ...}

A client that reconnects with C{Last-Event-ID} (the header, or the query
parameter C{since} or C{last_event_id}) first gets the events it missed, from
the store's event log while it still keeps them, then the live ones, with no
gap and no duplicate: the stream subscribes to the L{EventHub} first and
buffers what it publishes, replays from the store, then sends the buffer,
skipping the ids already sent.

A reader too slow for the live events (its connection's buffer is full and
C{maxBuffered} more events wait) gets a final C{overflow} event and its stream
is closed; it reconnects with C{Last-Event-ID}.  While a stream replays, what
would overflow its buffer is dropped instead, and read from the store, unless
its reader has taken nothing for L{REPLAY_STALL} seconds.  A replay writes only
while the connection takes more (the rest is read again), and reads long
events a few at a time, so a reader that takes nothing holds about one event
in memory.  At most C{maxStreams} are open at once (more get a 503 with
Retry-After).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from chatweb.events import EventHub
from chatweb.model import Event
from chatweb.store._unreachable import logFailure
from chatweb.web._errors import _error
from chatweb.web._validation import BadRequest, decodePathSegment, validateSessionId

_log = Logger()

#: Streams open at once, by default.
MAX_STREAMS = 100
#: Events that may wait for a slow reader before its stream is dropped.
MAX_BUFFERED = 1000
#: Seconds between keep-alive comments.
KEEP_ALIVE = 15.0
#: Seconds a dropped stream's connection may take to send what it has
#: buffered before it is cut (a reader that reads nothing never would).
ABORT_AFTER = 10.0
#: Events read from the store at a time while replaying: at first, and at
#: most.  In between, as many as make about L{REPLAY_BYTES} at the size of
#: the last read's: events of long messages are read a few at a time.
REPLAY_FIRST = 10
REPLAY_BATCH = 100
REPLAY_BYTES = 1024 * 1024
#: Seconds a replaying stream's reader may take nothing while more live
#: events come than it buffers, before it is dropped as too slow.
REPLAY_STALL = 10.0
#: Event ids are SQLite integers.
_MAX_ID = 2**63 - 1


#: The event formatted last and its bytes: each event goes to every
#: stream that follows it, one after the other (on the reactor's thread).
_formatted: tuple[Event | None, bytes] = (None, b"")


def formatEvent(event: Event) -> bytes:
    """
    C{event} as one Server-Sent Event, made once for all its streams.
    """
    global _formatted
    if _formatted[0] is event:
        return _formatted[1]
    data = json.dumps(event.asJSON(), separators=(",", ":"))
    text = f"id: {event.id}\nevent: {event.kind.value}\ndata: {data}\n\n".encode("utf-8")
    _formatted = (event, text)
    return text


def _lastEventId(request: IRequest) -> int | None:
    """
    The id the client last saw (header C{Last-Event-ID}, or the query
    parameter C{last_event_id} or C{since}), None without one.

    @raise BadRequest: if it is not one whole number.
    """
    values = list(request.requestHeaders.getRawHeaders(b"last-event-id", []))
    for name in (b"last_event_id", b"since"):
        values.extend(request.args.get(name, []))
    if not values:
        return None
    value = values[0].strip()
    if len(values) != 1 and any(v.strip() != value for v in values):
        raise BadRequest("send one Last-Event-ID (header, 'last_event_id' or 'since')")
    if not re.fullmatch(rb"[0-9]{1,19}", value) or int(value) > _MAX_ID:
        raise BadRequest(
            "the last event id (Last-Event-ID, 'last_event_id' or 'since') must be"
            f" an event id: a whole number from 0 to {_MAX_ID}"
        )
    return int(value)


def sessionFromRawPath(request: IRequest) -> str | None:
    """
    The session id of C{.../sessions/ID/events}, read from the raw path
    (Twisted decodes C{%2F} before routing, so ids with C{/} are matched
    here), or None if the raw path is not of that form.
    """
    path = request.path.split(b"?", 1)[0]
    segments = path.split(b"/")
    if len(segments) < 4 or segments[-1] != b"events" or segments[-3] != b"sessions":
        return None
    return decodePathSegment(segments[-2])


@implementer(IPushProducer)
class _Stream:
    """
    One open event stream.
    """

    def __init__(
        self,
        streams: EventStreams,
        request: IRequest,
        session: str | None,
        lastSent: int,
    ) -> None:
        self._streams = streams
        # A twisted.web Request: a producer is registered on it.
        self._request: Request = cast(Request, request)
        self.session = session
        self.lastSent = lastSent
        self._startedAfter = lastSent
        #: Events waiting to be written (while replaying, or while the
        #: connection is paused).
        self._waiting: list[Event] = []
        self._replaying = False
        #: Whether a replay's read is under way, and whether live events
        #: were dropped while it ran (it reads again: they are in the log).
        self._reading = False
        self._dropped = False
        #: How many events the replay's next read asks for.
        self._batch = REPLAY_FIRST
        self._paused = False
        self._pausedSince = 0.0
        self.closed = False
        self._unsubscribe: Callable[[], None] = lambda: None
        #: Fires when the stream ends (what the route returns to Klein).
        self.ended: Deferred[bytes | None] = Deferred()

    def start(self, replay: bool) -> None:
        #: The id the client gave: an event published from now on with an
        #: id not above it shows that id to be newer than any event.
        self._startedAfter = self.lastSent
        self._unsubscribe = self._streams.hub.subscribe(self._published, self.session)
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(self._lost)
        if replay:
            self._replaying = True
            self._replayFrom(self.lastSent)

    # -- replay from the store

    def _replayFrom(self, afterId: int) -> None:
        if self.closed:
            return
        # What is dropped from now on, this read may not have.
        self._dropped = False
        self._reading = True
        d = self._streams.journal.eventsSince(afterId, self.session, self._batch)
        d.addCallbacks(self._replayed, self._replayFailed, callbackArgs=(self._batch,))

    def _replayed(self, events: list[Event], asked: int) -> None:
        self._reading = False
        if self.closed:
            return
        more = len(events) >= asked or self._dropped
        written = size = 0
        for event in events:
            if self._paused:
                # The connection's buffer is full: the rest is read again
                # once the reader has taken it (not all held in memory).
                more = True
                break
            size += self._write(event)
            written += 1
        if written:
            self._batch = max(1, min(REPLAY_BATCH, REPLAY_BYTES * written // max(size, 1)))
        if more:
            if self._paused:
                # Read on when the reader has taken what was sent.
                return
            self._replayFrom(self.lastSent)
            return
        self._replaying = False
        self._flush()

    def _replayFailed(self, failure: Any) -> None:
        self._reading = False
        logFailure(_log, failure, "Could not read the event log for a stream")
        self.close()

    # -- live events

    def _published(self, event: Event) -> None:
        if self.closed:
            return
        if event.id <= self._startedAfter:
            # Published after this stream began, yet not after the id the
            # client gave: that id is from another store (restored, or
            # made anew).  Go on from this event rather than wait forever.
            self._startedAfter = 0
            self.lastSent = min(self.lastSent, event.id - 1)
        if event.id <= self.lastSent:
            return
        if self._replaying or self._paused or self._waiting:
            self._waiting.append(event)
            if len(self._waiting) > self._streams.maxBuffered:
                if self._replaying and not self._stalled():
                    # Catching up: published, so they are in the log, where
                    # the replay reads them.
                    self._waiting = []
                    self._dropped = True
                else:
                    self._overflow()
            return
        self._write(event)

    def _stalled(self) -> bool:
        """
        Whether the reader has taken nothing for L{REPLAY_STALL} seconds.
        """
        return self._paused and (
            self._streams.clock.seconds() - self._pausedSince >= REPLAY_STALL
        )

    def _flush(self) -> None:
        while self._waiting and not self._paused and not self.closed:
            event = self._waiting.pop(0)
            if event.id > self.lastSent:
                self._write(event)

    def _write(self, event: Event) -> int:
        """
        Send C{event} unless sent already; the bytes written.
        """
        if event.id <= self.lastSent:
            return 0
        self.lastSent = event.id
        data = formatEvent(event)
        self._request.write(data)
        return len(data)

    def _overflow(self) -> None:
        self._waiting = []
        self._streams.overflows += 1
        self._request.write(
            b"event: overflow\ndata: "
            + json.dumps(
                {
                    "error": "this stream fell too far behind and is closed;"
                    " reconnect with Last-Event-ID",
                    "last_event_id": self.lastSent,
                }
            ).encode("ascii")
            + b"\n\n"
        )
        self.close(loseConnection=True)

    def keepAlive(self) -> None:
        if not self.closed and not self._paused:
            self._request.write(b": keep-alive\n\n")

    # -- IPushProducer

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._pausedSince = self._streams.clock.seconds()

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._replaying:
            if not self._reading:  # (else it reads on when that is done)
                self._replayFrom(self.lastSent)
        else:
            self._flush()

    def stopProducing(self) -> None:
        self.close()

    # -- the end

    def close(self, loseConnection: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._unsubscribe()
        self._streams._closed(self)
        request = self._request
        try:
            request.unregisterProducer()
        except Exception:
            pass
        if not getattr(request, "_disconnected", False) and not request.finished:
            channel = getattr(request, "channel", None)
            # Klein finishes the request when its route's Deferred fires.
            self.ended.callback(b"")
            if loseConnection and channel is not None:
                # No keep-alive: whatever is still buffered is sent, then
                # the connection closes (the channel's own loseConnection:
                # the transport's would wait for its paused producer).
                channel.loseConnection()
                # A reader that reads nothing never lets the buffered bytes
                # go: its connection is cut after a grace period.
                self._streams._abortLater(getattr(channel, "transport", None))
        elif not self.ended.called:
            self.ended.callback(None)

    def _lost(self, result: Any) -> None:
        # The client went away (or the request finished).
        if not self.closed:
            self.closed = True
            self._unsubscribe()
            self._streams._closed(self)
            try:
                self._request.unregisterProducer()
            except Exception:
                pass
            if not self.ended.called:
                self.ended.callback(None)


class EventStreams:
    """
    The open event streams of one API.

    @ivar hub: the L{EventHub} live events come from.
    @ivar journal: the store whose C{eventsSince} replays missed events.
    """

    def __init__(
        self,
        hub: EventHub,
        journal: Any,
        clock: IReactorTime,
        maxStreams: int = MAX_STREAMS,
        maxBuffered: int = MAX_BUFFERED,
        keepAlive: float = KEEP_ALIVE,
    ) -> None:
        self.hub = hub
        self.journal = journal
        self.clock = clock
        self.maxStreams = maxStreams
        self.maxBuffered = maxBuffered
        self.keepAliveInterval = keepAlive
        #: Streams closed because their reader fell behind.
        self.overflows = 0
        self._streams: set[_Stream] = set()
        self._keepAlive = LoopingCall(self._tick)
        self._keepAlive.clock = clock
        self._stopping = False
        #: Called with the number of open streams whenever it changes.
        self.onCountChanged: Callable[[int], None] = lambda n: None
        #: Connections of closed streams still sending, cut when their
        #: grace period ends (L{ABORT_AFTER}) or at closeAll().
        self._aborts: dict[IDelayedCall, Any] = {}

    def _abortLater(self, transport: Any) -> None:
        abort = getattr(transport, "abortConnection", None)
        if abort is None:
            return

        def cut() -> None:
            del self._aborts[later]
            abort()

        later = self.clock.callLater(ABORT_AFTER, cut)
        self._aborts[later] = abort

    def openCount(self) -> int:
        return len(self._streams)

    def stream(self, request: IRequest, session: str | None) -> Any:
        """
        Answer C{request} with the event stream of C{session} (None: every
        session).
        """
        if request.method != b"GET":
            return _error(request, 404, "not found")
        try:
            if session is not None:
                session = validateSessionId(session, "session id")
            lastId = _lastEventId(request)
        except BadRequest as e:
            return _error(request, 400, str(e))
        if self._stopping:
            request.setHeader(b"Retry-After", b"5")
            return _error(request, 503, "the server is stopping; reconnect shortly")
        if len(self._streams) >= self.maxStreams:
            request.setHeader(b"Retry-After", b"5")
            return _error(
                request,
                503,
                f"{self.maxStreams} event streams are open, the most this server"
                " allows; retry later",
            )
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        stream = _Stream(self, request, session, lastId or 0)
        self._streams.add(stream)
        self.onCountChanged(len(self._streams))
        if not self._keepAlive.running:
            self._keepAlive.start(self.keepAliveInterval, now=False)
        # Tell the client how long to wait before it reconnects.
        request.write(b"retry: 2000\n\n")
        stream.start(replay=lastId is not None)
        return stream.ended

    def sessionStream(self, request: IRequest) -> Any:
        """
        Answer C{GET .../sessions/ID/events}, the id read from the raw path.
        """
        try:
            session = sessionFromRawPath(request)
        except BadRequest as e:
            return _error(request, 400, str(e))
        if session is None:
            return _error(
                request,
                404,
                "not found (write a session id that holds '/' percent-encoded:"
                " /sessions/a%2Fb/events)",
            )
        return self.stream(request, session)

    def _tick(self) -> None:
        for stream in list(self._streams):
            stream.keepAlive()

    def _closed(self, stream: _Stream) -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self.onCountChanged(len(self._streams))
        if not self._streams and self._keepAlive.running:
            self._keepAlive.stop()

    def closeAll(self) -> None:
        """
        End every stream (the service is stopping); new ones get a 503.
        """
        self._stopping = True
        for stream in list(self._streams):
            stream.close(loseConnection=True)
        # Stopping: no grace for connections still sending.
        for later, abort in list(self._aborts.items()):
            later.cancel()
            abort()
        self._aborts.clear()
