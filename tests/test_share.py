"""
Share links, the HTML index of sessions, the Host check of pages, and the
export of a session in chat.nvim's form.
"""

from __future__ import annotations

import html
import json
import os
import re
import stat
from urllib.parse import parse_qs, quote, urlsplit

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.web._api import ChatWebAPI, hostName, normalizeAllowedHost
from chatweb.config import ConfigError, ensureShareSecret
from chatweb.importer import exportSession, readSessionFile
from chatweb.limits import Limits
from chatweb.model import Message, Session
from chatweb.queue import MessageQueue
from chatweb.web._share import MAX_LIFETIME, InvalidToken, ShareLinks
from chatweb.testing import MemoryAdapter, MemoryJournal

KEY = "test-key"
AUTH = {"X-API-Key": KEY}
SECRET = bytes(range(32))
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HTML = {"Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"}


def flip(text: str, index: int) -> str:
    """
    C{text} with the character at C{index} replaced by another base64url one.
    """
    replacement = "A" if text[index] != "A" else "B"
    return text[:index] + replacement + text[index + 1 :]


class ShareLinksTests(SynchronousTestCase):
    """
    The tokens themselves.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.links = ShareLinks(SECRET, self.clock)

    def test_roundTrip(self) -> None:
        token, expires = self.links.issue("ci", 60)
        self.assertEqual(expires, 1700000060)
        self.assertRegex(token, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(self.links.verify("ci", token), expires)

    def test_expires(self) -> None:
        token, _ = self.links.issue("ci", 60)
        self.clock.advance(59.9)
        self.links.verify("ci", token)
        self.clock.advance(0.1)
        self.assertRaisesRegex(InvalidToken, "expired", self.links.verify, "ci", token)

    def test_otherSessionOrSecret(self) -> None:
        token, _ = self.links.issue("ci", 60)
        self.assertRaises(InvalidToken, self.links.verify, "cj", token)
        self.assertRaises(InvalidToken, self.links.verify, "ci ", token)
        other = ShareLinks(bytes(32), self.clock)
        self.assertRaises(InvalidToken, other.verify, "ci", token)

    def test_everyCharacterMatters(self) -> None:
        token, _ = self.links.issue("ci", 60)
        for index in range(len(token)):
            self.assertRaises(InvalidToken, self.links.verify, "ci", flip(token, index))
        for damaged in ("", token[:-1], token + "A", token + "=", token.replace("-", "+")):
            if damaged != token:
                self.assertRaises(InvalidToken, self.links.verify, "ci", damaged)

    def test_longerExpiryIsForged(self) -> None:
        """
        Changing the expiry the token carries breaks its signature.
        """
        import base64

        token, expires = self.links.issue("ci", 60)
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        forged = (expires + 3600).to_bytes(8, "big") + raw[8:]
        forgedToken = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
        self.assertRaisesRegex(
            InvalidToken, "not valid", self.links.verify, "ci", forgedToken
        )

    def test_lifetimeBounds(self) -> None:
        self.links.issue("ci", MAX_LIFETIME)
        self.assertRaises(ValueError, self.links.issue, "ci", MAX_LIFETIME + 1)
        self.assertRaises(ValueError, self.links.issue, "ci", 0)

    def test_shortSecretRefused(self) -> None:
        self.assertRaises(ValueError, ShareLinks, b"short", self.clock)


class ShareSecretFileTests(SynchronousTestCase):
    def test_createdOnceAndPrivate(self) -> None:
        dataDir = self.mktemp()
        secret = ensureShareSecret(dataDir)
        self.assertEqual(len(secret), 32)
        path = os.path.join(dataDir, "share-secret")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(ensureShareSecret(dataDir), secret)
        self.assertEqual(sorted(os.listdir(dataDir)), ["share-secret"])

    def test_readableByOthersRefused(self) -> None:
        dataDir = self.mktemp()
        ensureShareSecret(dataDir)
        path = os.path.join(dataDir, "share-secret")
        os.chmod(path, 0o644)
        self.assertRaisesRegex(ConfigError, "chmod 600", ensureShareSecret, dataDir)

    def test_shortFileRefused(self) -> None:
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        path = os.path.join(dataDir, "share-secret")
        with open(path, "wb") as f:
            f.write(b"x")
        os.chmod(path, 0o600)
        self.assertRaisesRegex(ConfigError, "1 bytes", ensureShareSecret, dataDir)


class HostNameTests(SynchronousTestCase):
    def test_parse(self) -> None:
        for header, name in [
            (b"127.0.0.1", "127.0.0.1"),
            (b"127.0.0.1:7777", "127.0.0.1"),
            (b"LocalHost:80", "localhost"),
            (b"localhost.", "localhost"),
            (b"[::1]", "::1"),
            (b"[::1]:7777", "::1"),
            (b"::1", "::1"),
            (b"example.com:", "example.com"),
        ]:
            self.assertEqual(hostName(header), name, header)
        for header in (b"", b"[::1", b"a:b", b"[::1]x", b"a b", b"\xff", b"a/b", b"u@h"):
            self.assertIsNone(hostName(header), header)

    def test_allowedNames(self) -> None:
        self.assertEqual(normalizeAllowedHost("[::1]"), "::1")
        self.assertEqual(normalizeAllowedHost("Chat.Example.com"), "chat.example.com")
        self.assertEqual(normalizeAllowedHost("*"), "*")
        for bad in ("example.com:80", "[::1]:80", "", "a b"):
            self.assertRaises(ValueError, normalizeAllowedHost, bad)


class APITestCase(SynchronousTestCase):
    shareSecret: bytes | None = SECRET
    allowedHosts: list[str] | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.journal = MemoryJournal()
        self.adapter = MemoryAdapter()
        self.queue = MessageQueue(self.journal, self.adapter, self.clock)
        self.successResultOf(self.queue.start())
        self.api = ChatWebAPI(
            self.queue,
            self.adapter,
            [KEY],
            clock=self.clock,
            shareSecret=self.shareSecret,
            allowedHosts=self.allowedHosts,
            limits=self.limits(),
        )
        self.treq = StubTreq(self.api.resource())
        self.adapter.sessions["ci"] = Session(
            id="ci",
            model="m",
            messages=[Message(role="user", content="hello", created=1700000000)],
        )

    def limits(self) -> Limits:
        return Limits()

    def request(self, method, url, headers=AUTH, host="http://127.0.0.1", **kwargs):  # type: ignore[no-untyped-def]
        response = self.successResultOf(
            self.treq.request(method, host + url, headers=headers, **kwargs)
        )
        body = self.successResultOf(response.content())
        return response, body

    def share(self, payload, headers=AUTH, prefix=""):  # type: ignore[no-untyped-def]
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", prefix + "/session/share", headers=headers, data=data)

    def link(self, session: str = "ci", prefix: str = "", **extra) -> str:  # type: ignore[no-untyped-def]
        response, body = self.share(dict(session=session, **extra), prefix=prefix)
        self.assertEqual(response.code, 200, body)
        return json.loads(body)["url"]

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

    def assertPage(self, response, body, session: str = "ci") -> None:  # type: ignore[no-untyped-def]
        self.assertEqual(response.code, 200, body)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
        )
        self.assertIn(html.escape(session).encode(), body)
        self.assertEqual(response.headers.getRawHeaders("referrer-policy"), ["no-referrer"])
        self.assertIsNotNone(response.headers.getRawHeaders("content-security-policy"))


class ShareRouteTests(APITestCase):
    def test_createAndOpenWithoutKey(self) -> None:
        response, body = self.share({"session": "ci", "expires_in": 120})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        answer = json.loads(body)
        self.assertEqual(answer["expires"], 1700000120)
        url = urlsplit(answer["url"])
        self.assertEqual(url.path, "/session")
        query = parse_qs(url.query)
        self.assertEqual(query["id"], ["ci"])
        self.assertEqual(len(query["token"]), 1)
        self.assertPage(*self.request("GET", answer["url"], headers={}))

    def test_defaultLifetimeIsAnHour(self) -> None:
        response, body = self.share({"session": "ci"})
        self.assertEqual(json.loads(body)["expires"], 1700000000 + 3600)

    def test_expiredLink(self) -> None:
        url = self.link(expires_in=60)
        self.clock.advance(59)
        self.assertPage(*self.request("GET", url, headers={}))
        self.clock.advance(1)
        self.assertError(*self.request("GET", url, headers={}), 401, "expired")

    def test_tamperedToken(self) -> None:
        url = self.link()
        token = parse_qs(urlsplit(url).query)["token"][0]
        for index in (0, 5, 11, len(token) - 1):
            bad = url.replace(token, flip(token, index))
            self.assertError(*self.request("GET", bad, headers={}), 401, "share token")
        for bad in (url + "x", url.replace(token, token[:-1]), url.replace(token, "%FF")):
            self.assertError(*self.request("GET", bad, headers={}), 401, "share token")

    def test_tokenForAnotherSession(self) -> None:
        self.adapter.sessions["other"] = Session(id="other")
        url = self.link("ci")
        other = url.replace("id=ci", "id=other")
        self.assertError(*self.request("GET", other, headers={}), 401, "not valid")
        # A second id, or a second token, does not help either.
        self.assertError(
            *self.request("GET", "/session?id=other&" + url.split("?")[1], headers={}),
            401,
        )
        token = parse_qs(urlsplit(url).query)["token"][0]
        self.assertError(
            *self.request("GET", f"{url}&token={token}", headers={}), 401, "one share token"
        )

    def test_tokenOnlyOpensTheSessionPage(self) -> None:
        """
        Without the key, a token opens GET /session and nothing else.
        """
        url = self.link()
        query = url.split("?")[1]
        for method, path in [
            ("GET", "/sessions?" + query),
            ("GET", "/session/raw?" + query),
            ("GET", "/queue?session=ci&" + query.split("&")[1]),
            ("HEAD", url),
            ("POST", url),
            ("GET", "/session/?" + query),
            ("GET", "/session%2F?" + query),
            ("GET", "/nope?" + query),
        ]:
            response, body = self.request(method, path, headers={})
            self.assertEqual(response.code, 401, (method, path))
        response, body = self.share({"session": "ci"}, headers={})
        self.assertError(response, body, 401, "X-API-Key")
        # The same path spelled with escapes is the same route, and checks
        # the token all the same.
        self.assertPage(*self.request("GET", "/%73ession?" + query, headers={}))
        self.assertError(
            *self.request("GET", "/%73ession?" + query[:-2] + "AA", headers={}), 401
        )

    def test_wrongKeyWithToken(self) -> None:
        """
        A token works whatever else the browser sends; a wrong key does not
        make a bad token good.
        """
        url = self.link()
        self.assertPage(*self.request("GET", url, headers={"X-API-Key": "wrong"}))
        self.assertError(
            *self.request("GET", url[:-2] + "AA", headers={"X-API-Key": "wrong"}), 401
        )

    def test_keyStillWorks(self) -> None:
        """
        With the key, a token is not needed, and a bad one is not looked at.
        """
        self.assertPage(*self.request("GET", "/session?id=ci"))
        self.assertPage(*self.request("GET", "/session?id=ci&token=junk"))

    def test_missingIdOrSessionBehindToken(self) -> None:
        url = self.link()
        token = parse_qs(urlsplit(url).query)["token"][0]
        self.assertError(
            *self.request("GET", f"/session?token={token}", headers={}), 400, "'id'"
        )
        # An unknown session with a bad token: 401, not 404 (no oracle).
        self.assertError(
            *self.request("GET", f"/session?id=nope&token={token}", headers={}), 401
        )

    def test_unknownSession(self) -> None:
        self.assertError(*self.share({"session": "nope"}), 404, "nope")

    def test_sessionWithOnlyQueuedMessages(self) -> None:
        self.adapter.setBusy("new")
        response, _ = self.request(
            "POST", "/", data=json.dumps({"session": "new", "content": "hi"}).encode()
        )
        self.assertEqual(response.code, 204)
        self.assertPage(*self.request("GET", self.link("new"), headers={}), session="new")

    def test_idNeedingEscapes(self) -> None:
        sessionId = "a/b c&d=e?f#g<h>"
        self.adapter.sessions[sessionId] = Session(id=sessionId)
        url = self.link(sessionId)
        self.assertEqual(parse_qs(urlsplit(url).query)["id"], [sessionId])
        self.assertPage(*self.request("GET", url, headers={}), session=sessionId)

    def test_badRequests(self) -> None:
        for payload, words in [
            (b"", ("empty",)),
            (b"[]", ("object",)),
            ({}, ("'session'",)),
            ({"session": 1}, ("'session'", "string")),
            ({"session": "ci", "expires_in": 0}, ("'expires_in'", "604800")),
            ({"session": "ci", "expires_in": -5}, ("'expires_in'",)),
            ({"session": "ci", "expires_in": MAX_LIFETIME + 1}, ("'expires_in'",)),
            ({"session": "ci", "expires_in": "60"}, ("'expires_in'", "string")),
            ({"session": "ci", "expires_in": 1.5}, ("'expires_in'", "whole")),
            ({"session": "ci", "expires_in": True}, ("'expires_in'",)),
            ({"session": "ci", "expires_in": None}, ("'expires_in'",)),
        ]:
            self.assertError(*self.share(payload), 400, *words)
        response, body = self.share({"session": "ci", "expires_in": MAX_LIFETIME})
        self.assertEqual(response.code, 200, body)

    def test_wrongMethods(self) -> None:
        self.assertError(*self.request("GET", "/session/share"), 404)
        self.assertError(*self.request("PUT", "/session/share"), 404)

    def test_mountedBelowAPath(self) -> None:
        """
        Share URLs and index links keep the path the API is mounted at.
        """
        from twisted.web.resource import Resource

        root = Resource()
        chat = Resource()
        root.putChild(b"tools", chat)
        chat.putChild(b"chat", self.api.resource())
        self.treq = StubTreq(root)
        url = self.link(prefix="/tools/chat")
        self.assertTrue(url.startswith("/tools/chat/session?id=ci&token="), url)
        self.assertPage(*self.request("GET", url, headers={}))
        _, body = self.request("GET", "/tools/chat/sessions", headers=dict(AUTH, **HTML))
        self.assertIn(b'href="/tools/chat/session?id=ci&amp;token=', body)


class ShareRateLimitTests(APITestCase):
    def limits(self) -> Limits:
        return Limits(rateLimit=1.0, rateBurst=2)

    def test_tokenRequestsAreRateLimited(self) -> None:
        url = self.link()
        for _ in range(2):
            self.assertPage(*self.request("GET", url, headers={}))
        response, body = self.request("GET", url, headers={})
        self.assertError(response, body, 429)


class SharingOffTests(APITestCase):
    shareSecret = None

    def test_shareRefused(self) -> None:
        self.assertError(*self.share({"session": "ci"}), 403, "share links are turned off")

    def test_tokenRefused(self) -> None:
        self.assertError(
            *self.request("GET", "/session?id=ci&token=x", headers={}), 401, "turned off"
        )

    def test_indexLinksNeedTheKey(self) -> None:
        response, body = self.request("GET", "/sessions", headers=dict(AUTH, **HTML))
        self.assertEqual(response.code, 200, body)
        self.assertIn(b'href="/session?id=ci"', body)


class IndexTests(APITestCase):
    def hrefs(self, body: bytes) -> list[str]:
        return [html.unescape(h) for h in re.findall(r'href="([^"]*)"', body.decode())]

    def test_jsonUnlessHTMLAsked(self) -> None:
        for accept in (None, "*/*", "application/json", "text/html;q=0", "text/plain"):
            headers = dict(AUTH) if accept is None else dict(AUTH, Accept=accept)
            response, body = self.request("GET", "/sessions", headers=headers)
            self.assertEqual(json.loads(body), ["ci"], accept)
            self.assertEqual(response.headers.getRawHeaders("vary"), ["Accept"])

    def test_htmlIndexLinksOpenWithoutKey(self) -> None:
        self.adapter.sessions["a<b>"] = Session(id="a<b>")
        response, body = self.request("GET", "/sessions", headers=dict(AUTH, **HTML))
        self.assertEqual(response.code, 200, body)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
        )
        self.assertEqual(response.headers.getRawHeaders("vary"), ["Accept"])
        self.assertIsNotNone(response.headers.getRawHeaders("content-security-policy"))
        self.assertNotIn(b"a<b>", body)
        self.assertIn(b"a&lt;b&gt;", body)
        links = self.hrefs(body)
        self.assertEqual(len(links), 2)
        for link in links:
            sessionId = parse_qs(urlsplit(link).query)["id"][0]
            self.assertPage(*self.request("GET", link, headers={}), session=sessionId)

    def test_indexLinksExpire(self) -> None:
        _, body = self.request("GET", "/sessions", headers=dict(AUTH, Accept="text/html"))
        (link,) = self.hrefs(body)
        self.clock.advance(15 * 60)
        self.assertError(*self.request("GET", link, headers={}), 401, "expired")

    def test_indexNeedsKeyOrIndexToken(self) -> None:
        response, body = self.request("GET", "/sessions", headers=HTML)
        self.assertError(response, body, 401, "X-API-Key")
        # A session's token does not open the index.
        url = self.link()
        response, body = self.request(
            "GET", "/sessions?" + url.split("?")[1], headers=HTML
        )
        self.assertError(response, body, 401, "not valid")

    def indexLink(self, **payload) -> str:  # type: ignore[no-untyped-def]
        response, body = self.request(
            "POST", "/sessions/share", data=json.dumps(payload).encode()
        )
        self.assertEqual(response.code, 200, body)
        answer = json.loads(body)
        self.assertTrue(answer["url"].startswith("/sessions?token="), answer)
        return answer["url"]

    def test_indexShareLinkOpensInABrowser(self) -> None:
        """
        A browser with only the index's share link sees the index, follows
        its links to the pages, and loses both when the link expires.
        """
        url = self.indexLink(expires_in=600)
        response, body = self.request("GET", url, headers={})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
        )
        (link,) = self.hrefs(body)
        self.assertPage(*self.request("GET", link, headers={}))
        # The page links live no longer than the index link.
        self.clock.advance(600)
        self.assertError(*self.request("GET", link, headers={}), 401, "expired")
        self.assertError(*self.request("GET", url, headers={}), 401, "expired")

    def test_indexTokenOpensNoSessionPage(self) -> None:
        url = self.indexLink()
        token = url.split("token=")[1]
        response, body = self.request("GET", f"/session?id=ci&token={token}", headers={})
        self.assertError(response, body, 401, "not valid")

    def test_indexShareNeedsKeyAndValidLifetime(self) -> None:
        response, body = self.request("POST", "/sessions/share", headers={}, data=b"{}")
        self.assertError(response, body, 401)
        response, body = self.request(
            "POST", "/sessions/share", data=b'{"expires_in": 99999999}'
        )
        self.assertError(response, body, 400, "expires_in")
        response, body = self.request("POST", "/sessions/share", data=b"")
        self.assertEqual(response.code, 200, body)


class HostCheckTests(APITestCase):
    def page(self, host: str, headers=AUTH):  # type: ignore[no-untyped-def]
        return self.request("GET", "/session?id=ci", headers=dict(headers, Host=host))

    def test_loopbackAllowed(self) -> None:
        for host in (
            "127.0.0.1",
            "127.0.0.1:7777",
            "localhost:8080",
            "LOCALHOST",
            "localhost.",
            "[::1]",
            "[::1]:7777",
        ):
            self.assertPage(*self.page(host))

    def test_otherHostsRefused(self) -> None:
        for host in (
            "evil.example",
            "evil.example:7777",
            "127.0.0.2",
            "[::2]:7777",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
        ):
            error = self.assertError(*self.page(host), 421, "--allowed-host")
            self.assertIn(host, error["error"])

    def test_missingOrMalformedHostRefused(self) -> None:
        for value in (b"", b"[::1", b"a b:80"):
            response, body = self.request(
                "GET", "/session?id=ci", headers={b"X-API-Key": KEY, b"Host": value}
            )
            self.assertError(response, body, 421)

    def test_shareLinkAndIndexChecked(self) -> None:
        url = self.link()
        self.assertError(
            *self.request("GET", url, headers={}, host="http://evil.example"), 421
        )
        self.assertError(
            *self.request(
                "GET", "/sessions", headers=dict(AUTH, **HTML), host="http://evil.example"
            ),
            421,
        )

    def test_jsonRoutesUnaffected(self) -> None:
        host = "http://evil.example"
        response, body = self.request("GET", "/sessions", host=host)
        self.assertEqual(json.loads(body), ["ci"])
        response, body = self.request("GET", "/session/raw?id=ci", host=host)
        self.assertEqual(response.code, 200)
        response, body = self.share({"session": "ci"})
        self.assertEqual(response.code, 200)


class AllowedHostsTests(APITestCase):
    allowedHosts = ["Chat.Example.com", "[fd00::1]", "10.0.0.5"]

    def test_allowed(self) -> None:
        for host in (
            "chat.example.com",
            "CHAT.example.com:8443",
            "[fd00::1]:7777",
            "10.0.0.5:7777",
            "127.0.0.1",
        ):
            response, body = self.request(
                "GET", "/session?id=ci", headers=dict(AUTH, Host=host)
            )
            self.assertPage(response, body)
        self.assertError(
            *self.request("GET", "/session?id=ci", host="http://other.example.com"), 421
        )

    def test_badNamesRefusedAtStart(self) -> None:
        self.assertRaises(
            ValueError,
            ChatWebAPI,
            self.queue,
            self.adapter,
            [KEY],
            clock=self.clock,
            allowedHosts=["example.com:80"],
        )


class AnyHostTests(APITestCase):
    allowedHosts = ["*"]

    def test_anyHost(self) -> None:
        response, body = self.request(
            "GET", "/session?id=ci", host="http://whatever.example"
        )
        self.assertPage(response, body)


class ExportTests(APITestCase):
    def test_export(self) -> None:
        response, body = self.request("GET", "/session/raw?id=ci")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(json.loads(body), self.adapter.sessions["ci"].asDict())

    def test_importedFixturesRoundTrip(self) -> None:
        names = [n for n in sorted(os.listdir(FIXTURES)) if n.endswith(".json")]
        self.assertTrue(names)
        for name in names:
            path = os.path.join(FIXTURES, name)
            session = readSessionFile(path)
            self.adapter.sessions[session.id] = session
            response, body = self.request("GET", "/session/raw?id=" + quote(session.id, safe=""))
            self.assertEqual(response.code, 200, (name, body))
            exported = json.loads(body)
            self.assertEqual(exported, exportSession(session), name)
            # And it reads back as the same session.
            self.assertEqual(Session.fromDict(exported), session, name)

    def test_errors(self) -> None:
        self.assertError(*self.request("GET", "/session/raw"), 400, "'id'")
        self.assertError(*self.request("GET", "/session/raw?id="), 400, "'id'")
        self.assertError(*self.request("GET", "/session/raw?id=%FF"), 400, "UTF-8")
        self.assertError(*self.request("GET", "/session/raw?id=nope"), 404, "nope")
        self.assertError(*self.request("GET", "/session/raw?id=ci", headers={}), 401)
        response, _ = self.request("HEAD", "/session/raw?id=ci")
        self.assertEqual(response.code, 404)
        self.assertError(*self.request("POST", "/session/raw?id=ci"), 404)

    def test_onlyQueued(self) -> None:
        self.adapter.setBusy("new")
        self.request("POST", "/", data=json.dumps({"session": "new", "content": "hi"}).encode())
        response, body = self.request("GET", "/session/raw?id=new")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["messages"], [])


class AccessLogTests(TestCase):
    """
    Over a real port: a share link works, and its token stays out of the
    access log.
    """

    async def test_tokenNotLogged(self) -> None:
        from twisted.internet import reactor
        from twisted.logger import formatEvent, globalLogPublisher
        from twisted.web.client import HTTPConnectionPool

        import treq

        from chatweb.web import ChatWebSite

        journal = MemoryJournal()
        adapter = MemoryAdapter()
        adapter.sessions["ci"] = Session(id="ci")
        queue = MessageQueue(journal, adapter, reactor)
        await queue.start()
        self.addCleanup(queue.stop, 1.0)
        api = ChatWebAPI(queue, adapter, [KEY], shareSecret=SECRET)
        port = reactor.listenTCP(0, ChatWebSite(api.resource(), accessLog=True), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        events: list[str] = []

        def observe(event: dict) -> None:  # type: ignore[type-arg]
            events.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        base = f"http://127.0.0.1:{port.getHost().port}"
        response = await treq.post(
            base + "/session/share", json={"session": "ci"}, headers=AUTH, pool=pool
        )
        url = (await response.json())["url"]
        token = parse_qs(urlsplit(url).query)["token"][0]
        response = await treq.get(base + url, pool=pool)
        self.assertEqual(response.code, 200)
        await response.content()
        logged = "\n".join(events)
        # The client's address, then the request without its query.
        self.assertRegex(logged, r"127\.0\.0\.1:\d+ GET /session 200")
        self.assertNotIn(token, logged)
        self.assertNotIn(KEY, logged)


class RedactTokensTests(SynchronousTestCase):
    def test_redacted(self) -> None:
        from chatweb.web._share import redactTokens

        self.assertEqual(
            redactTokens(b"/session?id=ci&token=SECRET"), b"/session?id=ci&token=REDACTED"
        )
        self.assertEqual(
            redactTokens(b"/s?token=A&token=B&x=token%3DC"),
            b"/s?token=REDACTED&token=REDACTED&x=token%3DC",
        )
        # However the name is spelled, as Twisted decodes it.
        self.assertEqual(redactTokens(b"/s?tok%65n=SECRET"), b"/s?tok%65n=REDACTED")
        self.assertEqual(redactTokens(b"/s?token"), b"/s?token=REDACTED")
        for uri in (b"/session", b"/session?id=ci", b"/?"):
            self.assertEqual(redactTokens(uri), uri)


class ShareLogTests(TestCase):
    """
    Over real ports, whatever Site serves the API: no log line holds a
    share token or the key after share-link requests, HEAD included (link
    preview bots send HEAD).
    """

    def setUp(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        self.events: list[str] = []

        def observe(event: dict) -> None:  # type: ignore[type-arg]
            self.events.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def serve(self, makeSite) -> str:  # type: ignore[no-untyped-def]
        from twisted.internet import reactor
        from twisted.web.resource import Resource

        journal = MemoryJournal()
        adapter = MemoryAdapter()
        adapter.sessions["ci"] = Session(id="ci")
        queue = MessageQueue(journal, adapter, reactor)
        await queue.start()
        self.addCleanup(queue.stop, 1.0)
        api = ChatWebAPI(queue, adapter, [KEY], shareSecret=SECRET)
        root = Resource()
        root.putChild(b"chat", api.resource())
        port = reactor.listenTCP(0, makeSite(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def shareRequests(self, base: str) -> list[str]:
        """
        Make share links for a session and the index, and open each with
        GET and HEAD; their tokens.
        """
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        import treq

        pool = HTTPConnectionPool(reactor, persistent=False)
        tokens = []
        for path, payload in (("/chat/session/share", {"session": "ci"}), ("/chat/sessions/share", {})):
            response = await treq.post(base + path, json=payload, headers=AUTH, pool=pool)
            url = (await response.json())["url"]
            tokens.append(parse_qs(urlsplit(url).query)["token"][0])
            for method in ("GET", "HEAD"):
                response = await treq.request(method, base + url, pool=pool)
                # HEAD is not a method of the API.
                self.assertEqual(response.code, 200 if method == "GET" else 401, (method, url))
                await response.content()
        return tokens

    def assertNothingLogged(self, tokens: list[str], logged: str) -> None:
        for token in tokens:
            self.assertNotIn(token, logged)
        self.assertNotIn(KEY, logged)
        self.assertNotIn("I think I'll eat it", logged)

    async def test_chatWebSite(self) -> None:
        from chatweb.web import ChatWebSite

        for accessLog in (False, True):
            del self.events[:]
            base = await self.serve(lambda root: ChatWebSite(root, accessLog=accessLog))
            tokens = await self.shareRequests(base)
            logged = "\n".join(self.events)
            if accessLog:
                self.assertIn("GET /chat/session 200", logged)
            self.assertNothingLogged(tokens, logged)

    async def test_plainSiteWithAccessLog(self) -> None:
        """
        A plain Site writes the whole request URI to its access log: the
        API redacts the token in it.
        """
        from twisted.web.server import Site

        logPath = os.path.abspath(self.mktemp())
        base = await self.serve(lambda root: Site(root, logPath=logPath))
        tokens = await self.shareRequests(base)
        with open(logPath, encoding="utf-8") as f:
            accessLog = f.read()
        self.assertIn('"HEAD /chat/session?id=ci&token=REDACTED HTTP/1.1" 401', accessLog)
        self.assertNothingLogged(tokens, accessLog + "\n".join(self.events))


class ShareLogTwistdTests(TestCase):
    """
    The real twistd, with --access-log: share links opened with GET and
    HEAD leave no token or key in its output.
    """

    async def test_noTokenInTwistdLog(self) -> None:
        await self.checkTwistdLog(["--access-log"])

    async def test_noTokenInTwistdLogWithoutAccessLog(self) -> None:
        await self.checkTwistdLog([])

    async def checkTwistdLog(self, args: list[str]) -> None:
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        import treq

        from chatweb.testing import ChatWebProcess

        key = "twistd-log-test-key"
        process = ChatWebProcess(
            os.path.abspath(self.mktemp()), apiKey=key, args=args, testCase=self
        )
        base = await process.start()
        pool = HTTPConnectionPool(reactor, persistent=False)
        auth = {"X-API-Key": key}
        response = await treq.post(
            base + "/", json={"session": "ci", "content": "hello"}, headers=auth, pool=pool
        )
        self.assertEqual(response.code, 204)
        tokens = []
        for path, payload in (("/session/share", {"session": "ci"}), ("/sessions/share", {})):
            response = await treq.post(base + path, json=payload, headers=auth, pool=pool)
            url = (await response.json())["url"]
            tokens.append(parse_qs(urlsplit(url).query)["token"][0])
            for method in ("GET", "HEAD", "GET"):
                response = await treq.request(method, base + url, pool=pool)
                await response.content()
        await process.stop()
        output = process.output
        if args:
            self.assertIn("HEAD /session 401", output)
        for token in tokens:
            self.assertNotIn(token, output)
        self.assertNotIn(key, output)
