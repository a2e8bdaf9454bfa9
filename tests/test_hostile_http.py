"""
Malformed and hostile HTTP over a raw socket: every one gets a 4xx (in JSON
where chatweb writes it) or a clean close, never a hang or a 500, and the
server keeps answering.
"""

from __future__ import annotations

import json
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from chatweb.limits import Limits
from chatweb.testing import startChatWeb

KEY = b"test-api-key"


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """
    Send C{data}, read until the server closes; return what came back and
    how long the server took to close.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks), time.monotonic() - started


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def jsonError(answer: bytes) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), head
    return json.loads(body)["error"]


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY + b"\r\n" + extra
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


class HostileHTTPTests(TestCase):
    async def startServer(self, **kwargs: object) -> int:
        self.chatweb = await startChatWeb(self, **kwargs)
        return int(self.chatweb.url.rsplit(":", 1)[1])

    async def stillAnswers(self) -> None:
        response = await self.chatweb.get("/sessions")
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_malformedRequestsGet400(self) -> None:
        port = await self.startServer()
        cases = [
            b"GARBAGE\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ]
        for request in cases:
            # With the key, so that only the malformation is refused.
            request = request.replace(b"\r\n", b"\r\nX-API-Key: " + KEY + b"\r\n", 1)
            answer, _ = await deferToThread(exchange, port, request)
            self.assertEqual(status(answer), 400, (request, answer))
            self.assertIn("malformed", jsonError(answer))
        await self.stillAnswers()

    async def test_bodyWithoutKeyRefusedBeforeItIsSent(self) -> None:
        """
        A client without a valid key gets its 401 as soon as its headers
        are in: its body is never read.
        """
        port = await self.startServer()
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        answer, _ = await deferToThread(exchange, port, request)
        self.assertEqual(status(answer), 401, answer)
        self.assertIn(b"Connection: close", answer)
        chunked = b"POST / HTTP/1.1\r\nX-API-Key: wrong\r\nTransfer-Encoding: chunked\r\n\r\n"
        answer, _ = await deferToThread(exchange, port, chunked)
        self.assertEqual(status(answer), 401, answer)

    async def test_connectionLimit(self) -> None:
        port = await self.startServer(limits=Limits(maxConnections=5))
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        self.addCleanup(lambda: [s.close() for s in held])
        answer, took = await deferToThread(exchange, port, b"GET /sessions HTTP/1.1\r\n\r\n")
        self.assertEqual(answer, b"")
        for s in held:
            s.close()
        held.clear()
        for _ in range(50):
            if self.chatweb.service.site.openConnections == 0:
                break
            await deferToThread(time.sleep, 0.05)
        await self.stillAnswers()

    async def test_headersAndURLTooLarge(self) -> None:
        port = await self.startServer()
        longURL = b"GET /sessions?" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"
        manyHeaders = b"GET /sessions HTTP/1.1\r\n" + b"".join(
            b"X-H-%d: %s\r\n" % (n, b"v" * 100) for n in range(200)
        ) + b"\r\n"
        for request in (longURL, manyHeaders):
            answer, _ = await deferToThread(exchange, port, request)
            self.assertEqual(status(answer), 431, answer[:200])
            self.assertIn("exceed", jsonError(answer))
        await self.stillAnswers()

    async def test_tooManyHeaderFields(self) -> None:
        """
        More header fields than twisted.web takes get a 431 that says so
        (Twisted's own answer is a bare 400), on any route.
        """
        port = await self.startServer()
        many = b"".join(b"X-H-%d: v\r\n" % (n,) for n in range(501))
        for request in (b"GET /sessions HTTP/1.1\r\n" + many + b"\r\n",
                        post(b'{"session": "ci", "content": "x"}', many)):
            answer, _ = await deferToThread(exchange, port, request)
            self.assertEqual(status(answer), 431, answer[:200])
            self.assertEqual(jsonError(answer), "the request has more than 500 header fields")
        # Continuation lines belong to their field.
        folded = b"X-Folded: a\r\n" + b" b\r\n" * 600
        answer, _ = await deferToThread(
            exchange, port, b"GET /sessions HTTP/1.1\r\nConnection: close\r\nX-API-Key: "
            + KEY + b"\r\n" + folded + b"\r\n")
        self.assertEqual(status(answer), 200, answer[:200])
        await self.stillAnswers()

    async def test_bareLineFeedsRefusedAtOnce(self) -> None:
        """
        A request whose lines end with a bare LF (C{printf ... | nc}) gets a
        400 that says so at once, not a 408 once the deadline passes; a
        body may hold bare LFs, and a CRLF split over two reads is one.
        """
        port = await self.startServer(limits=Limits(requestTimeout=60))
        key = b"X-API-Key: " + KEY
        body = b'{\n  "session": "ci",\n  "content": "pretty"\n}\n'
        for request in (
            b"GET /sessions HTTP/1.1\n" + key + b"\n\n",
            b"GET /sessions HTTP/1.1\r\nHost: x\n" + key + b"\r\n\r\n",
            b"POST / HTTP/1.1\n" + key + b"\nContent-Length: %d\n\n" % len(body) + body,
        ):
            answer, _ = await deferToThread(exchange, port, request, 5.0)
            self.assertEqual(status(answer), 400, (request, answer))
            self.assertIn("not a bare LF", jsonError(answer))
        for path in (b"/", b"/sessions/ci/messages"):
            request = post(body, b"Connection: close\r\n").replace(b"/ ", path + b" ", 1)
            answer, _ = await deferToThread(exchange, port, request, 5.0)
            self.assertEqual(status(answer), 204, answer)

        def split() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /sessions HTTP/1.1\r")
                time.sleep(0.2)
                s.sendall(b"\n" + key + b"\r\nConnection: close\r\n\r\n")
                return b"".join(iter(lambda: s.recv(65536), b""))

        answer = await deferToThread(split)
        self.assertEqual(status(answer), 200, answer)
        self.assertIn(b'["ci"]', answer)

    async def test_compressedBodyRefused(self) -> None:
        """
        A body with a Content-Encoding chatweb does not decode (gzip, say)
        gets a 415 before it is read, not "not valid UTF-8", and nothing is
        stored; "identity" is no encoding.
        """
        import gzip

        port = await self.startServer()
        body = json.dumps({"session": "ci", "content": "compressed"}).encode()
        for extra, path in (
            (b"Content-Encoding: gzip\r\n", b"/"),
            (b"Content-Encoding: identity, gzip\r\n", b"/"),
            (b"Content-Encoding: GZIP\r\n", b"/sessions/ci/messages"),
        ):
            # Whatever the body is: one that says gzip and is not is
            # refused as well.
            for sent in (gzip.compress(body), body):
                request = post(sent, extra).replace(b"POST / ", b"POST %s " % path)
                answer, _ = await deferToThread(exchange, port, request)
                self.assertEqual(status(answer), 415, answer[:300])
                self.assertIn(b"\r\nAccept-Encoding: identity\r\n", answer)
                self.assertIn("send the body uncompressed", jsonError(answer))
                self.assertIn("gzip", jsonError(answer).lower())
        sessions = await self.chatweb.get("/sessions")
        self.assertEqual(await sessions.json(), [])
        answer, _ = await deferToThread(
            exchange, port, post(body, b"Content-Encoding: IDENTITY\r\nConnection: close\r\n"))
        self.assertEqual(status(answer), 204, answer)
        sessions = await self.chatweb.get("/sessions")
        self.assertEqual(await sessions.json(), ["ci"])

    async def test_chunkedAndPipelinedRequestsWork(self) -> None:
        port = await self.startServer()
        body = json.dumps({"session": "ci", "content": "chunked"}).encode()
        chunked = (
            b"POST / HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        pipelined = (
            post(json.dumps({"session": "ci", "content": "one"}).encode())
            + post(json.dumps({"session": "ci", "content": "two"}).encode())
            + b"GET /sessions HTTP/1.1\r\nX-API-Key: " + KEY + b"\r\nConnection: close\r\n\r\n"
        )
        answer, _ = await deferToThread(exchange, port, chunked + pipelined)
        self.assertEqual(answer.count(b"HTTP/1.1 204 "), 3, answer)
        self.assertIn(b'["ci"]', answer)
        await self.chatweb.service.queue.whenDelivered()
        session = await self.chatweb.service.adapter.getSession("ci")
        self.assertEqual([m.content for m in session.messages], ["chunked", "one", "two"])

    async def test_nothingRunForAClientGone(self) -> None:
        """
        A request pipelined behind an event stream waits for the stream's
        end; if that end is the client hanging up, it is not run (a POST
        was stored, its 204 sent nowhere).
        """
        port = await self.startServer()
        stream = (b"GET /sessions/ci/events HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY
                  + b"\r\n\r\n")
        behind = post(json.dumps({"session": "ci", "content": "behind"}).encode())
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(stream + behind)
        for _ in range(100):
            if self.chatweb.service.api.live.openCount():
                break
            await deferLater(reactor, 0.01, lambda: None)
        s.close()
        for _ in range(100):
            if not self.chatweb.service.api.live.openCount():
                break
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertIsNone(await self.chatweb.service.adapter.getSession("ci"))
        await self.stillAnswers()

    async def test_tooManyChunksRefused(self) -> None:
        """
        A body in more chunks than MAX_BODY_CHUNKS is a 400 once past it
        (Twisted parses each chunk in Python); one in a few hundred is
        stored.
        """
        from chatweb.web._site import MAX_BODY_CHUNKS

        port = await self.startServer()
        head = (b"POST / HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n")

        def chunked(body: bytes, size: int) -> bytes:
            pieces = [body[i:i + size] for i in range(0, len(body), size)]
            return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"

        few = json.dumps({"session": "ci", "content": "x" * 3000}).encode()
        answer, _ = await deferToThread(exchange, port, chunked(few, 10)
                                        + b"GET /sessions HTTP/1.1\r\nX-API-Key: " + KEY
                                        + b"\r\nConnection: close\r\n\r\n")
        self.assertEqual(status(answer), 204, answer[:300])
        many = json.dumps({"session": "cj", "content": "x" * MAX_BODY_CHUNKS}).encode()
        answer, _ = await deferToThread(exchange, port, chunked(many, 1))
        self.assertEqual(status(answer), 400, answer[:300])
        self.assertIn(f"more than {MAX_BODY_CHUNKS} chunks", jsonError(answer))
        await self.stillAnswers()
        self.assertIsNone(await self.chatweb.service.adapter.getSession("cj"))

    async def test_largeAnswersWrittenInPieces(self) -> None:
        """
        An answer over LARGE_ANSWER goes to the connection a piece at a
        time as it takes them (Twisted's transport would join it into one
        string on the reactor's thread), whole and in order, on a
        keep-alive connection that answers the next request after it.
        """
        from chatweb.web import _site

        pieces: list[int] = []
        writePiece = _site.LimitedRequest._writePiece

        def recorded(request: _site.LimitedRequest, data: bytes) -> None:
            pieces.append(len(data))
            writePiece(request, data)

        self.patch(_site.LimitedRequest, "_writePiece", recorded)
        port = await self.startServer()
        contents = ["\u00e9" * 100_000 + str(n) for n in range(8)]  # 1.6 MB of answer
        for content in contents:
            response = await self.chatweb.post("big", content)
            self.assertEqual(response.code, 204)
            await response.content()
        await self.chatweb.service.queue.whenDelivered()
        get = b"GET /messages?session=big HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n\r\n"
        last = (b"GET /sessions HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY
                + b"\r\nConnection: close\r\n\r\n")
        answer, _ = await deferToThread(exchange, port, get + last)
        first, _, rest = answer.partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", first)
        body = b""
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            body, rest = body + rest[:n], rest[n + 2:]
        self.assertEqual([m["content"] for m in json.loads(body)], contents)
        self.assertIn(b'["big"]', rest)
        self.assertGreater(len(pieces), 1)
        self.assertLessEqual(max(pieces), _site.ANSWER_PIECE)
        self.assertEqual(sum(pieces), len(body))

    def test_piecesKeepTheOrderOfWritesAfterThem(self) -> None:
        """
        What is written while a large answer goes out in pieces follows
        it, in order, and the request finishes only after the last piece.
        """
        from chatweb.web._site import ANSWER_PIECE, _InPieces

        class Request:
            written: list[bytes] = []
            finished: list[bool] = []

            def _writePiece(self, data: bytes) -> None:
                self.written.append(data)
                if len(self.written) % 3 == 0:
                    producer.pauseProducing()  # as a full transport does

            def _piecesWritten(self, finish: bool) -> None:
                self.finished.append(finish)

        request = Request()
        first = bytes(range(256)) * (ANSWER_PIECE // 64)
        producer = _InPieces(request, first)  # type: ignore[arg-type]
        producer.add(b"after")
        producer.add(b"-and-after")
        producer.finishWhenWritten = True
        while not request.finished:
            producer.resumeProducing()
        self.assertEqual(b"".join(request.written), first + b"after-and-after")
        self.assertEqual(request.finished, [True])

    async def test_headAndOptionsAre404(self) -> None:
        port = await self.startServer()
        for request in (
            b"HEAD /sessions HTTP/1.1\r\nX-API-Key: " + KEY + b"\r\nConnection: close\r\n\r\n",
            b"OPTIONS / HTTP/1.1\r\nX-API-Key: " + KEY + b"\r\nConnection: close\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nX-API-Key: " + KEY + b"\r\nConnection: close\r\n\r\n",
        ):
            answer, _ = await deferToThread(exchange, port, request)
            self.assertEqual(status(answer), 404, answer)

    async def test_shortBodyTimesOut(self) -> None:
        """
        A Content-Length larger than what is sent gets a 408 once the
        request deadline passes; nothing is stored.
        """
        port = await self.startServer(limits=Limits(requestTimeout=0.5))
        request = post(b'{"session": "ci", "content": "x"}')
        request = request.replace(b"Content-Length: 33", b"Content-Length: 50")
        answer, took = await deferToThread(exchange, port, request)
        self.assertEqual(status(answer), 408, answer)
        self.assertIn("did not arrive", jsonError(answer))
        self.assertEqual(await self.chatweb.service.journal.pending(), [])

    async def test_slowClientsDoNotHoldTheServer(self) -> None:
        """
        50 clients holding half-sent requests: a normal request is answered
        meanwhile, and the slow ones are cut off at the deadline.
        """
        port = await self.startServer(limits=Limits(requestTimeout=1.0))
        slow = []
        for n in range(50):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: ")
            slow.append(s)
        self.addCleanup(lambda: [s.close() for s in slow])
        response = await self.chatweb.post("ci", "through")
        self.assertEqual(response.code, 204)

        def readAll(s: socket.socket) -> bytes:
            s.settimeout(10)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data
                data += chunk

        answers = await gatherResults([deferToThread(readAll, s) for s in slow[:5]])
        for answer in answers:
            self.assertEqual(status(answer), 408)

    async def test_floodOfOversizeRequestsIsRefused(self) -> None:
        port = await self.startServer(limits=Limits(maxBodySize=1024))
        request = post(b"x" * 4096)

        async def one() -> None:
            answer, _ = await deferToThread(exchange, port, request)
            self.assertEqual(status(answer), 413)

        for _ in range(10):
            await gatherResults([Deferred.fromCoroutine(one()) for _ in range(10)])
        await self.stillAnswers()

    async def test_serverHeaderNamesNoVersion(self) -> None:
        import twisted

        port = await self.startServer()
        for request in (
            b"GET /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY
            + b"\r\nConnection: close\r\n\r\n",
            b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            b"HEAD /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        ):
            answer, _ = await deferToThread(exchange, port, request)
            head = answer.partition(b"\r\n\r\n")[0].lower()
            self.assertIn(b"\r\nserver: chatweb\r\n", head)
            self.assertNotIn(twisted.__version__.encode(), head)

    async def test_misdirectedRequestStatusLine(self) -> None:
        port = await self.startServer()
        answer, _ = await deferToThread(
            exchange,
            port,
            b"GET /session?id=ci HTTP/1.1\r\nHost: evil.example\r\nX-API-Key: " + KEY
            + b"\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), answer)

    async def test_emptySegmentsAre404(self) -> None:
        port = await self.startServer()
        for line in (b"GET /session//raw?id=ci", b"POST /session//share", b"GET //"):
            answer, _ = await deferToThread(
                exchange,
                port,
                line + b" HTTP/1.1\r\nHost: attacker.example\r\nX-API-Key: " + KEY
                + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            )
            self.assertEqual(status(answer), 404, answer)
            self.assertNotIn(b"attacker", answer)

    async def test_failedKeysThrottledBeforeBodies(self) -> None:
        """
        Wrong keys on requests with bodies (refused before the body is
        read) count too; a throttled address gets 429 before its body is
        read, even with the right key.
        """
        from chatweb.web._throttle import FAILURE_BURST

        port = await self.startServer()
        wrong = (
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: wrong\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        for _ in range(FAILURE_BURST):
            answer, _ = await deferToThread(exchange, port, wrong)
            self.assertEqual(status(answer), 401, answer)
        answer, _ = await deferToThread(exchange, port, wrong)
        self.assertEqual(status(answer), 429, answer)
        self.assertIn("failed authentications", jsonError(answer))
        answer, _ = await deferToThread(exchange, port, post(b'{"session": "a", "content": "b"}'))
        self.assertEqual(status(answer), 429, answer)


class ListeningLogTests(TestCase):
    async def test_unixSocketLoggedAsAPath(self) -> None:
        import os

        from twisted.logger import formatEvent, globalLogPublisher

        from chatweb.service import ChatWebService

        events: list[str] = []

        def observe(event: dict) -> None:  # type: ignore[type-arg]
            events.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # A short path: AF_UNIX paths are limited to about 100 bytes.
        import shutil
        import tempfile

        socketDir = tempfile.mkdtemp(prefix="cw")
        self.addCleanup(shutil.rmtree, socketDir)
        path = os.path.join(socketDir, "s")
        service = ChatWebService(["test-api-key"], directory, endpoint=f"unix:{path}")
        service.startService()
        self.addCleanup(service.stopService)
        await service.listening
        await service.ready
        self.assertIn(f"chatweb listening on {path}", events)
