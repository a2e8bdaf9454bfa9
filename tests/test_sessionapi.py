"""
chat.nvim's session API (chatweb/web/_sessionapi.py): reading sessions,
managing them, stopping a delivery, ids with reserved characters in paths.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import attrs
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from chatweb.interfaces import IResponder, ISessionManager
from chatweb.model import Message, Session
from chatweb.queue import MessageQueue
from chatweb.testing import MemoryAdapter, MemoryJournal
from chatweb.web._api import ChatWebAPI

KEY = "session-api-key"
AUTH = {"X-API-Key": KEY}
#: Ids with reserved characters, written percent-encoded in paths.
AWKWARD_IDS = [
    # Ends in what looks like the events stream once Twisted decodes %2F.
    "x/events",
    "a/b",
    "a%b",
    "a b",
    "sessión/ü",
    "x?y#z",
    "2024-01-15-10-30-00",
]


@implementer(ISessionManager)
class ManagedMemoryAdapter(MemoryAdapter):
    """
    A L{MemoryAdapter} that also manages its sessions.
    """

    def createSession(self, **metadata: Any) -> Deferred[str]:
        base = "2024-01-15-10-30-00"
        sessionId, n = base, 1
        while sessionId in self.sessions:
            n += 1
            sessionId = f"{base}-{n}"
        self.sessions[sessionId] = Session(id=sessionId, **metadata)
        return succeed(sessionId)

    def deleteSession(self, sessionId: str) -> Deferred[bool]:
        return succeed(self.sessions.pop(sessionId, None) is not None)

    def clearSession(self, sessionId: str) -> Deferred[bool]:
        if sessionId not in self.sessions:
            return succeed(False)
        self.sessions[sessionId] = attrs.evolve(
            self.sessions[sessionId], messages=(), usage=None, cleared_at=1700000000
        )
        return succeed(True)

    def deleteMessage(self, sessionId: str, index: int) -> Deferred[bool]:
        session = self.sessions.get(sessionId)
        if session is None:
            return succeed(False)
        if not 0 <= index < len(session.messages):
            raise IndexError(index)
        messages = list(session.messages)
        del messages[index]
        self.sessions[sessionId] = attrs.evolve(session, messages=tuple(messages))
        return succeed(True)

    def updateSession(self, sessionId: str, field: str, value: Any) -> Deferred[bool]:
        session = self.sessions.get(sessionId)
        if session is None:
            return succeed(False)
        self.sessions[sessionId] = attrs.evolve(session, **{field: value})
        return succeed(True)


def path(sessionId: str) -> str:
    return quote(sessionId, safe="")


class SessionAPITestCase(SynchronousTestCase):
    adapterClass: type = ManagedMemoryAdapter

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.journal = MemoryJournal(now=self.clock.seconds)
        self.adapter = self.adapterClass()
        self.queue = MessageQueue(self.journal, self.adapter, self.clock)
        self.successResultOf(self.queue.start())
        self.addCleanup(self.stopQueue)
        self.api = ChatWebAPI(self.queue, self.adapter, [KEY], clock=self.clock)
        self.treq = StubTreq(self.api.resource())

    def stopQueue(self) -> None:
        stopped = self.queue.stop(timeout=10)
        self.clock.advance(10)
        self.successResultOf(stopped)

    def request(self, method: str, url: str, headers: Any = AUTH, **kwargs: Any) -> Any:
        response = self.successResultOf(
            self.treq.request(  # type: ignore[attr-defined]
                method, "http://127.0.0.1" + url, headers=headers, **kwargs
            )
        )
        body = self.successResultOf(response.content())
        return response, body

    def json(self, method: str, url: str, code: int = 200, **kwargs: Any) -> Any:
        response, body = self.request(method, url, **kwargs)
        self.assertEqual(response.code, code, body)
        return json.loads(body)

    def post(self, session: str, content: str) -> Any:
        response, body = self.request(
            "POST", "/", data=json.dumps({"session": session, "content": content}).encode()
        )
        self.assertEqual(response.code, 204, body)
        return response

    def assertError(self, method: str, url: str, code: int, *words: str, **kwargs: Any) -> None:
        response, body = self.request(method, url, **kwargs)
        self.assertEqual(response.code, code, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        error = json.loads(body)
        self.assertEqual(list(error), ["error"])
        for word in words:
            self.assertIn(word, error["error"])


class ReadTests(SessionAPITestCase):
    def test_detailOfAwkwardIds(self) -> None:
        """
        GET /sessions/{id} finds sessions whose ids hold /, %, spaces and
        non-ASCII letters, written percent-encoded.
        """
        for sessionId in AWKWARD_IDS:
            self.post(sessionId, "x" * 150)
            detail = self.json("GET", "/sessions/" + path(sessionId))
            self.assertEqual(detail["id"], sessionId)
            self.assertEqual(detail["message_count"], 1)
            self.assertEqual(detail["title"], "x" * 50)
            self.assertEqual(
                detail["last_message"],
                {"role": "user", "content": "x" * 100, "created": 1700000000},
            )
            self.assertEqual(detail["in_progress"], False)
            self.assertIsNone(detail["cleared_at"])
            self.assertEqual(
                sorted(detail),
                sorted(
                    ["id", "title", "cwd", "provider", "model", "pin", "in_progress",
                     "message_count", "last_message", "cleared_at"]
                ),
            )

    def test_mountedBelowAPath(self) -> None:
        """
        Mounted at /chat/ in an embedder's tree, ids in paths still work.
        """
        from twisted.web.resource import Resource

        root = Resource()
        root.putChild(b"chat", self.api.resource())
        self.treq = StubTreq(root)
        response, body = self.request(
            "POST", "/chat/", data=json.dumps({"session": "a/b", "content": "hi"}).encode()
        )
        self.assertEqual(response.code, 204, body)
        self.assertEqual(self.json("GET", "/chat/sessions/a%2Fb")["id"], "a/b")
        self.assertEqual(self.json("GET", "/chat/sessions/a%2Fb/raw")["id"], "a/b")

    def test_rawOfAwkwardId(self) -> None:
        self.post("a/b", "hello")
        raw = self.json("GET", "/sessions/a%2Fb/raw")
        self.assertEqual(raw["id"], "a/b")
        self.assertEqual([m["content"] for m in raw["messages"]], ["hello"])

    def test_unknownAndBadIds(self) -> None:
        self.assertError("GET", "/sessions/nope", 404, "nope")
        self.assertError("GET", "/sessions/a%2Fb/raw", 404)
        self.assertError("GET", "/sessions/%FF", 400, "UTF-8")
        # A malformed escape is refused, not taken literally as "%ZZ".
        self.assertError("GET", "/sessions/%ZZ", 400, "percent-escape")
        self.assertError("POST", "/session/a%2/stop", 400, "percent-escape")
        self.assertError("GET", "/sessions/a/b/c", 404)
        self.assertEqual(self.request("HEAD", "/sessions/x")[0].code, 404)

    def test_keyNeeded(self) -> None:
        self.post("s", "hello")
        for method, url in [
            ("GET", "/sessions/s"),
            ("GET", "/sessions/s/raw"),
            ("GET", "/sessions?detail=1"),
            ("GET", "/messages?session=s"),
            ("GET", "/providers"),
            ("POST", "/session/new"),
            ("DELETE", "/session/s"),
            ("POST", "/session/s/stop"),
            ("PUT", "/session/s/title"),
        ]:
            response, _ = self.request(method, url, headers={})
            self.assertEqual(response.code, 401, (method, url))

    def test_detailPages(self) -> None:
        """
        GET /sessions?detail=1 pages detail objects with limit and the
        cursor named by X-Next-Cursor; plain GET /sessions stays ids.
        """
        for n in range(5):
            self.post(f"s/{n}", "hi")
        self.assertEqual(self.json("GET", "/sessions"), [f"s/{n}" for n in range(5)])
        seen = []
        url = "/sessions?detail=1&limit=2"
        while True:
            response, body = self.request("GET", url)
            self.assertEqual(response.code, 200)
            page = json.loads(body)
            self.assertLessEqual(len(page), 2)
            seen += [d["id"] for d in page]
            cursor = response.headers.getRawHeaders("x-next-cursor")
            if not cursor:
                break
            url = "/sessions?detail=1&limit=2&cursor=" + cursor[0]
        self.assertEqual(seen, [f"s/{n}" for n in range(5)])
        self.assertError("GET", "/sessions?detail=1&limit=0", 400, "limit")
        self.assertError("GET", "/sessions?detail=1&limit=x", 400,
                         "query parameter 'limit' must be a whole number")
        self.assertError("GET", "/sessions?detail=1&limit=" + "1" * 40, 400,
                         "query parameter 'limit' must be 1 to")
        self.assertError("GET", "/sessions?detail=1&cursor=%21%21", 400, "cursor")

    def test_messagesSince(self) -> None:
        for word in ["one", "two", "three"]:
            self.post("a/b", word)
        messages = self.json("GET", "/messages?session=a%2Fb")
        self.assertEqual([m["content"] for m in messages], ["one", "two", "three"])
        messages = self.json("GET", "/messages?session=a%2Fb&since=2")
        self.assertEqual([m["content"] for m in messages], ["two", "three"])
        self.assertEqual(self.json("GET", "/messages?session=a%2Fb&since=9"), [])
        self.assertError("GET", "/messages", 400, "session")
        self.assertError("GET", "/messages?session=a%2Fb&since=-1", 400, "since")
        # A number too large is said to be one, however long it is.
        for large in ("9" * 19, "9" * 5000):
            self.assertError(
                "GET", f"/messages?session=a%2Fb&since={large}", 400,
                "query parameter 'since' must be 0 to 4611686018427387904")
        self.assertEqual(self.json("GET", "/messages?session=a%2Fb&since=" + "0" * 30 + "3"),
                         self.json("GET", "/messages?session=a%2Fb&since=3"))
        self.assertError("GET", "/messages?session=nope", 404)

    def test_providers(self) -> None:
        """
        The memory adapter has no responder: no providers.
        """
        self.assertEqual(self.json("GET", "/providers"), [])

    def test_postGivesMessageId(self) -> None:
        """
        POST / names the stored message in X-Message-Id.
        """
        first = self.post("s", "one").headers.getRawHeaders("x-message-id")
        second = self.post("s", "two").headers.getRawHeaders("x-message-id")
        self.assertEqual(len(first), 1)
        self.assertGreater(int(second[0]), int(first[0]))


class ManageTests(SessionAPITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.adapter.sessions["a/b"] = Session(
            id="a/b",
            messages=(
                Message(role="user", content="q", created=1),
                Message(role="assistant", content="a", created=2),
                Message(role="user", content="again", created=3),
            ),
        )

    def test_new(self) -> None:
        detail = self.json(
            "POST", "/session/new", data=json.dumps({"provider": "p", "model": "m"}).encode()
        )
        self.assertEqual(detail["provider"], "p")
        self.assertEqual(detail["model"], "m")
        self.assertEqual(detail["message_count"], 0)
        self.assertIsNone(detail["last_message"])
        other = self.json("POST", "/session/new")
        self.assertNotEqual(other["id"], detail["id"])
        self.assertError("POST", "/session/new", 400, "provider", data=b'{"provider": 1}')
        self.assertError("POST", "/session/new", 400, data=b"[]")

    def test_delete(self) -> None:
        response, _ = self.request("DELETE", "/session/a%2Fb")
        self.assertEqual(response.code, 204)
        self.assertNotIn("a/b", self.adapter.sessions)
        self.assertError("DELETE", "/session/a%2Fb", 404)

    def test_busyRefused(self) -> None:
        self.adapter.setBusy("a/b")
        self.assertError("DELETE", "/session/a%2Fb", 409, "in progress")
        self.assertError("POST", "/session/a%2Fb/clear", 409)
        self.assertError("POST", "/session/a%2Fb/retry", 409)
        self.assertError("DELETE", "/session/a%2Fb/messages/1", 409)
        self.assertEqual(len(self.adapter.sessions["a/b"].messages), 3)

    def test_clear(self) -> None:
        response, _ = self.request("POST", "/session/a%2Fb/clear")
        self.assertEqual(response.code, 204)
        detail = self.json("GET", "/sessions/a%2Fb")
        self.assertEqual(detail["message_count"], 0)
        self.assertEqual(detail["cleared_at"], 1700000000)
        self.assertError("POST", "/session/nope/clear", 404)

    def test_deleteMessage(self) -> None:
        response, _ = self.request("DELETE", "/session/a%2Fb/messages/2")
        self.assertEqual(response.code, 204)
        self.assertEqual(self.adapter.contents("a/b"), ["q", "again"])
        for bad in ["0", "3", "x", "-1", "%D9%A1"]:
            self.assertError("DELETE", "/session/a%2Fb/messages/" + bad, 400, "message")
        self.assertError("DELETE", "/session/nope/messages/1", 404)

    def test_put(self) -> None:
        for field, value in [
            ("title", "T"), ("pin", True), ("provider", "p"), ("model", "m"), ("cwd", "/w"),
        ]:
            response, body = self.request(
                "PUT", f"/session/a%2Fb/{field}", data=json.dumps({field: value}).encode()
            )
            self.assertEqual(response.code, 204, body)
            self.assertEqual(self.json("GET", "/sessions/a%2Fb")[field], value)
        self.assertError("PUT", "/session/a%2Fb/pin", 400, "pin", data=b'{"pin": "yes"}')
        self.assertError("PUT", "/session/a%2Fb/title", 400, "title", data=b'{}')
        self.assertError("PUT", "/session/a%2Fb/model", 400, data=b'{"model": ""}')
        self.assertError("PUT", "/session/a%2Fb/title", 400, data=b'not json')
        self.assertError("PUT", "/session/nope/title", 404, data=b'{"title": "x"}')
        self.assertError("PUT", "/session/a%2Fb/colour", 404, data=b'{"colour": "x"}')

    def test_retry(self) -> None:
        """
        POST /session/{id}/retry delivers the last user message again; the
        session ends with it once.
        """
        response, _ = self.request("POST", "/session/a%2Fb/retry")
        self.assertEqual(response.code, 204)
        self.assertEqual(self.adapter.contents("a/b"), ["q", "a", "again"])
        self.assertEqual(self.adapter.delivered[-1].content, "again")
        self.assertTrue(response.headers.getRawHeaders("x-message-id"))
        self.adapter.sessions["a/b"] = attrs.evolve(
            self.adapter.sessions["a/b"],
            messages=self.adapter.sessions["a/b"].messages[:2],
        )
        self.assertError("POST", "/session/a%2Fb/retry", 400, "nothing to retry")
        self.assertError("POST", "/session/nope/retry", 404)

    def test_retryAfterAStopOrAnError(self) -> None:
        """
        As chat.nvim's "Press r to retry": after a stop (its answer cut
        short) or an error record, the last user message is delivered
        again; what followed it leaves the session with it.  After a
        complete answer, there is nothing to retry.
        """
        stopped = [
            Message(role="user", content="q", created=1),
            Message(role="assistant", content="the part that arrived", created=2),
            Message(error="Request cancelled by user. Press r to retry.", created=3),
        ]
        failed = [
            Message(role="user", content="q", created=1),
            Message(error="API Error (401): Incorrect API key provided", created=2),
        ]
        for messages in (stopped, failed):
            self.adapter.sessions["s"] = Session(id="s", messages=tuple(messages))
            response, _ = self.request("POST", "/session/s/retry")
            self.assertEqual(response.code, 204)
            self.assertEqual(self.adapter.contents("s"), ["q"])
            self.assertEqual(self.adapter.delivered[-1].content, "q")
        self.adapter.sessions["s"] = Session(id="s", messages=(
            Message(role="user", content="q", created=1),
            Message(role="assistant", content="a whole answer", created=2),
            Message(on_complete=True, created=3),
            Message(error="a later error", created=4),
        ))
        self.assertError("POST", "/session/s/retry", 400, "nothing to retry")


class StopTests(SessionAPITestCase):
    def test_stopEndsDeliveryWithoutRetry(self) -> None:
        """
        POST /session/{id}/stop cancels the delivery in flight: the session
        is idle at once, the message counts as delivered, nothing is
        retried.
        """
        self.adapter.autoComplete = False
        self.adapter.sessions["a/b"] = Session(id="a/b")
        self.post("a/b", "long job")
        self.assertEqual(len(self.adapter.waiting), 1)
        self.assertTrue(self.json("GET", "/sessions/a%2Fb")["in_progress"])
        response, body = self.request("POST", "/session/a%2Fb/stop")
        self.assertEqual(response.code, 204, body)
        self.assertEqual([d.content for d in self.adapter.cancelled], ["long job"])
        self.assertFalse(self.json("GET", "/sessions/a%2Fb")["in_progress"])
        self.clock.advance(3600)
        self.assertEqual(len(self.adapter.delivered), 1)
        self.assertEqual(self.successResultOf(self.journal.messages("a/b")), [])

    def test_stopEndsTheRetriesOfAFailedMessage(self) -> None:
        """
        A stop while the session's message waits to be retried after a
        failure (nothing in flight) ends its retries, as chat.nvim's stop
        cancels its pending retry: it is discarded, and the session's next
        message is delivered at once.
        """
        self.adapter.failures = 1
        first = self.post("s", "fails once").headers.getRawHeaders("x-message-id")[0]
        self.post("s", "next")
        self.assertEqual(self.json("GET", f"/queue/{first}")["state"], "pending")
        self.assertEqual([d.content for d in self.adapter.delivered], ["fails once"])
        response, body = self.request("POST", "/session/s/stop")
        self.assertEqual(response.code, 204, body)
        self.assertEqual(self.json("GET", f"/queue/{first}")["state"], "discarded")
        self.assertEqual([d.content for d in self.adapter.delivered], ["fails once", "next"])
        self.clock.advance(3600)
        self.assertEqual([d.content for d in self.adapter.delivered], ["fails once", "next"])

    def test_retryWhileAMessageWaitsIsRefused(self) -> None:
        """
        A retry while the session's message waits for its own retry (after
        a failure) would ask it twice: a 409, as chat.nvim's retry during
        its auto-retry; once the wait is stopped, a retry asks it again.
        """
        # (As the local backend has it: the message in the session.)
        self.adapter.sessions["s"] = Session(
            id="s", messages=(Message(role="user", content="fails once"),))
        self.adapter.failures = 1
        first = self.post("s", "fails once").headers.getRawHeaders("x-message-id")[0]
        self.assertError("POST", "/session/s/retry", 409, f"message {first} first")
        self.assertEqual(self.json("GET", f"/queue/{first}")["state"], "pending")
        self.request("POST", "/session/s/stop")
        response, body = self.request("POST", "/session/s/retry")
        self.assertEqual(response.code, 204, body)
        self.assertEqual([d.content for d in self.adapter.delivered], ["fails once", "fails once"])
        self.clock.advance(3600)
        self.assertEqual(len(self.adapter.delivered), 2)

    def test_stopIdleAndUnknown(self) -> None:
        self.post("s", "done")
        response, _ = self.request("POST", "/session/s/stop")
        self.assertEqual(response.code, 204)
        self.assertError("POST", "/session/nope/stop", 404)


class QueueStatusTests(SessionAPITestCase):
    def messageId(self, session: str, content: str) -> str:
        header = self.post(session, content).headers.getRawHeaders("x-message-id")
        return str(header[0])

    def test_lifecycle(self) -> None:
        """
        GET /queue/{id} follows a message from X-Message-Id: delivering,
        then delivered, with the times of each step.
        """
        self.adapter.autoComplete = False
        first = self.messageId("a/b", "one")
        second = self.messageId("a/b", "two")
        status = self.json("GET", f"/queue/{first}")
        self.assertEqual((status["state"], status["session"]), ("delivering", "a/b"))
        self.assertEqual(self.json("GET", f"/queue/{second}")["state"], "pending")
        self.clock.advance(7)
        self.adapter.complete()
        status = self.json("GET", f"/queue/{first}")
        self.assertEqual(status["state"], "delivered")
        self.assertEqual(status["times"]["received"], 1700000000)
        self.assertEqual(status["times"]["delivered"], 1700000007)
        self.assertEqual(status["updated"], 1700000007)
        response, _ = self.request("DELETE", f"/queue/{second}")
        self.assertEqual(self.json("GET", f"/queue/{second}")["state"], "delivering")

    def test_failedAndDiscarded(self) -> None:
        self.adapter.failures = 1
        first = self.messageId("s", "one")
        status = self.json("GET", f"/queue/{first}")
        self.assertEqual(status["state"], "pending")
        self.assertEqual(status["attempts"], 1)
        self.assertIn("failed", status["last_error"])
        self.assertIn("failed", status["times"])
        response, _ = self.request("DELETE", f"/queue/{first}")
        self.assertEqual(response.code, 204)
        self.assertEqual(self.json("GET", f"/queue/{first}")["state"], "discarded")

    def test_unknown(self) -> None:
        self.assertError("GET", "/queue/99", 404, "99")
        self.assertError("GET", "/queue/99999999999999999999999", 404)
        self.assertError("GET", "/queue/x", 404)


class WithoutManagerTests(SessionAPITestCase):
    adapterClass = MemoryAdapter

    def test_501(self) -> None:
        """
        An adapter without ISessionManager: the management routes say so
        with a 501; reads and stop still work.
        """
        self.post("s", "hi")
        for method, url, data in [
            ("POST", "/session/new", b""),
            ("DELETE", "/session/s", b""),
            ("POST", "/session/s/clear", b""),
            ("POST", "/session/s/retry", b""),
            ("DELETE", "/session/s/messages/1", b""),
            ("PUT", "/session/s/title", b'{"title": "t"}'),
        ]:
            self.assertError(method, url, 501, "ISessionManager", data=data)
        self.assertEqual(self.json("GET", "/sessions/s")["message_count"], 1)


class LocalBackendTests(TestCase):
    """
    Over a real port, with the local backend and the echo responder; the
    requests are chat.nvim's documented curl examples.
    """

    async def test_longMessagesEncodedOffTheReactor(self) -> None:
        """
        GET /messages of long messages (more than a page's worth of
        characters) encodes them on a thread, not the reactor's, into the
        same JSON; C{since} still counts from the first.
        """
        import threading

        import chatweb.web._sessionapi as sessionapi
        from chatweb.testing import startChatWeb

        onReactor: list[bool] = []
        encode = sessionapi._messagesJSON

        def recorded(messages: Any) -> bytes:
            onReactor.append(threading.current_thread() is threading.main_thread())
            return encode(messages)

        self.patch(sessionapi, "_messagesJSON", recorded)
        chatweb = await startChatWeb(self)
        contents = ["\u00e9\"\n" * 40_000 + str(n) for n in range(3)]
        for content in contents:
            await (await chatweb.post("long", content)).content()
        await chatweb.service.queue.whenDelivered()
        response = await chatweb.get("/messages?session=long")
        body = await response.content()
        messages = json.loads(body)
        self.assertEqual([m["content"] for m in messages], contents)
        self.assertEqual(body, json.dumps(messages, ensure_ascii=False).encode("utf-8"))
        response = await chatweb.get("/messages?session=long&since=2")
        self.assertEqual([m["content"] for m in json.loads(await response.content())],
                         contents[1:])
        self.assertEqual(onReactor, [False, False])

    async def test_chatNvimExamples(self) -> None:
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        from chatweb.testing import startChatWeb

        chatweb = await startChatWeb(self, responder="echo")
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = treq.client.HTTPClient(treq.api.Agent(reactor, pool=pool))
        base = chatweb.url
        headers = chatweb.headers

        async def call(method: str, url: str, body: Any = None) -> Any:
            data = None if body is None else json.dumps(body).encode()
            response = await client.request(
                method, base + url, headers=headers, data=data
            )
            return response, await response.content()

        for sessionId in ["2024-01-15-10-30-00", "ci/job 1"]:
            response, _ = await call("POST", "/", {"session": sessionId, "content": "hello"})
            self.assertEqual(response.code, 204)
            messageId = response.headers.getRawHeaders("x-message-id")[0]
            self.assertTrue(messageId.isdigit())
            await chatweb.service.queue.whenDelivered()
            response, body = await call("GET", f"/queue/{messageId}")
            self.assertEqual(json.loads(body)["state"], "delivered")
            encoded = path(sessionId)
            response, body = await call("GET", f"/sessions/{encoded}")
            self.assertEqual(response.code, 200, body)
            detail = json.loads(body)
            self.assertEqual(detail["message_count"], 2)
            self.assertEqual(detail["last_message"]["role"], "assistant")
            response, body = await call("GET", f"/messages?session={encoded}&since=2")
            self.assertEqual([m["role"] for m in json.loads(body)], ["assistant"])
            response, body = await call("GET", f"/sessions/{encoded}/raw")
            self.assertEqual(json.loads(body)["id"], sessionId)
            for field, value in [
                ("provider", "anthropic"), ("model", "claude"), ("cwd", "/tmp"),
                ("pin", True), ("title", "Debugging"),
            ]:
                response, body = await call("PUT", f"/session/{encoded}/{field}", {field: value})
                self.assertEqual(response.code, 204, body)
            response, body = await call("GET", f"/sessions/{encoded}")
            detail = json.loads(body)
            self.assertEqual(
                (detail["provider"], detail["model"], detail["cwd"], detail["pin"], detail["title"]),
                ("anthropic", "claude", "/tmp", True, "Debugging"),
            )
            response, body = await call("DELETE", f"/session/{encoded}/messages/2")
            self.assertEqual(response.code, 204, body)
            response, body = await call("POST", f"/session/{encoded}/retry")
            self.assertEqual(response.code, 204, body)
            await chatweb.service.queue.whenDelivered()
            response, body = await call("GET", f"/messages?session={encoded}")
            self.assertEqual(
                [m["role"] for m in json.loads(body)], ["user", "assistant"]
            )
            response, body = await call("POST", f"/session/{encoded}/stop")
            self.assertEqual(response.code, 204, body)
            response, body = await call("POST", f"/session/{encoded}/clear")
            self.assertEqual(response.code, 204, body)
            response, body = await call("GET", f"/sessions/{encoded}")
            detail = json.loads(body)
            self.assertEqual(detail["message_count"], 0)
            self.assertIsNotNone(detail["cleared_at"])
            response, body = await call("DELETE", f"/session/{encoded}")
            self.assertEqual(response.code, 204, body)
            response, body = await call("GET", f"/sessions/{encoded}")
            self.assertEqual(response.code, 404, body)

        response, body = await call("POST", "/session/new", {"provider": "openai", "model": "gpt-4o"})
        self.assertEqual(response.code, 200, body)
        first = json.loads(body)
        self.assertRegex(first["id"], r"^\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d")
        self.assertEqual((first["provider"], first["model"]), ("openai", "gpt-4o"))
        response, body = await call("POST", "/session/new")
        self.assertNotEqual(json.loads(body)["id"], first["id"])
        response, body = await call("GET", "/providers")
        self.assertEqual(json.loads(body), [{"name": "echo", "models": ["echo"]}])
        events = await chatweb.service.journal.eventsSince(0)
        kinds = {e.kind.value for e in events}
        for kind in ["session.created", "session.changed", "session.cleared", "session.deleted"]:
            self.assertIn(kind, kinds)


@implementer(IResponder)
class HangingResponder:
    """
    A responder that never answers (until cancelled); C{called} fires when
    it is asked.
    """

    name = "hanging"
    answers = True

    def __init__(self) -> None:
        self.called: Deferred[None] = Deferred()
        self.cancelled = 0

    def respond(self, session: Session, message: Message) -> Deferred[list[Message]]:
        def cancel(d: Deferred[list[Message]]) -> None:
            self.cancelled += 1

        answer: Deferred[list[Message]] = Deferred(cancel)
        if not self.called.called:
            self.called.callback(None)
        return answer


class LocalStopTests(TestCase):
    async def test_stopInFlight(self) -> None:
        """
        With the local backend, POST /session/{id}/stop ends an answer in
        flight: the session is idle when the 204 comes, the message counts
        as delivered and is not delivered again.
        """
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        from chatweb.testing import startChatWeb

        responder = HangingResponder()
        chatweb = await startChatWeb(self, responder=responder)
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = treq.client.HTTPClient(treq.api.Agent(reactor, pool=pool))

        async def call(method: str, url: str) -> Any:
            response = await client.request(method, chatweb.url + url, headers=chatweb.headers)
            return response, await response.content()

        response = await chatweb.post("ci/job", "think hard")
        messageId = response.headers.getRawHeaders("x-message-id")[0]
        await responder.called
        response, body = await call("GET", "/sessions/ci%2Fjob")
        self.assertTrue(json.loads(body)["in_progress"])
        response, body = await call("POST", "/session/ci%2Fjob/stop")
        self.assertEqual(response.code, 204, body)
        self.assertEqual(responder.cancelled, 1)
        response, body = await call("GET", "/sessions/ci%2Fjob")
        self.assertFalse(json.loads(body)["in_progress"])
        response, body = await call("GET", f"/queue/{messageId}")
        self.assertEqual(json.loads(body)["state"], "delivered")
        response, body = await call("GET", "/messages?session=ci%2Fjob")
        self.assertEqual([m["content"] for m in json.loads(body)], ["think hard"])
