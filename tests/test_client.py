"""
chatweb.client: the calls, their typed results and errors, retries on the
clock, and event streams parsed across chunk boundaries and resumed with
Last-Event-ID.
"""

from __future__ import annotations

import json
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import NOT_DONE_YET, Site
from treq.client import HTTPClient

from chatweb.client import (
    BadRequest,
    ChatWebClient,
    ChatWebError,
    Throttled,
    Unauthorized,
    UnknownMessage,
    UnknownSession,
    Unreachable,
)
from chatweb._sse import SSEDecoder, SSEvent
from chatweb.testing import chatWebInMemory, startChatWeb

STREAM = (
    "retry: 2000\r\n\r\n"
    ": keep-alive\n\n"
    'id: 1\nevent: message.added\ndata: {"text": "caf\u00e9 \u2713"}\n\n'
    "id: 2\r\nevent: delivery.done\r\ndata: line one\r\ndata: line two\r\n\r\n"
    "id: 3\revent: x\rdata:no space\r\r"
).encode("utf-8")
EXPECTED = [
    SSEvent(event="message.added", data='{"text": "caf\u00e9 \u2713"}', id="1"),
    SSEvent(event="delivery.done", data="line one\nline two", id="2"),
    SSEvent(event="x", data="no space", id="3"),
]


def _parse(chunks: list[bytes]) -> list[SSEvent]:
    parser = SSEDecoder(errors="replace")
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


class ParserTests(SynchronousTestCase):
    def test_whole(self) -> None:
        parser = SSEDecoder(errors="replace")
        self.assertEqual(parser.feed(STREAM), EXPECTED)
        self.assertEqual(parser.retry, 2000)

    def test_byteByByte(self) -> None:
        # Splits inside CRLF pairs and inside UTF-8 characters included.
        self.assertEqual(_parse([STREAM[i : i + 1] for i in range(len(STREAM))]), EXPECTED)

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.lists(st.integers(0, len(STREAM)), max_size=12))
    def test_anySplit(self, cuts: list[int]) -> None:
        points = [0, *sorted(cuts), len(STREAM)]
        chunks = [STREAM[a:b] for a, b in zip(points, points[1:])]
        self.assertEqual(_parse(chunks), EXPECTED)

    def test_incompleteEventWaits(self) -> None:
        parser = SSEDecoder(errors="replace")
        self.assertEqual(parser.feed(b"id: 7\ndata: x\n"), [])
        self.assertEqual(parser.feed(b"\n"), [SSEvent(event="message", data="x", id="7")])


class _Flaky(Resource):
    """
    Answers the first C{failures} requests with C{code} and Retry-After, then
    204; records each request's Idempotency-Key.
    """

    isLeaf = True

    def __init__(self, failures: int, code: int = 503, retryAfter: bytes | None = b"7") -> None:
        super().__init__()
        self.failures = failures
        self.code = code
        self.retryAfter = retryAfter
        self.keys: list[bytes] = []

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        self.keys.append(request.getHeader(b"idempotency-key"))
        if self.failures:
            self.failures -= 1
            request.setResponseCode(self.code)
            if self.retryAfter is not None:
                request.setHeader(b"Retry-After", self.retryAfter)
            return b'{"error": "busy; retry later"}'
        request.setResponseCode(204)
        request.setHeader(b"X-Message-Id", b"42")
        return b""


