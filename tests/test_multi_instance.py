"""
Three real C{twistd chatweb} instances on one PostgreSQL: clients spread
over them, one instance SIGKILLed at a random moment and restarted.  Every
message that got a 204 is delivered once, answered once, in order; without
a responder (most messages then stored and delivered in one write), each
is delivered once, in order.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from chatweb.testing import ChatWebProcess

from .postgres import freshDatabase

KEY = "multi-instance-key-0123456789"
HEADERS = {"X-API-Key": KEY}

INSTANCES = 3
CLIENTS = 16
MESSAGES = int(os.environ.get("CHATWEB_MULTI_MESSAGES", "2000"))
SESSIONS = 20
LEASE_TTL = 2.0


def readStore(dsn: str) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """
    Every session's (role, content) in order, and how many messages are
    still pending, from the shared database.
    """
    import psycopg

    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "SELECT session, data FROM messages ORDER BY seq"
        ).fetchall()
        pending = connection.execute(
            "SELECT count(*) FROM queue WHERE state = 'pending'"
        ).fetchone()
    sessions: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for session, data in rows:
        message = json.loads(data)
        sessions[session].append((message["role"], message["content"]))
    return dict(sessions), pending[0] if pending else 0


def redeliveries(dsn: str) -> int:
    """
    How many messages had their delivery started more than once (taken
    over from the killed instance).
    """
    import psycopg

    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            "SELECT count(*) FROM (SELECT data::json->>'message' FROM events"
            " WHERE kind = 'delivery.started' GROUP BY 1 HAVING count(*) > 1) AS again"
        ).fetchone()
    return int(row[0]) if row else 0


class KillOneOfThreeTests(TestCase):
    timeout = 240
    #: The instances' --responder: each message answered once, right after it.
    responder = "echo"

    async def test_killedInstanceLosesAndDuplicatesNothing(self) -> None:
        dsn = freshDatabase(self)
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        killAt = rng.randrange(MESSAGES // 5, MESSAGES * 3 // 5)
        victim = rng.randrange(INSTANCES)
        args = ("--database", dsn, "--responder", self.responder, "--interval", "0.5",
                "--lease-ttl", str(LEASE_TTL), "--max-pending", "100000",
                "--max-pending-per-session", "100000", "--rate-limit", "0")
        # The children import this chatweb (the one under test).
        import chatweb

        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(chatweb.__file__)))
        processes = []
        for n in range(INSTANCES):
            process = ChatWebProcess(os.path.abspath(self.mktemp()), KEY, args=args,
                                     env=env, testCase=self)
            await process.start()
            processes.append(process)
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = CLIENTS
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(reactor, pool=pool))
        acknowledged: list[tuple[str, str]] = []
        unanswered: set[str] = set()
        restarted: list[Deferred[None]] = []
        state: dict[str, Any] = {"killed": False}
        perClient = MESSAGES // CLIENTS

        async def killAndRestart() -> None:
            await processes[victim].crash()
            await deferLater(reactor, 0.5, lambda: None)
            again = ChatWebProcess(processes[victim].dataDir, KEY, args=args, env=env,
                                   testCase=self)
            await again.start()
            processes[victim] = again

        async def post(c: int, seq: int, session: str, content: str) -> None:
            # A request to the killed instance goes to another, with the
            # same Idempotency-Key: stored once either way.
            # Each post through the next instance: a client's posts to
            # one session (two in a row) go through two instances.
            instance = (c + seq) % INSTANCES
            for attempt in range(50):
                process = processes[(instance + attempt) % INSTANCES]
                try:
                    response = await client.post(
                        process.url + "/",
                        json={"session": session, "content": content},
                        headers={**HEADERS, "Idempotency-Key": content},
                    )
                    await response.content()
                except Exception:
                    unanswered.add(content)
                    await deferLater(reactor, 0.05, lambda: None)
                    continue
                self.assertEqual(response.code, 204, content)
                acknowledged.append((session, content))
                return
            self.fail(f"{content} never stored")

        async def run(c: int) -> None:
            for seq in range(perClient):
                session = f"s{(c * 7 + seq // 2) % SESSIONS}"
                await post(c, seq, session, f"c{c:02d}-{seq:04d}")
                if len(acknowledged) >= killAt and not state["killed"]:
                    state["killed"] = True
                    restarted.append(Deferred.fromCoroutine(killAndRestart()))

        started = reactor.seconds()
        await gatherResults([Deferred.fromCoroutine(run(c)) for c in range(CLIENTS)])
        posting = reactor.seconds() - started
        await gatherResults(restarted)
        self.assertTrue(state["killed"])

        perMessage = 1 if self.responder == "none" else 2
        for _ in range(1200):
            stored, pending = await deferToThread(readStore, dsn)
            answered = sum(len(v) for v in stored.values())
            if pending == 0 and answered == perMessage * len(acknowledged):
                break
            await deferLater(reactor, 0.1, lambda: None)
        elapsed = reactor.seconds() - started
        again = await deferToThread(redeliveries, dsn)
        print(f"\nseed {seed}: instance {victim} killed after {killAt} messages;"
              f" {len(acknowledged)} posted in {posting:.1f}s, all delivered in"
              f" {elapsed:.1f}s; {len(unanswered)} request(s) met the dead instance;"
              f" {again} delivery(ies) started again after the kill")

        self.assertEqual(len(acknowledged), perClient * CLIENTS)
        users = [c for v in stored.values() for role, c in v if role == "user"]
        self.assertEqual(len(users), len(set(users)), f"a message was delivered twice (seed {seed})")
        self.assertEqual(sorted(users), sorted(c for _, c in acknowledged),
                         f"lost or extra messages (seed {seed})")
        for session, messages in stored.items():
            if perMessage == 2:
                # Each message answered once, right after it (the echo).
                self.assertEqual(messages[1::2], [("assistant", c) for _, c in messages[0::2]])
            asked = messages[0::perMessage]
            self.assertEqual({r for r, _ in asked}, {"user"})
            for c in range(CLIENTS):
                mine = [x for _, x in asked if x.startswith(f"c{c:02d}-")]
                self.assertEqual(mine, sorted(mine), f"{session} out of order (seed {seed})")
        for process in processes:
            self.assertIn(await process.stop(), (0, -15))
            self.assertNotIn("Traceback", process.output)
            self.assertNotIn(KEY, process.output)


class KillOneOfThreeWithoutResponderTests(KillOneOfThreeTests):
    responder = "none"
