"""
The seed's HTTP contract, route by route, over an in-memory queue and
adapter (treq's StubTreq drives the real resource).
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chatweb.web._api import ChatWebAPI
from chatweb.limits import Limits
from chatweb.queue import MessageQueue
from chatweb.testing import MemoryAdapter, MemoryJournal

from .journals import HeldJournal

KEY = "test-key"
AUTH = {"X-API-Key": KEY}


def _depth(value: object) -> int:
    # Iterative, so that the oracle does not depend on the stack either.
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _isValidMessage(document: str) -> bool:
    """
    The rules of POST /, stated independently of chatweb's parser.
    """
    try:
        data = json.loads(document)
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or _depth(data) > 512:
        return False
    session, content = data.get("session"), data.get("content")
    if not isinstance(session, str) or not isinstance(content, str):
        return False
    if not 0 < len(session) <= 256:
        return False
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in session):
        return False
    if any(any(low <= ord(c) <= high for low, high in _INVISIBLE) for c in session):
        return False
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in session + content)


#: The invisible and bidi control characters docs/api.md names, as ranges.
_INVISIBLE = [
    (0x202A, 0x202E), (0x2066, 0x2069), (0x200E, 0x200F), (0x061C, 0x061C),
    (0x200B, 0x200D), (0x2060, 0x2060), (0xFEFF, 0xFEFF), (0x00AD, 0x00AD),
    (0x180E, 0x180E), (0x2028, 0x2029), (0xFFF9, 0xFFFB), (0xFFFE, 0xFFFF),
    (0xE0000, 0xE007F),
]


class APITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.journal = MemoryJournal()
        self.adapter = MemoryAdapter()
        self.queue = MessageQueue(self.journal, self.adapter, self.clock)
        self.successResultOf(self.queue.start())
        self.api = ChatWebAPI(self.queue, self.adapter, [KEY], clock=self.clock)
        self.treq = StubTreq(self.api.resource())

    def request(self, method: str, url: str, headers=AUTH, **kwargs):  # type: ignore[no-untyped-def]
        response = self.successResultOf(
            self.treq.request(method, "http://127.0.0.1" + url, headers=headers, **kwargs)
        )
        body = self.successResultOf(response.content())
        return response, body

    def post(self, payload, headers=AUTH):  # type: ignore[no-untyped-def]
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/", headers=headers, data=data)

    def assertError(self, response, body, code: int, *words: str) -> dict:  # type: ignore[no-untyped-def]
        self.assertEqual(response.code, code, body)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        error = json.loads(body)
        self.assertEqual(list(error), ["error"])
        for word in words:
            self.assertIn(word, error["error"])
        return error


class PostTests(APITestCase):
    def test_postQueuesAndAnswers204(self) -> None:
        response, body = self.post({"session": "ci", "content": "Build completed successfully!"})
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(self.adapter.contents("ci"), ["Build completed successfully!"])

    def test_extraFieldsIgnored(self) -> None:
        response, _ = self.post({"session": "ci", "content": "x", "priority": 9})
        self.assertEqual(response.code, 204)

    def test_headerNameIsCaseInsensitive(self) -> None:
        response, _ = self.post({"session": "ci", "content": "x"}, headers={"x-api-KEY": KEY})
        self.assertEqual(response.code, 204)

    def test_missingOrWrongKey(self) -> None:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-API-Key": KEY + "x"}):
            response, body = self.post({"session": "ci", "content": "x"}, headers=headers)
            self.assertError(response, body, 401, "X-API-Key")
        self.assertEqual(self.journal.rows, {})

    def test_twoKeyHeadersRefused(self) -> None:
        response, body = self.post(
            {"session": "ci", "content": "x"}, headers={"X-API-Key": [KEY, "other"]}
        )
        self.assertError(response, body, 401)

    def test_invalidBodies(self) -> None:
        cases = [
            (b"", "empty"),
            (b"{", "not valid JSON"),
            (b"\xff\xfe", "UTF-8"),
            (b"[1, 2]", "JSON object, not array"),
            (b'"text"', "JSON object, not string"),
            (b"null", "not null"),
            (b'{"content": "x"}', "missing field 'session'"),
            (b'{"session": "ci"}', "missing field 'content'"),
            (b'{"session": 5, "content": "x"}', "'session' must be a string, not number"),
            (b'{"session": "ci", "content": null}', "'content' must be a string, not null"),
            (b'{"session": "ci", "content": ["x"]}', "not array"),
            (b'{"session": "", "content": "x"}', "must not be empty"),
            (b'{"session": "a\\nb", "content": "x"}', "control characters"),
            (b'{"session": "a\\u0000", "content": "x"}', "control characters"),
            (b'{"session": "ci", "content": "\\ud800"}', "not valid Unicode"),
            (json.dumps({"session": "s" * 257, "content": "x"}).encode(), "at most 256"),
            (b"[" * 100000, "nested deeper than 512"),
            (b'{"session": "ci", "content": "x", "d": ' + b"[" * 513 + b"]" * 513 + b"}", "nested deeper"),
            (b'{"session": "ci", "content": "x", "n": ' + b"9" * 5000 + b"}", "not valid JSON"),
            (b'{"session": "ci", "content": "x", "session": "other"}', "names 'session' more than once"),
            (b'{"session": "ci", "content": "x", "d": {"a": 1, "a": 2}}', "names 'a' more than once"),
        ]
        for body, words in cases:
            response, answer = self.post(body)
            self.assertError(response, answer, 400, words)
        self.assertEqual(self.journal.rows, {})

    def test_lookAlikeSessionIdsRefused(self) -> None:
        """
        Bidi controls and zero-width characters would let two different ids
        look the same: refused, as the importer refuses them.
        """
        for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c" \
                 "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u2028\u2029\ufff9\ufffe" \
                 "\U000e0001\U000e0067\U000e007f":
            response, body = self.post({"session": f"ci{c}", "content": "x"})
            self.assertError(response, body, 400, f"(U+{ord(c):04X})")
        self.assertEqual(self.journal.rows, {})

    def test_oversizeBodyRefusedEvenOutsideChatWebSite(self) -> None:
        """
        Mounted in a Site that does not limit bodies, the route still
        refuses one over the limit.
        """
        api = ChatWebAPI(self.queue, self.adapter, [KEY], Limits(maxBodySize=100), self.clock)
        treq = StubTreq(api.resource())
        body = json.dumps({"session": "ci", "content": "x" * 100}).encode()
        response = self.successResultOf(treq.post("http://127.0.0.1/", data=body, headers=AUTH))
        self.assertError(response, self.successResultOf(response.content()), 413, "100 bytes")
        # (As the site's own 413 says: RFC 9110's name.)
        self.assertEqual(response.phrase, b"Content Too Large")
        self.assertEqual(self.journal.rows, {})

    def test_sessionOf256CharactersAccepted(self) -> None:
        response, _ = self.post({"session": "s" * 256, "content": "x"})
        self.assertEqual(response.code, 204)

    def test_unicodeKeptExactly(self) -> None:
        content = "héllo 世界 🎉 \u2028 \x00 <script>"
        response, _ = self.post({"session": "セッション", "content": content})
        self.assertEqual(response.code, 204)
        self.assertEqual(self.adapter.contents("セッション"), [content])

    def test_utf8BomAccepted(self) -> None:
        response, _ = self.post(b'\xef\xbb\xbf{"session": "ci", "content": "x"}')
        self.assertEqual(response.code, 204)

    def test_storageFailureIs503NotLost(self) -> None:
        """
        A message the journal could not store gets a 503, so the client
        knows to send it again: nothing of it is queued or delivered, and
        once storage works the same post is stored and delivered once.
        """
        self.journal.failAppends = True
        response, body = self.post({"session": "ci", "content": "x"})
        self.assertError(response, body, 503, "could not be stored")
        self.flushLoggedErrors(OSError)
        self.assertEqual(
            (self.journal.rows, self.adapter.delivered, self.queue.pendingCount()),
            ({}, [], 0),
        )
        self.journal.failAppends = False
        response, _ = self.post({"session": "ci", "content": "x"})
        self.assertEqual(response.code, 204)
        self.assertEqual(self.adapter.contents("ci"), ["x"])
        self.assertEqual([m.state for m in self.journal.rows.values()], ["delivered"])

    def test_204OnlyOnceStored(self) -> None:
        """
        The 204 waits for the journal: while the append is under way the
        client has no answer, and when it comes the message is stored.
        """
        journal = HeldJournal()
        queue = MessageQueue(journal, self.adapter, self.clock)
        self.successResultOf(queue.start())
        treq = StubTreq(ChatWebAPI(queue, self.adapter, [KEY], clock=self.clock).resource())
        answer = treq.post(
            "http://127.0.0.1/",
            data=json.dumps({"session": "ci", "content": "stored first"}).encode(),
            headers=AUTH,
        )
        treq.flush()
        self.assertNoResult(answer)
        self.assertEqual(journal.rows, {})
        journal.release()
        treq.flush()
        self.assertEqual(self.successResultOf(answer).code, 204)
        self.assertEqual([m.content for m in journal.rows.values()], ["stored first"])

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_anyJSONValueIsA204OrA400(self, data: st.DataObject) -> None:
        """
        Arbitrary JSON documents, deeply nested ones, huge numbers and
        duplicate keys: each gets a 204 exactly when it is a valid message
        (an independent statement of the rules), else a 400; never a 500.
        A name given twice is refused: readers differ on which counts.
        """
        leaves = (
            st.none()
            | st.booleans()
            | st.integers(min_value=-(10**40), max_value=10**40)
            | st.floats(allow_nan=False)
            | st.text()
        )
        value = data.draw(
            st.recursive(
                leaves,
                lambda children: st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=5), children, max_size=4),
                max_leaves=40,
            )
        )
        session = data.draw(st.one_of(st.text(max_size=300), leaves, st.just(value)))
        content = data.draw(st.one_of(st.text(), leaves, st.just(value)))
        depth = data.draw(st.integers(min_value=0, max_value=3000))
        twice = '{"session": 1, "content": %s, "session": %s}' % (
            json.dumps(content), json.dumps(session)
        )
        documents = [
            json.dumps(value),
            json.dumps({"session": session, "content": content}),
            twice,
            '{"session": "ci", "content": "x", "deep": %s%s}' % ("[" * depth, "]" * depth),
            '{"session": "ci", "content": "x", "n": %s}' % ("9" * (depth + 1)),
        ]
        for document in documents:
            expected = 204 if document != twice and _isValidMessage(document) else 400
            response, answer = self.post(document.encode("utf-8", "surrogatepass"))
            self.assertEqual(response.code, expected, (document[:200], answer))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200))
    def test_anyBytesIsA204OrA400(self, payload: bytes) -> None:
        response, _ = self.post(payload)
        self.assertIn(response.code, (204, 400))


class ReadTests(APITestCase):
    def test_listSessions(self) -> None:
        response, body = self.request("GET", "/sessions")
        self.assertEqual((response.code, json.loads(body)), (200, []))
        for session in ("zeta", "alpha", "ci", "alpha"):
            self.post({"session": session, "content": "x"})
        response, body = self.request("GET", "/sessions")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(json.loads(body), ["alpha", "ci", "zeta"])

    def test_listIncludesSessionsStillQueued(self) -> None:
        """
        A session whose first message is accepted but not yet delivered is
        listed and previewed all the same.
        """
        self.adapter.setBusy("later")
        self.post({"session": "later", "content": "waiting <b>here</b>"})
        _, body = self.request("GET", "/sessions")
        self.assertEqual(json.loads(body), ["later"])
        response, page = self.request("GET", "/session?id=later")
        self.assertEqual(response.code, 200)
        self.assertIn(b"waiting &lt;b&gt;here&lt;/b&gt;", page)
        self.assertIn(b"queued", page)

    def test_listMergesQueuedSessionsInOrderOnce(self) -> None:
        """
        The list is sorted and names each session once, whatever order the
        adapter lists its sessions in, with the sessions that only have
        queued messages in their place among them.
        """
        for session in ("zeta", "alpha"):
            self.post({"session": session, "content": "x"})
        for session in ("alpha", "mid"):
            self.adapter.setBusy(session)
            self.post({"session": session, "content": "waiting"})
        _, body = self.request("GET", "/sessions")
        self.assertEqual(json.loads(body), ["alpha", "mid", "zeta"])

    def test_sessionsNeedKey(self) -> None:
        response, body = self.request("GET", "/sessions", headers={})
        self.assertError(response, body, 401)
        response, body = self.request("GET", "/session?id=ci", headers={})
        self.assertError(response, body, 401)

    def test_previewShowsMessagesEscaped(self) -> None:
        self.post({"session": "ci", "content": "<script>alert(1)</script>"})
        self.post({"session": "ci", "content": "second \" ' & done"})
        response, page = self.request("GET", "/session?id=ci")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
        )
        self.assertNotIn(b"<script>", page)
        self.assertIn(b"&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertLess(page.index(b"&lt;script&gt;"), page.index(b"second"))
        self.assertIn(b"2023-11-14 22:13:20 UTC", page)
        for header in ("content-security-policy", "x-content-type-options",
                       "referrer-policy", "cache-control"):
            self.assertTrue(response.headers.hasHeader(header), header)

    def test_previewSessionIdEscaped(self) -> None:
        sessionId = '"><img src=x onerror=alert(1)>'
        self.post({"session": sessionId, "content": "x"})
        response, page = self.request("GET", "/session?id=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
        self.assertEqual(response.code, 200)
        self.assertNotIn(b"<img", page)
        self.assertIn(b"&#34;&gt;&lt;img", page)

    def test_previewErrors(self) -> None:
        response, body = self.request("GET", "/session")
        self.assertError(response, body, 400, "'id'")
        response, body = self.request("GET", "/session?id=")
        self.assertError(response, body, 400, "'id'")
        response, body = self.request("GET", "/session?id=nope")
        self.assertError(response, body, 404, "nope")
        response, body = self.request("GET", "/session?id=%ff")
        self.assertError(response, body, 400, "UTF-8")


class NotFoundTests(APITestCase):
    def test_otherPathsAndMethods(self) -> None:
        cases = [
            ("GET", "/"),
            ("PUT", "/"),
            ("DELETE", "/"),
            ("POST", "/sessions"),
            ("DELETE", "/sessions"),
            ("HEAD", "/sessions"),
            ("OPTIONS", "/sessions"),
            ("PATCH", "/session?id=ci"),
            ("POST", "/session"),
            ("GET", "/sessions/"),
            ("GET", "/nope"),
            ("GET", "/session/ci"),
            ("GET", "/%ff"),
        ]
        for method, path in cases:
            response, body = self.request(method, path)
            if method == "HEAD":
                self.assertEqual(response.code, 404, path)
                continue
            expected = 400 if "%ff" in path else 404
            self.assertError(response, body, expected)

    def test_unauthenticatedUnknownPathIs401(self) -> None:
        response, body = self.request("GET", "/nope", headers={})
        self.assertError(response, body, 401)


class ReliabilityAPITests(APITestCase):
    def test_idempotencyKey(self) -> None:
        headers = dict(AUTH, **{"Idempotency-Key": "job-42"})
        for _ in range(3):
            response, _ = self.post({"session": "ci", "content": "deploy"}, headers=headers)
            self.assertEqual(response.code, 204)
        self.assertEqual(self.adapter.contents("ci"), ["deploy"])
        response, body = self.post({"session": "other", "content": "deploy"}, headers=headers)
        self.assertError(response, body, 422, "another session")
        response, body = self.post({"session": "ci", "content": "changed"}, headers=headers)
        self.assertError(response, body, 422, "other content")
        for bad in ("", "has space", "x" * 256):
            response, body = self.post(
                {"session": "ci", "content": "x"}, headers=dict(AUTH, **{"Idempotency-Key": bad})
            )
            self.assertError(response, body, 400, "Idempotency-Key")

    def test_idempotencyKeysBelongToTheirAPIKey(self) -> None:
        api = ChatWebAPI(self.queue, self.adapter, [KEY, "other-key"], clock=self.clock)
        self.treq = StubTreq(api.resource())
        for key in (KEY, "other-key"):
            response, _ = self.post(
                {"session": "ci", "content": "build-42 done"},
                headers={"X-API-Key": key, "Idempotency-Key": "build-42"},
            )
            self.assertEqual(response.code, 204)
        self.assertEqual(self.adapter.contents("ci"), ["build-42 done", "build-42 done"])

    def test_contentTooLong(self) -> None:
        api = ChatWebAPI(self.queue, self.adapter, [KEY], Limits(maxContentLength=10), self.clock)
        treq = StubTreq(api.resource())
        body = json.dumps({"session": "ci", "content": "x" * 11}).encode()
        response = self.successResultOf(treq.post("http://127.0.0.1/", data=body, headers=AUTH))
        self.assertError(response, self.successResultOf(response.content()), 413, "10 characters")

    def test_queueFullAnswers429Then503WithRetryAfter(self) -> None:
        self.queue = MessageQueue(self.journal, self.adapter, self.clock,
                                  maxPendingPerSession=1, maxPendingTotal=2)
        self.successResultOf(self.queue.start())
        self.treq = StubTreq(ChatWebAPI(self.queue, self.adapter, [KEY], clock=self.clock).resource())
        self.adapter.setBusy("a")
        self.adapter.setBusy("b")
        self.assertEqual(self.post({"session": "a", "content": "1"})[0].code, 204)
        response, body = self.post({"session": "a", "content": "2"})
        self.assertError(response, body, 429, "waiting")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["5"])
        self.assertEqual(self.post({"session": "b", "content": "1"})[0].code, 204)
        response, body = self.post({"session": "c", "content": "1"})
        self.assertError(response, body, 503, "waiting")
        self.assertTrue(response.headers.hasHeader("retry-after"))

    def test_rateLimitPerKey(self) -> None:
        api = ChatWebAPI(self.queue, self.adapter, [KEY, "other"],
                         Limits(rateLimit=1, rateBurst=2), self.clock)
        self.treq = StubTreq(api.resource())
        codes = [self.request("GET", "/sessions")[0].code for _ in range(3)]
        self.assertEqual(codes, [200, 200, 429])
        response, body = self.request("GET", "/sessions")
        self.assertError(response, body, 429, "slow down")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(self.request("GET", "/sessions", headers={"X-API-Key": "other"})[0].code, 200)
        self.clock.advance(1)
        self.assertEqual(self.request("GET", "/sessions")[0].code, 200)

    def test_queueEndpoints(self) -> None:
        self.adapter.failures = 10
        self.post({"session": "ci", "content": "doomed"})
        for _ in range(100):
            self.clock.advance(60)
        self.adapter.setBusy("ci")
        self.post({"session": "ci", "content": "waiting"})
        response, body = self.request("GET", "/queue?session=ci")
        self.assertEqual(response.code, 200)
        listing = json.loads(body)
        self.assertEqual([m["content"] for m in listing["pending"]], ["waiting"])
        self.assertEqual([(m["content"], m["attempts"]) for m in listing["failed"]], [("doomed", 10)])
        self.assertIn("failed", listing["failed"][0]["last_error"])
        failedId = listing["failed"][0]["id"]
        waitingId = listing["pending"][0]["id"]

        response, body = self.request("DELETE", f"/queue/{waitingId}")
        self.assertEqual(response.code, 204)
        response, body = self.request("DELETE", f"/queue/{waitingId}")
        self.assertError(response, body, 409, "discarded")
        self.adapter.setBusy("ci", False)
        response, body = self.request("POST", f"/queue/{failedId}/retry")
        self.assertEqual((response.code, json.loads(body)["state"]), (200, "pending"))
        self.assertEqual(self.adapter.contents("ci"), ["doomed"])
        response, body = self.request("POST", f"/queue/{failedId}/retry")
        self.assertError(response, body, 409, "delivered")
        response, body = self.request("POST", "/queue/999/retry")
        self.assertError(response, body, 404, "999")
        response, body = self.request("GET", "/queue")
        self.assertError(response, body, 400, "'session'")
        response, body = self.request("PUT", "/queue/1")
        self.assertError(response, body, 404)

    def test_deadLettersListedAndShown(self) -> None:
        """
        A session whose only message failed for good is still listed, and
        its page shows the message as failed, with the error.
        """
        self.adapter.failures = 10
        self.post({"session": "lost", "content": "never <delivered>"})
        for _ in range(100):
            self.clock.advance(60)
        _, body = self.request("GET", "/sessions")
        self.assertEqual(json.loads(body), ["lost"])
        response, page = self.request("GET", "/session?id=lost")
        self.assertEqual(response.code, 200)
        self.assertIn(b"never &lt;delivered&gt;", page)
        self.assertIn(b"failed", page)
        self.assertIn(b"delivery of 1 failed", page)

    def test_malformedHostIs400(self) -> None:
        """
        A Host that is not a host name (a label over 63 characters, empty
        labels) gets a JSON 400, not a 500 and not the answer.
        """
        for host in ("a" * 70 + ".com", "..", "a..b"):
            response, body = self.request("GET", "/sessions", headers=dict(AUTH, Host=host))
            self.assertError(response, body, 400, "bad request")


class APIKeysTests(SynchronousTestCase):
    """
    Keys are checked where they enter the API, as twistd checks its own.
    """

    def make(self, keys: object) -> ChatWebAPI:
        journal, adapter = MemoryJournal(), MemoryAdapter()
        queue = MessageQueue(journal, adapter, Clock())
        return ChatWebAPI(queue, adapter, keys, clock=Clock())  # type: ignore[arg-type]

    def test_oneStringIsRefused(self) -> None:
        # Otherwise each of its characters would be a valid key.
        for keys in ("abc", b"abc"):
            with self.assertRaises(TypeError) as raised:
                self.make(keys)
            self.assertIn("apiKeys=[key]", str(raised.exception))

    def test_serviceRefusesOneString(self) -> None:
        import os

        from chatweb.service import ChatWebService

        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        self.assertRaises(TypeError, ChatWebService, apiKeys="the-key", dataDir=dataDir, endpoint=None)
        # Refused before anything was created (no database threads left
        # running, no files).
        self.assertEqual(os.listdir(dataDir), [])

    def test_badKeysRefused(self) -> None:
        for keys in ([b"bytes-key"], [None], [42]):
            self.assertRaises(TypeError, self.make, keys)
        for keys in ([], [""], ["with space"], ["caf\u00e9"], ["tab\there"]):
            self.assertRaises(ValueError, self.make, keys)

    def test_severalKeys(self) -> None:
        api = self.make(("first-key", "second-key"))
        treq = StubTreq(api.resource())
        for key in ("first-key", "second-key"):
            response = self.successResultOf(
                treq.get("http://127.0.0.1/sessions", headers={"X-API-Key": key})
            )
            self.assertEqual(response.code, 200)


class RoutingTests(APITestCase):
    def test_messageIdsAreASCIIDigits(self) -> None:
        """
        Arabic-Indic or full-width digits do not name message 1.
        """
        self.adapter.setBusy("ci")
        self.post({"session": "ci", "content": "waiting"})
        for digit in ("\u0661", "\uff11", "\u00b9", "\U0001d7cf"):
            response, body = self.request("DELETE", f"/queue/{digit}")
            self.assertError(response, body, 404)
            response, body = self.request("POST", f"/queue/{digit}/retry")
            self.assertError(response, body, 404)
        self.assertEqual(self.journal.rows[1].state, "pending")
        response, body = self.request("DELETE", "/queue/1")
        self.assertEqual(response.code, 204)

    def test_pathsWerkzeugWouldRedirectAre404(self) -> None:
        """
        werkzeug answers a path with an empty segment with a redirect
        (built from the Host header) that Klein turns into a 500.
        """
        for method, path in [
            ("GET", "/session//raw"),
            ("POST", "/session//share"),
            ("GET", "//"),
            ("GET", "/queue//"),
            ("DELETE", "/queue//1"),
        ]:
            response, body = self.request(method, path, headers=dict(AUTH, Host="evil.example"))
            error = self.assertError(response, body, 404)
            self.assertNotIn("evil", error["error"])

    def test_routeNameOnlyAsTheFirstSegment(self) -> None:
        """
        A route is reached only by its plain path: C{//sessions} (an empty
        first segment) and C{/%2Fsessions} or C{/session%2Fraw} (an escaped
        slash) are 404s, not C{/sessions} and C{/session/raw} served where
        a proxy's rule for those paths would not see them.  A session id
        with a slash is still one.
        """
        response, body = self.post({"session": "a/b", "content": "x"})
        self.assertEqual(response.code, 204, body)
        for method, path in [("GET", "//sessions"), ("GET", "///sessions"),
                             ("GET", "/%2Fsessions"), ("GET", "/%2fsessions"),
                             ("GET", "//healthz"), ("GET", "/session%2Fraw?id=a%2Fb"),
                             ("GET", "//session?id=a%2Fb"), ("POST", "//")]:
            response, body = self.request(method, path)
            self.assertError(response, body, 404)
        response, body = self.request("GET", "/sessions/a%2Fb")
        self.assertEqual(response.code, 200, body)
        response, body = self.request("GET", "/sessions")
        self.assertEqual(json.loads(body), ["a/b"])

    def test_misdirectedRequestPhrase(self) -> None:
        response, _ = self.request("GET", "/session?id=ci", headers=dict(AUTH, Host="evil.example"))
        self.assertEqual((response.code, response.phrase), (421, b"Misdirected Request"))


class AuthThrottleTests(APITestCase):
    """
    Failed authentication is throttled per client address.
    """

    def test_wrongKeysAreThrottled(self) -> None:
        from chatweb.web._throttle import FAILURE_BURST, FAILURE_RATE

        wrong = {"X-API-Key": "wrong-key"}
        for _ in range(FAILURE_BURST):
            response, body = self.request("GET", "/sessions", headers=wrong)
            self.assertError(response, body, 401)
        response, body = self.request("GET", "/sessions", headers=wrong)
        self.assertError(response, body, 429, "failed authentications")
        retry = int(response.headers.getRawHeaders("retry-after")[0])
        self.assertEqual(retry, round(1 / FAILURE_RATE))
        # While throttled, the address is refused whatever it sends: a right
        # key answered differently would tell a guesser it was right.
        response, body = self.request("GET", "/sessions")
        self.assertError(response, body, 429)
        self.request("POST", "/", headers=wrong, data=b'{"session": "x", "content": "y"}')
        self.clock.advance(retry)
        response, body = self.request("GET", "/sessions")
        self.assertEqual(response.code, 200, body)
        # One failure earned back: one more wrong key, then throttled again.
        response, body = self.request("GET", "/sessions", headers=wrong)
        self.assertError(response, body, 401)
        response, body = self.request("GET", "/sessions", headers=wrong)
        self.assertError(response, body, 429)

    def test_rightKeysAndMissingKeysAreNotCounted(self) -> None:
        from chatweb.web._throttle import FAILURE_BURST

        for _ in range(FAILURE_BURST * 5):
            response, _ = self.request("GET", "/sessions")
            self.assertEqual(response.code, 200)
            response, body = self.request("GET", "/sessions", headers={})
            self.assertError(response, body, 401)
        self.assertEqual(len(self.api._authFailures), 0)

    def test_forgedShareTokensAreThrottled(self) -> None:
        from chatweb.web._throttle import FAILURE_BURST

        api = ChatWebAPI(self.queue, self.adapter, [KEY], clock=self.clock, shareSecret=bytes(32))
        treq = StubTreq(api.resource())
        for n in range(FAILURE_BURST + 1):
            response = self.successResultOf(
                treq.get("http://127.0.0.1/session?id=ci&token=" + "A" * 54)
            )
            self.successResultOf(response.content())
        self.assertEqual(response.code, 429)


class FailureThrottleTests(SynchronousTestCase):
    def test_perAddress(self) -> None:
        from chatweb.web._throttle import FailureThrottle

        clock = Clock()
        throttle = FailureThrottle(clock, burst=3, rate=1.0)
        for _ in range(3):
            self.assertEqual(throttle.wait("10.0.0.1"), 0)
            throttle.failed("10.0.0.1")
        self.assertEqual(throttle.wait("10.0.0.1"), 1.0)
        self.assertEqual(throttle.wait("10.0.0.2"), 0)
        clock.advance(0.5)
        self.assertEqual(throttle.wait("10.0.0.1"), 0.5)
        clock.advance(0.5)
        self.assertEqual(throttle.wait("10.0.0.1"), 0)
        # Once its bucket is full again, an address is forgotten.
        clock.advance(10)
        self.assertEqual(throttle.wait("10.0.0.1"), 0)
        self.assertEqual(len(throttle), 0)

    def test_memoryIsBounded(self) -> None:
        from chatweb.web._throttle import FailureThrottle

        throttle = FailureThrottle(Clock(), burst=1, rate=1.0, maxAddresses=100)
        for n in range(10_000):
            throttle.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
        self.assertEqual(len(throttle), 100)
        # The newest are kept.
        self.assertGreater(throttle.wait("10.0.39.15"), 0)
        self.assertEqual(throttle.wait("10.0.0.0"), 0)

    def test_clientKeys(self) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        from chatweb.web._throttle import clientKey

        self.assertEqual(clientKey(IPv4Address("TCP", "192.0.2.1", 5)), "192.0.2.1")
        # A host has a whole /64 to pick addresses from.
        self.assertEqual(
            clientKey(IPv6Address("TCP", "2001:db8::1", 5)),
            clientKey(IPv6Address("TCP", "2001:db8::ffff:1", 6)),
        )
        self.assertNotEqual(
            clientKey(IPv6Address("TCP", "2001:db8::1", 5)),
            clientKey(IPv6Address("TCP", "2001:db8:0:1::1", 5)),
        )
        self.assertEqual(clientKey(IPv6Address("TCP", "::ffff:192.0.2.1", 5)), "192.0.2.1")
        self.assertEqual(clientKey(UNIXAddress(b"/tmp/s")), "UNIXAddress")
