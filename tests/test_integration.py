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

    async def test_oneMessageIsSingular(self) -> None:
        chatweb = await startChatWeb(self)
        await chatweb.post("ci", "only one")
        await chatweb.service.queue.whenDelivered()
        page = await (await chatweb.get("/session?id=ci")).text()
        self.assertRegex(page, r"<b>1</b> message(?!s)")
        await chatweb.post("ci", "and two")
        await chatweb.service.queue.whenDelivered()
        page = await (await chatweb.get("/session?id=ci")).text()
        self.assertIn("<b>2</b> messages", page)

    async def test_pageForAnotherHostSaysWhatToPass(self) -> None:
        """
        Listening on all interfaces, a page asked for under a name that was
        not allowed gets a message naming the exact option to pass.
        """
        chatweb = await startChatWeb(self)
        await chatweb.post("ci", "x")
        response = await chatweb.client.get(
            chatweb.url + "/session?id=ci",
            headers=dict(chatweb.headers, Host="box.lan:7777"),
        )
        self.assertEqual(response.code, 421)
        error = (await response.json())["error"]
        self.assertIn("--allowed-host box.lan ", error)
        self.assertIn('make run ARGS="--allowed-host box.lan"', error)

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

    async def test_burstOf500ConnectionsAllGet204(self) -> None:
        """
        500 clients connect at the same moment (while the reactor is busy,
        so nothing is accepted meanwhile): the listen queue holds them all,
        so no client has to retry its SYN or gets reset, and each one's POST
        gets its 204.
        """
        import select
        import socket

        chatweb = await startChatWeb(self)
        port = int(chatweb.url.rsplit(":", 1)[1])
        clients: list[socket.socket] = []
        self.addCleanup(lambda: [c.close() for c in clients])
        poller = select.poll()
        for _ in range(500):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            clients.append(client)
            poller.register(client, select.POLLOUT)
        # On loopback a handshake is over when connect returns, unless the
        # listen queue was full and the SYN was dropped.
        connected = {fd for fd, events in poller.poll(0) if events & select.POLLOUT}
        self.assertEqual(len(connected), 500)

        def exchangeAll() -> list[bytes]:
            answers = []
            for n, client in enumerate(clients):
                client.setblocking(True)
                client.settimeout(60)
                body = json.dumps({"session": f"s{n % 10}", "content": f"m{n}"}).encode()
                client.sendall(
                    b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: test-api-key\r\n"
                    b"Connection: close\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            for client in clients:
                answer = b""
                while chunk := client.recv(4096):
                    answer += chunk
                answers.append(answer.split(b"\r\n", 1)[0])
            return answers

        answers = await deferToThread(exchangeAll)
        self.assertEqual(answers, [b"HTTP/1.1 204 No Content"] * 500)

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





class LifecycleTests(TestCase):
    """
    Starting, stopping and failing to start, as an embedding program sees it.
    """

    async def test_stoppedServiceRefusesToStartAgain(self) -> None:
        chatweb = await startChatWeb(self)
        await chatweb.service.stopService()
        with self.assertRaises(RuntimeError) as raised:
            chatweb.service.startService()
        self.assertIn("make a new ChatWebService", str(raised.exception))
        self.assertFalse(chatweb.service.running)

    async def test_failedStartIsLoggedOnceWithFields(self) -> None:
        """
        A database that cannot be opened, in a directory whose name holds
        braces: one log event says so (formatted, with the directory), the
        ready Deferred fails, and no error is left in a Deferred.
        """
        import gc
        import os

        from twisted.logger import formatEvent, globalLogPublisher

        from chatweb.service import DATABASE_NAME, ChatWebService

        dataDir = os.path.join(os.path.abspath(self.mktemp()), "data{dir}")
        os.makedirs(dataDir)
        with open(os.path.join(dataDir, DATABASE_NAME), "wb") as f:
            f.write(b"not a database" * 100)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = ChatWebService(apiKeys=["k" * 16], dataDir=dataDir, endpoint=None)
        service.startService()
        self.addCleanup(service.stopService)
        with self.assertRaises(Exception):
            await service.ready
        gc.collect()
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1, [formatEvent(e) for e in failures])
        text = formatEvent(failures[0])
        self.assertNotIn("Unable to format", text)
        self.assertIn("data{dir}", text)
        self.assertEqual(len(self.flushLoggedErrors()), 1)

    async def test_readableDataDirWarnedAtStart(self) -> None:
        import os

        from twisted.logger import formatEvent, globalLogPublisher

        from chatweb.service import ChatWebService

        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        os.chmod(dataDir, 0o755)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = ChatWebService(apiKeys=["k" * 16], dataDir=dataDir, endpoint=None)
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        warnings = [formatEvent(e) for e in events if "chmod" in formatEvent(e)]
        self.assertEqual(warnings, [
            f"chatweb: data directory {dataDir} may be read by other users"
            f" (mode 755); run: chmod 700 {dataDir}"
        ])
