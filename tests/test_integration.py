"""
chatweb over a real listening port, with treq as the client.
"""

from __future__ import annotations

import json


from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from chatweb.limits import Limits
from chatweb.testing import startChatWeb
from .test_hostile_http import exchange


def rawExchange(port: int, data: bytes) -> bytes:
    return exchange(port, data)[0]


class ServiceTests(TestCase):
    async def test_curlExamples(self) -> None:
        chatweb = await startChatWeb(self)
        response = await chatweb.post("ci", "Build completed successfully!")
        self.assertEqual(response.code, 204)
        response = await chatweb.get("/sessions")
        self.assertEqual(await response.json(), ["ci"])
        response = await chatweb.get("/session?id=ci")
        self.assertEqual(response.code, 200)
        self.assertIn("Build completed successfully!", await response.text())

    async def test_concurrentPostsAllArriveInOrder(self) -> None:
        """
        10 clients post 100 messages to 5 sessions at once: every message
        arrives once, and each client's messages to a session keep their
        order.
        """
        chatweb = await startChatWeb(self)
        sessions = [f"s{n}" for n in range(5)]

        async def client(c: int) -> None:
            for seq in range(10):
                response = await chatweb.post(sessions[(c + seq) % 5], f"c{c}-{seq}")
                self.assertEqual(response.code, 204)
                await response.content()

        from twisted.internet.defer import Deferred

        await gatherResults([Deferred.fromCoroutine(client(c)) for c in range(10)])
        await chatweb.service.queue.whenDelivered()
        seen = []
        for session in sessions:
            loaded = await chatweb.service.adapter.getSession(session)
            contents = [m.content for m in loaded.messages]
            seen.extend(contents)
            for c in range(10):
                mine = [int(x.split("-")[1]) for x in contents if x.startswith(f"c{c}-")]
                self.assertEqual(mine, sorted(mine), (session, contents))
        self.assertEqual(sorted(seen), sorted(f"c{c}-{s}" for c in range(10) for s in range(10)))
        response = await chatweb.get("/sessions")
        self.assertEqual(await response.json(), sessions)

    async def test_echoResponderAnswers(self) -> None:
        chatweb = await startChatWeb(self, responder="echo")
        await chatweb.post("ci", "ping")
        await chatweb.service.queue.whenDelivered()
        session = await chatweb.service.adapter.getSession("ci")
        self.assertEqual([(m.role, m.content) for m in session.messages],
                         [("user", "ping"), ("assistant", "ping")])

    async def test_restartKeepsSessionsAndDeliversPending(self) -> None:
        dataDir = self.mktemp()
        first = await startChatWeb(self, dataDir=dataDir)
        first.service.adapter.isBusy = lambda session: session == "held"
        await first.post("ci", "kept")
        await first.post("held", "waiting")
        await first.service.stopService()
        second = await startChatWeb(self, dataDir=dataDir)
        response = await second.get("/sessions")
        self.assertEqual(await response.json(), ["ci", "held"])
        await second.service.queue.whenDelivered()
        held = await second.service.adapter.getSession("held")
        self.assertEqual([m.content for m in held.messages], ["waiting"])

    async def test_oversizeDeclaredBodyRefusedAtOnce(self) -> None:
        """
        A Content-Length over the limit gets a 413 before the body is sent.
        """
        chatweb = await startChatWeb(self, limits=Limits(maxBodySize=1000))
        port = int(chatweb.url.rsplit(":", 1)[1])
        request = (
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: test-api-key\r\n"
            b"Content-Length: 5000000\r\n\r\n"
        )
        answer = await deferToThread(rawExchange, port, request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"1000 bytes", answer.split(b"\r\n\r\n", 1)[1])

    async def test_oversizeChunkedBodyRefused(self) -> None:
        """
        A chunked body is cut off as it passes the limit, by the channel
        (which closes the connection), not read whole and refused later.
        """
        chatweb = await startChatWeb(self, limits=Limits(maxBodySize=1000))
        port = int(chatweb.url.rsplit(":", 1)[1])
        chunk = b"x" * 600
        request = (
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: test-api-key\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3
        )
        # No final chunk: only a refusal by the channel can answer this.
        answer = await deferToThread(rawExchange, port, request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"Connection: close", answer)
        self.assertEqual(await chatweb.service.journal.pending(), [])

    async def test_bodyAtTheLimitAccepted(self) -> None:
        chatweb = await startChatWeb(self, limits=Limits(maxBodySize=1000))
        payload = json.dumps({"session": "ci", "content": ""}).encode()
        payload = payload[:-2] + b"x" * (1000 - len(payload)) + b'"}'
        self.assertEqual(len(payload), 1000)
        response = await chatweb.client.post(
            chatweb.url + "/", data=payload, headers=chatweb.headers
        )
        self.assertEqual(response.code, 204)

    async def test_malformedRequestLineGets400(self) -> None:
        chatweb = await startChatWeb(self)
        port = int(chatweb.url.rsplit(":", 1)[1])
        answer = await deferToThread(rawExchange, port, b"NONSENSE\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        response = await chatweb.get("/sessions")
        self.assertEqual(response.code, 200)



