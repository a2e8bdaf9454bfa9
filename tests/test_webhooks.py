"""
Senders that cannot set X-API-Key or build JSON: C{Authorization: Bearer
KEY} wherever X-API-Key is taken, and C{POST /sessions/{id}/messages} with
the message as a text body (ntfy style).
"""

from __future__ import annotations

import json
import shutil

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from chatweb.testing import startChatWeb

from .test_api import KEY, APITestCase

BEARER = {"Authorization": "Bearer " + KEY}


class BearerTests(APITestCase):
    def test_bearerOpensEveryRoute(self) -> None:
        response, body = self.post({"session": "ci", "content": "hi"}, headers=BEARER)
        self.assertEqual(response.code, 204, body)
        response, body = self.request("GET", "/sessions", headers=BEARER)
        self.assertEqual((response.code, json.loads(body)), (200, ["ci"]))
        response, body = self.request(
            "GET", "/sessions", headers={"Authorization": "bearer  " + KEY}
        )
        self.assertEqual(response.code, 200, body)

    def test_wrongOrOtherSchemeRefused(self) -> None:
        for headers in (
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer "},
            {"Authorization": "Basic " + KEY},
            {"Authorization": KEY},
        ):
            response, body = self.request("GET", "/sessions", headers=headers)
            self.assertError(response, body, 401, "Bearer")
            self.assertNotIn(KEY.encode(), body)

    def test_oneKeyOnly(self) -> None:
        # Two credentials (even both right) are refused, as two X-API-Keys are.
        response, body = self.request(
            "GET", "/sessions", headers={"X-API-Key": KEY, "Authorization": "Bearer " + KEY}
        )
        self.assertError(response, body, 401)

    def test_otherSchemeBesideTheKeyIsIgnored(self) -> None:
        # A proxy's Basic credentials in front of chatweb are not ours.
        response, body = self.request(
            "GET", "/sessions", headers={"X-API-Key": KEY, "Authorization": "Basic eDp5"}
        )
        self.assertEqual(response.code, 200, body)

    def test_wrongBearerIsThrottled(self) -> None:
        from chatweb.web._throttle import FAILURE_BURST

        for _ in range(FAILURE_BURST):
            self.request("GET", "/sessions", headers={"Authorization": "Bearer nope"})
        response, body = self.request("GET", "/sessions", headers=BEARER)
        self.assertError(response, body, 429)


