"""
Live events over Server-Sent Events (GET /events, GET /sessions/{id}/events),
GET /healthz, against a real chatweb on 127.0.0.1.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from chatweb.events import EventHub
from chatweb.model import Event, EventKind
from chatweb.testing import MemoryJournal, startChatWeb
from chatweb.web._events import EventStreams, formatEvent


class _Request(DummyRequest):
    """
    A DummyRequest that takes a push producer (DummyRequest's own loop is
    for pull producers).
    """

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def parseEvents(text: str) -> list[dict[str, Any]]:
    """
    The events (C{id}, C{event}, C{data}) and comments in SSE C{text}.
    """
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                fields.setdefault("comments", []).append(line)
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
        events.append(fields)
    return events


class _Reader(Protocol):
    """
    Reads an event stream until C{until(events)} is true, then drops the
    connection; C{done} fires with the events.
    """

    def __init__(self, until: Any) -> None:
        self.until = until
        self.text = ""
        self.done: Deferred[list[dict[str, Any]]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.text += data.decode("utf-8")
        complete = self.text.rpartition("\n\n")[0]
        events = [e for e in parseEvents(complete) if "event" in e]
        if not self.done.called and self.until(events):
            self.done.callback(events)
            self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback([e for e in parseEvents(self.text) if "event" in e])


async def openStream(
    chatweb: Any, path: str, until: Any, headers: dict[str, str] | None = None
) -> tuple[Any, _Reader]:
    response = await chatweb.client.get(
        chatweb.url + path, headers=dict(chatweb.headers, **(headers or {})), unbuffered=True
    )
    reader = _Reader(until)
    response.deliverBody(reader)
    return response, reader


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def doneWith(events: list[dict[str, Any]]) -> bool:
    return "delivery.done" in kinds(events)


class LiveEventsTests(TestCase):
    async def test_postAndWaitForTheAnswer(self) -> None:
        """
        A client that follows a session (its id holds '/') sees its message
        queued, the echoed answer added and the delivery done; one that
        reconnects with Last-Event-ID after the first event gets the same
        events after it, none twice.
        """
        chatweb = await startChatWeb(self, responder="echo")
        path = "/sessions/" + quote("ci/nightly", safe="") + "/events"
        response, reader = await openStream(chatweb, path, doneWith)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"),
            ["text/event-stream; charset=utf-8"],
        )
        posted = await chatweb.post("ci/nightly", "hello there")
        self.assertEqual(posted.code, 204)
        events = await reader.done
        self.assertEqual(kinds(events)[0], "message.queued")
        self.assertEqual(kinds(events)[-1], "delivery.done")
        answers = [
            e["data"]["data"]
            for e in events
            if e["event"] == "message.added"
        ]
        self.assertIn("hello there", json.dumps(answers))
        for e in events:
            self.assertEqual(e["data"]["session"], "ci/nightly")
            self.assertEqual(int(e["id"]), e["data"]["id"])
            self.assertEqual(e["event"], e["data"]["kind"])

        # Reconnect as if the connection broke after the first event.
        first = events[0]["id"]
        for how in [{"Last-Event-ID": first}, None]:
            again = path if how else path + "?since=" + first
            _, replay = await openStream(
                chatweb, again, doneWith, headers=how
            )
            missed = await replay.done
            self.assertEqual([e["id"] for e in missed], [e["id"] for e in events[1:]])

    async def test_allSessions(self) -> None:
        """
        GET /events streams every session's events.
        """
        chatweb = await startChatWeb(self, responder="echo")
        _, reader = await openStream(
            chatweb,
            "/events",
            lambda events: kinds(events).count("delivery.done") == 2,
        )
        await chatweb.post("a", "one")
        await chatweb.post("b", "two")
        events = await reader.done
        self.assertEqual({e["data"]["session"] for e in events}, {"a", "b"})

    async def test_replayThenLiveWithoutGapOrDuplicate(self) -> None:
        """
        Events published while a reconnecting stream is still replaying
        from the store come after the replay, each once.
        """
        chatweb = await startChatWeb(self, responder="echo")
        await chatweb.post("s", "first")
        while chatweb.service.events.lastId == 0:
            await deferLater(reactor, 0.01, lambda: None)
        # Everything about "first" is in the store; a reconnect from 0
        # replays it while "second" happens live.
        _, reader = await openStream(
            chatweb,
            "/sessions/s/events",
            lambda events: kinds(events).count("delivery.done") == 2,
            headers={"Last-Event-ID": "0"},
        )
        await chatweb.post("s", "second")
        events = await reader.done
        ids = [int(e["id"]) for e in events]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual(kinds(events).count("message.queued"), 2)

    async def test_needsTheKeyAndValidInput(self) -> None:
        chatweb = await startChatWeb(self)
        response = await chatweb.client.get(chatweb.url + "/events")
        self.assertEqual(response.code, 401)
        await response.content()
        response = await chatweb.get("/events?since=abc")
        self.assertEqual(response.code, 400)
        self.assertIn("error", await response.json())
        response = await chatweb.get("/sessions/a/b/events")
        self.assertEqual(response.code, 404)
        self.assertIn("error", await response.json())
        # A malformed escape is refused, not taken as the session "%ZZ".
        response = await chatweb.get("/sessions/%ZZ/events")
        self.assertEqual(response.code, 400)
        self.assertIn("percent-escape", (await response.json())["error"])

    async def test_streamCap(self) -> None:
        """
        Past the most streams, a 503 with Retry-After; a stream's end frees
        its place.
        """
        chatweb = await startChatWeb(self)
        chatweb.service.api.live.maxStreams = 1
        _, first = await openStream(chatweb, "/events", lambda events: False)
        response = await chatweb.get("/events")
        self.assertEqual(response.code, 503)
        self.assertTrue(response.headers.hasHeader("retry-after"))
        self.assertIn("error", await response.json())
        first.transport.stopProducing()
        await first.done
        while chatweb.service.api.live.openCount():
            await deferLater(reactor, 0.01, lambda: None)
        response, second = await openStream(chatweb, "/events", lambda events: False)
        self.assertEqual(response.code, 200)
        second.transport.stopProducing()

    async def test_endsCleanlyAtStop(self) -> None:
        """
        Stopping the service ends open streams (the body ends; no error).
        """
        chatweb = await startChatWeb(self)
        _, reader = await openStream(chatweb, "/events", lambda events: False)
        await chatweb.service.stopService()
        self.assertEqual(await reader.done, [])
        self.assertEqual(chatweb.service.api.live.openCount(), 0)


class KeepAliveTests(SynchronousTestCase):
    def test_commentsKeepIdleStreamsAlive(self) -> None:
        """
        Every keep-alive interval an idle stream gets a comment line.
        """
        clock = Clock()
        streams = EventStreams(EventHub(), MemoryJournal(), clock, keepAlive=15)
        request = _Request([b"events"])
        streams.stream(request, None)
        clock.advance(14)
        self.assertNotIn(b": keep-alive\n\n", b"".join(request.written))
        clock.advance(1)
        self.assertEqual(b"".join(request.written).count(b": keep-alive\n\n"), 1)
        clock.advance(15)
        clock.advance(15)
        self.assertEqual(b"".join(request.written).count(b": keep-alive\n\n"), 3)

    def test_pausedStreamBuffersThenOverflows(self) -> None:
        """
        While the connection is paused, events wait (up to the cap) and are
        sent on resume; past the cap, one overflow event ends the stream.
        """
        hub = EventHub()
        streams = EventStreams(hub, MemoryJournal(), Clock(), maxBuffered=3)
        request = _Request([b"events"])
        ended = streams.stream(request, None)
        stream = next(iter(streams._streams))
        stream.pauseProducing()
        for n in (1, 2, 3):
            hub.publish(Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}))
        self.assertNotIn(b"id: 1\n", b"".join(request.written))
        stream.resumeProducing()
        self.assertIn(b"id: 3\n", b"".join(request.written))
        stream.pauseProducing()
        for n in (4, 5, 6, 7):
            hub.publish(Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}))
        written = b"".join(request.written)
        self.assertNotIn(b"id: 4\n", written)
        self.assertTrue(written.endswith(b"\n\n"))
        self.assertIn(b"event: overflow\n", written)
        self.assertEqual(streams.openCount(), 0)
        self.assertEqual(hub.subscriberCount(), 0)
        # The route's answer ends: Klein finishes the request.
        self.assertEqual(self.successResultOf(ended), b"")

    def test_catchingUpIsNotOverflow(self) -> None:
        """
        A stream replaying from the event log is not cut off when more live
        events arrive meanwhile than it may buffer: it reads them from the
        log too, and goes live once a read finds the log's end with none
        dropped, each event once, in order.
        """
        log = [Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}) for n in range(1, 8)]
        reads: list[tuple[int, Deferred[list[Event]]]] = []

        class Journal:
            def eventsSince(self, after: int, session: Any, limit: int) -> Deferred[list[Event]]:
                reads.append((after, Deferred()))
                return reads[-1][1]

        hub = EventHub()
        streams = EventStreams(hub, Journal(), Clock(), maxBuffered=3)  # type: ignore[arg-type]
        request = _Request([b"events"])
        request.requestHeaders.setRawHeaders(b"last-event-id", [b"0"])
        streams.stream(request, None)
        # The first read's snapshot holds events 1 and 2; 1 to 5 are
        # published while it runs, more than the stream buffers.
        for event in log[:5]:
            hub.publish(event)
        reads[0][1].callback(log[:2])
        # So it reads again, after 2; 6 is published meanwhile.
        self.assertEqual([after for after, _ in reads], [0, 2])
        hub.publish(log[5])
        reads[1][1].callback(log[2:6])
        hub.publish(log[6])
        written = b"".join(request.written).decode()
        self.assertEqual(
            [int(line[4:]) for line in written.splitlines() if line.startswith("id: ")],
            [1, 2, 3, 4, 5, 6, 7],
        )
        self.assertNotIn("overflow", written)
        self.assertEqual(len(reads), 2)

    def test_replayOfLongEventsHoldsLittle(self) -> None:
        """
        A replay of long events to a reader slower than the store holds
        about one event in the connection's buffer, not a read's worth
        (500 of them were read and written at once): it stops writing when
        the connection pauses it and reads on from there once resumed, and
        reads long events a few at a time.  Each event arrives once, in
        order.
        """
        text = "\u00e9" * 50_000  # 300 KB once escaped as JSON
        log = [Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {"text": text})
               for n in range(1, 201)]
        asked: list[int] = []

        class Journal:
            def eventsSince(self, after: int, session: Any, limit: int) -> Deferred[list[Event]]:
                asked.append(limit)
                return succeed([e for e in log if e.id > after][:limit])

        streams = EventStreams(EventHub(), Journal(), Clock())  # type: ignore[arg-type]
        request = _Request([b"events"])
        request.requestHeaders.setRawHeaders(b"last-event-id", [b"0"])
        # A transport that pauses its producer above 64 KB not yet sent.
        unsent: list[bytes] = []

        def write(data: bytes) -> None:
            unsent.append(data)
            if sum(map(len, unsent)) > 64 * 1024:
                request.producer.pauseProducing()

        request.write = write  # type: ignore[method-assign]
        streams.stream(request, None)
        received: list[bytes] = []
        most = 0
        while unsent:
            most = max(most, sum(map(len, unsent)))
            received += unsent
            unsent.clear()
            request.producer.resumeProducing()
        ids = [int(line[4:]) for line in b"".join(received).decode().splitlines()
               if line.startswith("id: ")]
        self.assertEqual(ids, list(range(1, 201)))
        self.assertLess(most, 400 * 1024)
        self.assertEqual(asked[0], 10)
        self.assertLessEqual(max(asked[1:]), 4)

    def replaying(self, maxBuffered: int) -> tuple[Any, list[Any], EventHub, Clock]:
        """
        A stream replaying from event 0 (each read of the log waits to be
        answered), its request, the reads asked for, its hub and clock.
        """
        reads: list[tuple[int, Deferred[list[Event]]]] = []

        class Journal:
            def eventsSince(self, after: int, session: Any, limit: int) -> Deferred[list[Event]]:
                reads.append((after, Deferred()))
                return reads[-1][1]

        hub, clock = EventHub(), Clock()
        streams = EventStreams(hub, Journal(), clock, maxBuffered=maxBuffered)  # type: ignore[arg-type]
        request = _Request([b"events"])
        request.requestHeaders.setRawHeaders(b"last-event-id", [b"0"])
        streams.stream(request, None)
        return request, reads, hub, clock

    def test_oneReplayReadAtATime(self) -> None:
        """
        A stream paused and resumed while a replay's read is under way does
        not start another (whose start would hide what was dropped during
        the first): it reads on once the first is answered.
        """
        log = [Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}) for n in range(1, 7)]
        request, reads, hub, _ = self.replaying(maxBuffered=3)
        for event in log[:5]:
            hub.publish(event)
        request.producer.pauseProducing()
        request.producer.resumeProducing()
        self.assertEqual(len(reads), 1)
        hub.publish(log[5])
        reads[0][1].callback([])
        reads[1][1].callback(log)
        written = b"".join(request.written).decode()
        self.assertEqual(
            [int(line[4:]) for line in written.splitlines() if line.startswith("id: ")],
            [1, 2, 3, 4, 5, 6],
        )

    def test_replayingReaderThatTakesNothingIsDropped(self) -> None:
        """
        A replaying stream whose reader takes nothing (its connection stays
        paused) while live events keep coming is dropped with an overflow
        once REPLAY_STALL seconds have passed, as a slow live reader is;
        before that, it only drops what it buffered.
        """
        from chatweb.web._events import REPLAY_STALL

        request, reads, hub, clock = self.replaying(maxBuffered=10)
        request.producer.pauseProducing()
        for n in range(1, 50):
            hub.publish(Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}))
        # Events were dropped during the read: the replay goes on once the
        # reader takes what was sent.
        reads[0][1].callback([])
        for n in range(50, 100):
            hub.publish(Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}))
        self.assertNotIn(b"overflow", b"".join(request.written))
        clock.advance(REPLAY_STALL)
        for n in range(100, 112):
            hub.publish(Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}))
        self.assertIn(b"event: overflow\n", b"".join(request.written))
        self.assertEqual(hub.subscriberCount(), 0)

    def test_idNewerThanAnyEventStillGetsNewEvents(self) -> None:
        """
        A client that reconnects with an id from another store (restored
        from a backup, or made anew) gets the events published from then on
        instead of waiting forever.
        """
        hub = EventHub()
        streams = EventStreams(hub, MemoryJournal(), Clock())
        request = _Request([b"events"])
        request.requestHeaders.setRawHeaders(b"last-event-id", [b"1000000"])
        streams.stream(request, None)
        for n in (1, 2):
            hub.publish(Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}))
        written = b"".join(request.written)
        self.assertIn(b"id: 1\n", written)
        self.assertIn(b"id: 2\n", written)

    def test_droppedReaderThatReadsNothingIsCut(self) -> None:
        """
        A stream dropped for overflow closes its connection once what is
        buffered is sent; a reader that reads nothing never takes it, so
        its connection is cut after ABORT_AFTER seconds.
        """
        from chatweb.web._events import ABORT_AFTER

        class Transport:
            aborted = 0

            def abortConnection(self) -> None:
                self.aborted += 1

        class Channel:
            closing = 0

            def __init__(self) -> None:
                self.transport = Transport()

            def loseConnection(self) -> None:
                self.closing += 1

        clock, hub = Clock(), EventHub()
        streams = EventStreams(hub, MemoryJournal(), clock, maxBuffered=1)
        request = _Request([b"events"])
        request.channel = channel = Channel()
        streams.stream(request, None)
        stream = next(iter(streams._streams))
        stream.pauseProducing()
        for n in (1, 2):
            hub.publish(Event(n, EventKind.MESSAGE_QUEUED, "s", 0.0, {}))
        self.assertEqual((channel.closing, channel.transport.aborted), (1, 0))
        clock.advance(ABORT_AFTER - 1)
        self.assertEqual(channel.transport.aborted, 0)
        clock.advance(1)
        self.assertEqual(channel.transport.aborted, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_format(self) -> None:
        event = Event(7, EventKind.MESSAGE_ADDED, "a/b", 1.5, {"text": "x\ny"})
        self.assertEqual(
            formatEvent(event),
            b'id: 7\nevent: message.added\ndata: {"id":7,"kind":"message.added",'
            b'"session":"a/b","time":1.5,"data":{"text":"x\\ny"}}\n\n',
        )


class HealthTests(TestCase):
    async def test_healthzWithoutTheKey(self) -> None:
        """
        GET /healthz needs no key and says only that the service is ok;
        while it stops, 503 "stopping".
        """
        chatweb = await startChatWeb(self)
        response = await chatweb.client.get(chatweb.url + "/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.json(), {"status": "ok"})
        chatweb.service._stopped = True
        response = await chatweb.client.get(chatweb.url + "/healthz")
        self.assertEqual(response.code, 503)
        self.assertEqual(await response.json(), {"status": "stopping"})
        chatweb.service._stopped = False
        # Nothing else comes in without the key.
        response = await chatweb.client.get(chatweb.url + "/healthz/x")
        self.assertEqual(response.code, 401)
        await response.content()

    def test_startingUntilReady(self) -> None:
        from chatweb.service import ChatWebService

        from twisted.internet.testing import MemoryReactorClock

        # A reactor of its own: the real one would keep this never-started
        # service's thread pool alive after the tests.
        service = ChatWebService(
            ["k"], self.mktemp(), endpoint=None, reactor=MemoryReactorClock()
        )
        self.assertEqual(service._health(), "starting")