class RetryTests(SynchronousTestCase):
    def client(self, resource: Resource, **kwargs) -> tuple[ChatWebClient, Clock]:  # type: ignore[no-untyped-def]
        clock = Clock()
        http = StubTreq(resource)
        return ChatWebClient("http://127.0.0.1", "k", http=http, clock=clock, timeout=None, **kwargs), clock

    def test_retriesHonourRetryAfterWithTheSameKey(self) -> None:
        resource = _Flaky(2)
        client, clock = self.client(resource)
        d = Deferred.fromCoroutine(client.send("ci", "hello"))
        self.assertNoResult(d)
        self.assertEqual(len(resource.keys), 1)
        clock.advance(6.9)
        self.assertEqual(len(resource.keys), 1)
        clock.advance(0.1)
        self.assertEqual(len(resource.keys), 2)
        clock.advance(7)
        sent = self.successResultOf(d)
        self.assertEqual(sent.messageId, 42)
        self.assertEqual(len(set(resource.keys)), 1)
        self.assertEqual(resource.keys[0], sent.idempotencyKey.encode())

    def test_eachSendHasItsOwnKey(self) -> None:
        resource = _Flaky(0)
        client, _ = self.client(resource)
        self.successResultOf(Deferred.fromCoroutine(client.send("ci", "a")))
        self.successResultOf(Deferred.fromCoroutine(client.send("ci", "a")))
        self.assertEqual(len(set(resource.keys)), 2)

    def test_givesUpAfterRetries(self) -> None:
        resource = _Flaky(10, code=429, retryAfter=None)
        client, clock = self.client(resource, retries=2)
        d = Deferred.fromCoroutine(client.send("ci", "hello"))
        clock.advance(1)  # no Retry-After: 1 s, then 2 s
        clock.advance(2)
        error = self.failureResultOf(d, Throttled).value
        self.assertEqual((error.code, error.message), (429, "busy; retry later"))
        self.assertEqual(len(resource.keys), 3)

    def test_refusedConnectionRetried(self) -> None:
        """
        A server that refuses the connection (not up yet, restarting) is
        asked again after 0.5 s, then 1 s, 2 s, with the same key; after
        the last, the client says it cannot reach it.
        """
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        resource = _Flaky(0)
        stub = StubTreq(resource)

        class Refusing:
            refusals = 2

            def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                if self.refusals:
                    self.refusals -= 1
                    return fail(ConnectionRefusedError())
                return stub.request(*args, **kwargs)

        clock = Clock()
        client = ChatWebClient("http://127.0.0.1", "k", http=Refusing(), clock=clock, timeout=None)
        d = Deferred.fromCoroutine(client.send("ci", "hello"))
        clock.advance(0.5)
        self.assertNoResult(d)
        clock.advance(1)
        self.assertEqual(self.successResultOf(d).messageId, 42)
        self.assertEqual(len(resource.keys), 1)

        always = Refusing()
        always.refusals = 10
        client = ChatWebClient("http://127.0.0.1", "k", http=always, clock=clock, timeout=None)
        d = Deferred.fromCoroutine(client.sessions())
        for wait in (0.5, 1, 2):
            clock.advance(wait)
        self.assertIn("cannot reach chatweb", str(self.failureResultOf(d, Unreachable).value))
        self.assertEqual(always.refusals, 10 - 4)

    def test_retryWaitIsCapped(self) -> None:
        resource = _Flaky(1, retryAfter=b"86400")
        client, clock = self.client(resource, maxRetryWait=10)
        d = Deferred.fromCoroutine(client.send("ci", "hello"))
        clock.advance(10)
        self.successResultOf(d)


class CallTests(SynchronousTestCase):
    """
    Every call against chatweb's real routes, in memory.
    """

    def setUp(self) -> None:
        self.chatweb = chatWebInMemory(self, shareSecret=bytes(32))
        self.client = self.chatweb.client
        self.run = self.chatweb.run

    def test_sendAndRead(self) -> None:
        sent = self.run(self.client.send("ci/nightly", "hello"))
        self.assertEqual(self.chatweb.adapter.contents("ci/nightly"), ["hello"])
        self.assertEqual(self.run(self.client.sessions()), ["ci/nightly"])
        detail = self.run(self.client.session("ci/nightly"))
        self.assertEqual((detail.id, detail.messageCount, detail.title), ("ci/nightly", 1, "hello"))
        messages = self.run(self.client.messages("ci/nightly"))
        self.assertEqual([(m.role, m.content) for m in messages], [("user", "hello")])
        status = self.run(self.client.status(sent.messageId))
        self.assertEqual((status.session, status.state), ("ci/nightly", "delivered"))
        link = self.run(self.client.share("ci/nightly", expiresIn=60))
        self.assertTrue(link.url.startswith("http://127.0.0.1/session?id=ci%2Fnightly&token="))
        self.assertEqual(link.expires, self.chatweb.clock.seconds() + 60)

    def test_typedErrors(self) -> None:
        with self.assertRaises(UnknownSession):
            self.run(self.client.session("nope"))
        with self.assertRaises(UnknownSession):
            self.run(self.client.messages("nope"))
        with self.assertRaises(UnknownMessage):
            self.run(self.client.status(999))
        with self.assertRaises(BadRequest) as caught:
            self.run(self.client.send("", "x"))
        self.assertIn("session", caught.exception.message)
        wrong = ChatWebClient("http://127.0.0.1", "wrong", http=self.chatweb.stub, timeout=None)
        with self.assertRaises(Unauthorized) as refused:
            self.run(wrong.sessions())
        self.assertEqual(refused.exception.code, 401)
        self.assertNotIn("wrong", str(refused.exception))
        self.assertNotIn("wrong", repr(wrong))