class TextMessageTests(APITestCase):
    def postText(self, session: str, data: bytes, headers=BEARER):  # type: ignore[no-untyped-def]
        return self.request("POST", f"/sessions/{session}/messages", headers=headers, data=data)

    def test_bodyIsTheContent(self) -> None:
        response, body = self.postText("ci", "Build \u2713 done\n".encode())
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(self.adapter.contents("ci"), ["Build \u2713 done\n"])
        messageId = response.headers.getRawHeaders("x-message-id")[0]
        response, body = self.request("GET", f"/queue/{messageId}")
        self.assertEqual(json.loads(body)["session"], "ci")

    def test_encodedSessionId(self) -> None:
        response, body = self.postText("ci%2Fnightly%20job", b"x")
        self.assertEqual(response.code, 204, body)
        self.assertEqual(self.adapter.contents("ci/nightly job"), ["x"])

    def test_charset(self) -> None:
        headers = dict(BEARER, **{"Content-Type": "text/plain; charset=ISO-8859-1"})
        response, body = self.postText("ci", "caf\xe9".encode("latin-1"), headers)
        self.assertEqual(response.code, 204, body)
        headers["Content-Type"] = "text/plain; charset=nonsense"
        response, body = self.postText("ci", b"x", headers)
        self.assertError(response, body, 400, "charset")
        response, body = self.postText("ci", b"caf\xe9")
        # (The same words as POST /'s.)
        self.assertError(response, body, 400, "request body is not valid UTF-8")
        self.assertEqual(self.adapter.contents("ci"), ["caf\xe9"])

    def test_charsetsThatAreNotText(self) -> None:
        """
        Python's codecs that are not text encodings (transforms) and those
        whose decoding fails otherwise are a 400, not a 500.
        """
        for charset, error in [("rot13", "not a text encoding"), ("base64", "not a text encoding"),
                               ("zlib", "not a text encoding"), ("uu", "not a text encoding"),
                               ("undefined", "not valid UNDEFINED"),
                               ("punycode", "not valid PUNYCODE")]:
            headers = dict(BEARER, **{"Content-Type": f"text/plain; charset={charset}"})
            response, body = self.postText("ci", b"x\xff-", headers)
            self.assertError(response, body, 400, error)
        self.assertEqual(self.adapter.delivered, [])

    def test_badRequests(self) -> None:
        response, body = self.postText("ci", b"")
        self.assertError(response, body, 400, "empty")
        response, body = self.postText("%ZZ", b"x")
        self.assertError(response, body, 400, "percent-escape")
        response, body = self.postText("a%00b", b"x")
        self.assertError(response, body, 400, "control")
        response, body = self.postText("ci", b"x", headers={})
        self.assertError(response, body, 401)
        response, body = self.request("GET", "/sessions/ci/messages")
        self.assertError(response, body, 404)
        self.assertEqual(self.adapter.delivered, [])

    def test_sameLimits(self) -> None:
        limit = self.api._limits.maxContentLength
        response, body = self.postText("ci", b"x" * (limit + 1))
        self.assertError(response, body, 413)
        response, body = self.postText("ci", b"x" * limit)
        self.assertEqual(response.code, 204, body)

    def test_idempotencyKey(self) -> None:
        headers = dict(BEARER, **{"Idempotency-Key": "build-42"})
        first, _ = self.postText("ci", b"once", headers)
        again, _ = self.postText("ci", b"once", headers)
        self.assertEqual((first.code, again.code), (204, 204))
        self.assertEqual(
            first.headers.getRawHeaders("x-message-id"), again.headers.getRawHeaders("x-message-id")
        )
        self.assertEqual(self.adapter.contents("ci"), ["once"])
        # The same key under X-API-Key is the same sender.
        response, _ = self.postText("ci", b"once", {"X-API-Key": KEY, "Idempotency-Key": "build-42"})
        self.assertEqual(self.adapter.contents("ci"), ["once"])
        response, body = self.postText("ci", b"other", headers)
        self.assertError(response, body, 422)


class RealHTTPTests(TestCase):
    async def test_curlWithBearer(self) -> None:
        """
        The issue's curl line, over a real port: 204 and the text delivered.
        """
        chatweb = await startChatWeb(self, responder="echo")
        url = chatweb.url + "/sessions/ci/messages"
        curl = shutil.which("curl")
        if curl is not None:
            out, err, code = await getProcessOutputAndValue(
                curl,
                ["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                 "Authorization: Bearer " + chatweb.apiKey, "-d", "text from curl", url],
            )
            self.assertEqual((out, code), (b"204", 0), err)
        else:
            response = await chatweb.client.post(
                url, data=b"text from curl",
                headers={"Authorization": "Bearer " + chatweb.apiKey,
                         "Content-Type": "application/x-www-form-urlencoded"},
            )
            self.assertEqual(response.code, 204)
        await chatweb.service.queue.whenDelivered()
        session = await chatweb.service.adapter.getSession("ci")
        self.assertEqual(
            [(m.role, m.content) for m in session.messages],
            [("user", "text from curl"), ("assistant", "text from curl")],
        )

    async def test_siteRefusesWrongBearerBeforeTheBody(self) -> None:
        chatweb = await startChatWeb(self)
        response = await chatweb.client.post(
            chatweb.url + "/sessions/ci/messages", data=b"x" * 100000,
            headers={"Authorization": "Bearer wrong"},
        )
        self.assertEqual(response.code, 401)
        self.assertIn("Bearer", (await response.json())["error"])
