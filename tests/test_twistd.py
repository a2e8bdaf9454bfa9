"""
End to end: the real C{twistd -n chatweb} as a child process, with treq.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from chatweb.service import DATABASE_NAME
from chatweb.testing import ChatWebProcess

KEY = "e2e-key-0123456789"
HEADERS = {"X-API-Key": KEY}


def readSessions(dataDir: str) -> dict[str, list[str]]:
    """
    Every session's message contents, from the data directory's database.
    """
    path = os.path.join(dataDir, DATABASE_NAME)
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT session, data FROM messages ORDER BY seq").fetchall()
    sessions: dict[str, list[str]] = defaultdict(list)
    for session, data in rows:
        sessions[session].append(json.loads(data)["content"])
    return dict(sessions)


def pendingCount(dataDir: str) -> int:
    with sqlite3.connect(os.path.join(dataDir, DATABASE_NAME)) as db:
        return db.execute("SELECT count(*) FROM queue WHERE state = 'pending'").fetchone()[0]


class TwistdTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.client = HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        )

    async def startProcess(self, dataDir: str, *args: str) -> ChatWebProcess:
        process = ChatWebProcess(dataDir, KEY, args=args)
        self.addCleanup(process.stop)
        await process.start()
        return process

    async def waitUntilDelivered(self, dataDir: str) -> None:
        for _ in range(300):
            if await deferToThread(pendingCount, dataDir) == 0:
                return
            await deferLater(reactor, 0.1, lambda: None)
        self.fail("messages still pending")

    async def test_postListPreviewRestart(self) -> None:
        dataDir = os.path.abspath(self.mktemp())
        process = await self.startProcess(dataDir, "--responder", "echo")
        response = await self.client.post(
            process.url + "/",
            json={"session": "ci", "content": "Build completed successfully!"},
            headers=HEADERS,
        )
        self.assertEqual(response.code, 204)
        response = await self.client.get(process.url + "/sessions", headers=HEADERS)
        self.assertEqual(await response.json(), ["ci"])
        response = await self.client.get(process.url + "/session?id=ci", headers=HEADERS)
        self.assertEqual(response.code, 200)
        self.assertIn("Build completed successfully!", await response.text())
        # twistd stops cleanly on SIGTERM, then exits by that signal.
        self.assertIn(await process.stop(), (0, -15))
        self.assertIn("Server Shut Down", process.output)
        self.assertNotIn(KEY, process.output)
        self.assertNotIn("Traceback", process.output)

        again = await self.startProcess(dataDir)
        response = await self.client.get(again.url + "/sessions", headers=HEADERS)
        self.assertEqual(await response.json(), ["ci"])
        response = await self.client.get(again.url + "/session?id=ci", headers=HEADERS)
        page = await response.text()
        self.assertEqual(page.count("Build completed successfully!"), 2)

    async def test_killNineLosesNoAcknowledgedMessage(self) -> None:
        """
        Clients post to several sessions; chatweb is killed with SIGKILL in
        the middle.  After a restart every message that got a 204 is in its
        session exactly once, in each client's posting order.  Twice, killed
        at different moments.
        """
        for killAt in (40, 200):
            await self.killAndCheck(killAt)

    async def killAndCheck(self, killAt: int) -> None:
        dataDir = os.path.abspath(self.mktemp())
        process = await self.startProcess(dataDir)
        acknowledged: list[tuple[str, str]] = []
        sent: list[str] = []
        sessions = [f"s{n}" for n in range(5)]
        killed: Deferred[None] = Deferred()

        async def client(c: int) -> None:
            for seq in range(40):
                if killed.called:
                    return
                session = sessions[(c + seq) % len(sessions)]
                content = f"c{c}-{seq:03d}"
                sent.append(content)
                try:
                    response = await self.client.post(
                        process.url + "/",
                        json={"session": session, "content": content},
                        headers=HEADERS,
                    )
                    await response.content()
                except Exception:
                    return  # the server is gone
                if response.code != 204:
                    return
                acknowledged.append((session, content))
                if len(acknowledged) == killAt and not killed.called:
                    await process.crash()
                    killed.callback(None)

        await gatherResults([Deferred.fromCoroutine(client(c)) for c in range(8)])
        self.assertTrue(killed.called)
        self.assertLess(len(acknowledged), len(sent))

        again = await self.startProcess(dataDir)
        await self.waitUntilDelivered(dataDir)
        await again.stop()
        stored = await deferToThread(readSessions, dataDir)
        everything = [c for contents in stored.values() for c in contents]
        self.assertEqual(len(everything), len(set(everything)), "a message was delivered twice")
        for session, content in acknowledged:
            self.assertIn(content, stored.get(session, []))
        for session, contents in stored.items():
            for c in range(8):
                mine = [x for x in contents if x.startswith(f"c{c}-")]
                self.assertEqual(mine, sorted(mine), session)
        self.assertLessEqual(set(everything), set(sent))


def residentKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class MemoryTests(TestCase):
    timeout = 180

    async def test_floodOfOversizeRequestsKeepsMemoryBounded(self) -> None:
        """
        1,000 requests of 2 MiB (2 GiB in all) against a 1 MiB limit: each
        is refused with a 413, and the server's resident memory grows by
        less than 16 of them would take (allocator noise aside, it does not
        grow with the count: bench/hostile.py measures it at larger counts).
        """
        import socket

        process = ChatWebProcess(os.path.abspath(self.mktemp()), KEY)
        self.addCleanup(process.stop)
        url = await process.start()
        port = int(url.rsplit(":", 1)[1])
        pid = process._process.pid
        body = b"x" * (2 * 1024 * 1024)
        request = (
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )

        def flood(count: int) -> list[bytes]:
            answers = []
            for _ in range(count):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    try:
                        s.sendall(request)
                    except OSError:
                        pass
                    answers.append(s.recv(32))
            return answers

        await deferToThread(flood, 50)
        before = residentKiB(pid)
        answers = await gatherResults([deferToThread(flood, 250) for _ in range(4)])
        after = residentKiB(pid)
        codes = {a[:12] for batch in answers for a in batch}
        self.assertEqual(codes, {b"HTTP/1.1 413"})
        self.assertLess(after - before, 32 * 1024, (before, after))


class StartupFailureTests(TestCase):
    """
    What cannot work is said in one line, with a non-zero exit.
    """

    timeout = 120

    async def exitStatus(self, process: ChatWebProcess) -> int:
        """
        Start C{process}, which should not get far; its exit status.
        """
        try:
            await process.start(timeout=30)
        except RuntimeError:
            pass  # it may end before or after it begins to listen
        return await process.exited()

    async def test_corruptDatabaseExitsNonZero(self) -> None:
        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        with open(os.path.join(dataDir, DATABASE_NAME), "wb") as f:
            f.write(b"this is not a database" * 100)
        process = ChatWebProcess(dataDir, KEY)
        self.assertNotEqual(await self.exitStatus(process), 0)
        errors = [line for line in process.output.splitlines() if line.startswith("chatweb: ")]
        self.assertEqual(len(errors), 1, process.output)
        self.assertIn("database", errors[0])

    async def test_dataDirectoryInUseIsOneLine(self) -> None:
        """
        A second twistd chatweb on a data directory in use exits non-zero,
        saying so in one line; the first goes on.
        """
        dataDir = os.path.abspath(self.mktemp())
        first = ChatWebProcess(dataDir, KEY, testCase=self)
        url = await first.start(timeout=30)
        second = ChatWebProcess(dataDir, KEY)
        self.assertEqual(await self.exitStatus(second), 1)
        errors = [line for line in second.output.splitlines() if "chatweb: cannot" in line]
        self.assertEqual(len(errors), 1, second.output)
        self.assertIn(f"{dataDir} is in use by another chatweb (process ", errors[0])
        self.assertNotIn("Traceback", second.output)
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        response = await client.post(url + "/", json={"session": "s", "content": "x"},
                                     headers={"X-API-Key": KEY})
        self.assertEqual(response.code, 204)

    async def test_portInUseIsOneLine(self) -> None:
        from twisted.internet.protocol import Factory

        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        dataDir = os.path.abspath(self.mktemp())
        process = ChatWebProcess(dataDir, KEY)
        process.listen = f"tcp:{port.getHost().port}:interface=127.0.0.1"
        with self.assertRaises(RuntimeError):
            await process.start(timeout=30)
        self.assertNotEqual(await process.stop(), 0)
        self.assertNotIn("Traceback", process.output)
        self.assertIn("chatweb: cannot listen", process.output)