class RealServerTests(TestCase):
    async def test_unreachable(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        client = ChatWebClient(f"http://127.0.0.1:{port}", "k")
        with self.assertRaises(Unreachable) as caught:
            await client.send("ci", "x")
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))
        await client.close()

    async def test_askWaitsForTheAnswer(self) -> None:
        chatweb = await startChatWeb(self, responder="echo")
        answer = await chatweb.api.ask("ci/nightly", "hello there")
        self.assertEqual(answer.texts, ("hello there",))
        status = await chatweb.api.status(answer.sent.messageId)
        self.assertEqual(status.state, "delivered")

    async def test_askWithAnIdempotencyKeyQueuesOnce(self) -> None:
        """
        Asked again with the same idempotency key (a CI job run again), the
        message is not queued again: the first answer comes back.  Once its
        events are no longer kept, that is said, rather than waited for.
        """
        import time

        chatweb = await startChatWeb(self, responder="echo")
        first = await chatweb.api.ask("ci", "hello", idempotencyKey="job-41")
        again = await chatweb.api.ask("ci", "hello", idempotencyKey="job-41")
        self.assertEqual((again.sent.messageId, again.texts), (first.sent.messageId, ("hello",)))
        self.assertEqual(
            [m.content for m in await chatweb.api.messages("ci")], ["hello", "hello"])
        await chatweb.service.journal.pruneEvents(time.time() + 1)
        with self.assertRaises(ChatWebError) as raised:
            await chatweb.api.ask("ci", "hello", idempotencyKey="job-41")
        self.assertEqual(
            str(raised.exception),
            f"message {first.sent.messageId} was sent before with this idempotency key and is"
            " delivered; its events are no longer kept (the session's messages still are)",
        )

    async def test_eventsOfASession(self) -> None:
        chatweb = await startChatWeb(self)
        async with chatweb.api.events("ci") as stream:
            await stream.connect()
            await chatweb.api.send("other", "not this one")
            await chatweb.api.send("ci", "this one")
            kinds = []
            async for event in stream:
                self.assertEqual(event.session, "ci")
                kinds.append(event.kind)
                if event.kind == "delivery.done":
                    break
        self.assertEqual(kinds[0], "message.queued")
        self.assertIn("message.added", kinds)


    async def test_eventsOfMegabytes(self) -> None:
        """
        An event holds a whole message, and a model's answer may run to
        megabytes: one of 5 MB is read; one longer than the client reads
        is a one-line L{ChatWebError}, not an error of its parser.
        """
        from chatweb.client import _client
        from chatweb.limits import Limits

        big = 5_000_000
        chatweb = await startChatWeb(
            self, responder="echo", limits=Limits(maxBodySize=big + 100, maxContentLength=big))
        async with chatweb.api.events("ci") as stream:
            await stream.connect()
            await chatweb.api.send("ci", "é" * (big // 2))
            async for event in stream:
                if event.kind == "message.added":
                    self.assertEqual(len(event.data["message"]["content"]), big // 2)
                    break
        self.patch(_client, "EVENT_LINE_LIMIT", 1000)
        async with chatweb.api.events("ci", lastEventId=0) as stream:
            with self.assertRaises(ChatWebError) as raised:
                async for event in stream:
                    pass
        self.assertEqual(
            str(raised.exception),
            "chatweb's event stream cannot be read: a line of the stream is longer than"
            " 1000 characters",
        )


class _Resuming(Resource):
    """
    An event stream that ends after each event (split across two writes);
    records each request's Last-Event-ID.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.lastEventIds: list[bytes | None] = []

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        last = request.getHeader(b"last-event-id")
        self.lastEventIds.append(last)
        n = int(last or 0) + 1
        request.setHeader(b"content-type", b"text/event-stream")
        event = json.dumps({"id": n, "kind": "k", "session": "s", "time": 0, "data": {}})
        text = f"retry: 10\n\nid: {n}\nevent: k\ndata: {event}\n\n".encode()
        request.write(text[:20])
        reactor.callLater(0.01, lambda: (request.write(text[20:]), request.finish()))
        return NOT_DONE_YET


class ResumeTests(TestCase):
    async def test_reconnectsWithLastEventId(self) -> None:
        resource = _Resuming()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        client = ChatWebClient(f"http://127.0.0.1:{port.getHost().port}", "k", http=http)
        ids = []
        async with client.events("s", lastEventId=4) as stream:
            async for event in stream:
                ids.append(event.id)
                if len(ids) == 3:
                    break
        self.assertEqual(ids, [5, 6, 7])
        self.assertEqual(resource.lastEventIds, [b"4", b"5", b"6"])
        self.assertEqual(stream.reconnects, 2)

    async def test_neverGivesUpWhenAskedNotTo(self) -> None:
        """
        With C{maxFailedReconnects = None} (as C{chatweb follow} has it), a
        stream waits out a server that is down for longer than any number
        of reconnections, and resumes where it was.
        """
        resource = _Resuming()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        number = port.getHost().port
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        clock = Clock()
        client = ChatWebClient(f"http://127.0.0.1:{number}", "k", http=http, clock=clock)
        stream = client.events("s", lastEventId=4)
        stream.maxFailedReconnects = None
        self.addCleanup(stream.close)
        self.assertEqual((await stream.__anext__()).id, 5)
        await port.stopListening()
        following = Deferred.fromCoroutine(stream.__anext__())
        # Five minutes of failed reconnections: each is refused, or has no
        # answer within the client's 30 s (on its clock).
        for _ in range(600):
            clock.advance(0.5)
            await deferLater(reactor, 0.002, lambda: None)
        self.assertFalse(following.called)
        port = reactor.listenTCP(number, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        while not following.called:
            clock.advance(0.25)
            await deferLater(reactor, 0.002, lambda: None)
        self.assertEqual((await following).id, 6)

    async def test_closeEndsTheWaitForAReconnection(self) -> None:
        """
        Closing a stream that waits to reconnect (Ctrl-C in C{chatweb
        follow} while the server is down) ends its iteration at once.
        """
        resource = _Resuming()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        clock = Clock()
        client = ChatWebClient(f"http://127.0.0.1:{port.getHost().port}", "k", http=http,
                               clock=clock)
        stream = client.events("s", lastEventId=4)
        stream.maxFailedReconnects = None
        self.assertEqual((await stream.__anext__()).id, 5)
        await port.stopListening()
        following = Deferred.fromCoroutine(stream.__anext__())
        for _ in range(20):
            await deferLater(reactor, 0.002, lambda: None)
        self.assertFalse(following.called)
        stream.close()
        with self.assertRaises(StopAsyncIteration):
            await following


class IPv6Tests(TestCase):
    async def test_serverAtAnIPv6Address(self) -> None:
        """
        A server named by an IPv6 address (C{http://[::1]:PORT}, as
        C{--host ::1} serves) is reached: treq alone cannot take such a URL.
        The server sees the Host the URL names; share links keep it.
        """
        from chatweb.service import ChatWebService

        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            raise SkipTest("no IPv6 loopback here")
        service = ChatWebService(
            ["k" * 16], os.path.abspath(self.mktemp()), endpoint=r"tcp6:0:interface=\:\:1",
            responder="echo",
        )
        service.startService()
        self.addCleanup(service.stopService)
        port = (await service.listening).getHost().port
        await service.ready
        client = ChatWebClient(f"http://[::1]:{port}", "k" * 16)
        self.addCleanup(client.close)
        answer = await client.ask("v6", "hello")
        self.assertEqual(answer.texts, ("hello",))
        self.assertEqual(await client.sessions(), ["v6"])
        link = await client.share("v6")
        self.assertTrue(link.url.startswith(f"http://[::1]:{port}/session?id=v6&token="), link.url)

    async def test_hostHeaderIsTheURLs(self) -> None:
        """
        A request to an IPv6 address carries the Host its URL names (a
        proxy there may route by it), not the client's stand-in name.
        """
        hosts: list[bytes | None] = []

        class Sessions(Resource):
            isLeaf = True

            def render_GET(self, request):  # type: ignore[no-untyped-def]
                hosts.append(request.getHeader(b"host"))
                request.setHeader(b"content-type", b"application/json")
                return b"[]"

        try:
            port = reactor.listenTCP(0, Site(Sessions()), interface="::1")
        except Exception:
            raise SkipTest("no IPv6 loopback here")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        client = ChatWebClient(f"http://[::1]:{number}/", "k")
        self.addCleanup(client.close)
        self.assertEqual(await client.sessions(), [])
        self.assertEqual(hosts, [f"[::1]:{number}".encode()])


class NotChatwebTests(TestCase):
    async def test_answerOfAnotherServer(self) -> None:
        """
        An error page that is not chatweb's (its mount path left out of the
        URL, say) is said in a line: its title and what to check, not the
        HTML.
        """
        from twisted.web.pages import notFound

        port = reactor.listenTCP(0, Site(notFound()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = ChatWebClient(f"http://127.0.0.1:{port.getHost().port}", "k")
        self.addCleanup(client.close)
        with self.assertRaises(ChatWebError) as raised:
            await client.sessions()
        self.assertEqual(
            str(raised.exception),
            "404: 404 - No Such Resource (not chatweb's answer: is the URL chatweb's, with"
            " the path it is mounted at?)",
        )
