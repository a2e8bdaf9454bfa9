"""
Page workers (chatweb/web/_workers.py): pages, lists and exports read and
rendered in other processes answer as the threads of the server's own
process do, and a worker that dies costs a 503, not the server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web._newclient import ResponseNeverReceived

from chatweb import _priority
from chatweb.testing import startChatWeb
from chatweb.web import _workers
from chatweb.web._workers import PageWorkers, WorkerFailed

#: chat.nvim's kinds of content, as a page shows them.
MESSAGES = [
    ("ci", "Build **passed**:\n\n```python\nprint('ok')\n```"),
    ("ci", "a second message, with <html> & a [link](https://example.com)"),
    ("deploy", "deployed 1.2.3"),
]


def readHere(*args: object) -> None:
    raise AssertionError("read in the server's own process")


class PageWorkersTests(TestCase):
    async def startWithMessages(self, **kwargs: object):  # type: ignore[no-untyped-def]
        chatweb = await startChatWeb(self, pageWorkers=1, **kwargs)
        for session, content in MESSAGES:
            self.assertEqual((await chatweb.post(session, content)).code, 204)
        for n in range(110):
            await chatweb.post("long", f"message {n}")
        await chatweb.service.queue.whenDelivered()
        # Dead letters: one in a session, and one whose session it never
        # reached (pages and the list show both).
        journal = chatweb.service.journal
        for session in ("ci", "lost"):
            failed = await journal.append(session, f"failed in {session}", 0.0)
            await journal.recordFailure(failed.id, "the adapter said no", True)
        return chatweb

    async def answers(self, chatweb, paths):  # type: ignore[no-untyped-def]
        result = []
        for path, headers in paths:
            response = await chatweb.client.get(
                chatweb.url + path, headers={**chatweb.headers, **headers}
            )
            result.append(
                (
                    response.code,
                    response.headers.getRawHeaders(b"content-type"),
                    response.headers.getRawHeaders(b"x-next-cursor"),
                    await response.content(),
                )
            )
        return result

    async def test_sameAnswersAsThreads(self) -> None:
        """
        The session page (and its 404), the list in JSON, the HTML index
        and the export are the same from the workers as from threads; with
        workers the server's own process reads none of them.
        """
        chatweb = await self.startWithMessages()
        api = chatweb.service.api
        html = {"Accept": "text/html"}
        paths = [
            ("/session?id=ci", {}),
            ("/session?id=nobody", {}),
            ("/sessions", {}),
            ("/sessions", html),
            ("/session/raw?id=ci", {}),
            ("/session/raw?id=nobody", {}),
            ("/session?id=long", {}),
            ("/session?id=long&before=10", {}),
            ("/session?id=lost", {}),
            ("/session/raw?id=lost", {}),
            # chat.nvim's session API
            ("/sessions/ci", {}),
            ("/sessions/lost", {}),
            ("/sessions/nobody", {}),
            ("/sessions/long/raw", {}),
            ("/sessions/nobody/raw", {}),
            ("/sessions?detail=1", {}),
            ("/sessions?detail=1&limit=2", {}),
            ("/sessions?detail=1&limit=2&cursor=ZGVwbG95", {}),
            ("/messages?session=long&since=105", {}),
            ("/messages?session=ci", {}),
            ("/messages?session=nobody", {}),
        ]
        workers = api.pageWorkers
        self.assertIsNotNone(workers)
        # What only the server's process knows: a session in progress.
        adapter = chatweb.service.adapter
        self.patch(adapter, "isBusy", lambda sessionId: sessionId == "ci")
        api.pageWorkers = None
        fromThreads = await self.answers(chatweb, paths)
        api.pageWorkers = workers
        self.patch(adapter, "getSessionPage", readHere)
        self.patch(adapter, "getSession", readHere)
        self.patch(adapter, "listSessions", readHere)
        fromWorkers = await self.answers(chatweb, paths)

        def withoutTokens(answers):  # type: ignore[no-untyped-def]
            # Share tokens hold their expiry, in seconds: the two indexes
            # may be a second apart.
            return [(c, t, n, re.sub(rb"token=[\w-]+", b"token=T", b)) for c, t, n, b in answers]

        self.assertEqual(withoutTokens(fromWorkers), withoutTokens(fromThreads))
        codes = [code for code, _, _, _ in fromWorkers]
        self.assertEqual(
            codes, [200, 404, 200, 200, 200, 404, 200, 200, 200, 200]
            + [200, 200, 404, 200, 404, 200, 200, 200, 200, 200, 404]
        )
        body = [b for _, _, _, b in fromWorkers]
        self.assertIn(b"<strong>passed</strong>", body[0])
        self.assertIn(b"failed in ci", body[0])
        self.assertEqual(body[2], b'["ci", "deploy", "long", "lost"]')
        self.assertIn(b"before=10", body[6])
        self.assertIn(b"failed in lost", body[8])
        self.assertIn(b'"in_progress": true', body[10])
        self.assertEqual(fromWorkers[16][2], [b"ZGVwbG95"])  # "deploy", the cursor
        self.assertEqual([d["id"] for d in json.loads(body[17])], ["long", "lost"])
        self.assertEqual(len(json.loads(body[18])), 6)
        self.assertIn(b"no session 'nobody'", body[1])

    async def test_listFollowsChanges(self) -> None:
        """
        The worker keeps the list it last sent; a new session, a new dead
        letter or a new pending message is in the next one.
        """
        chatweb = await self.startWithMessages()

        async def listed() -> list[str]:
            return await (await chatweb.get("/sessions")).json()

        self.assertEqual(await listed(), ["ci", "deploy", "long", "lost"])
        self.assertEqual(await listed(), ["ci", "deploy", "long", "lost"])
        await chatweb.post("new", "hello")
        await chatweb.service.queue.whenDelivered()
        self.assertEqual(await listed(), ["ci", "deploy", "long", "lost", "new"])
        journal = chatweb.service.journal
        failed = await journal.append("zz", "failed", 0.0)
        await journal.recordFailure(failed.id, "the adapter said no", True)
        self.assertEqual((await listed())[-1], "zz")
        self.patch(chatweb.service.queue, "sessionsWithPending", lambda: ["a0"])
        self.assertEqual((await listed())[0], "a0")

    async def test_indexLinksOpenPages(self) -> None:
        """
        The worker signs the index's links with the server's share secret:
        a browser without the key follows one to the session's page.
        """
        chatweb = await self.startWithMessages()
        response = await chatweb.client.get(
            chatweb.url + "/sessions", headers={**chatweb.headers, "Accept": "text/html"}
        )
        index = (await response.text()).replace("&amp;", "&")
        link = re.search(r'href="(/session\?id=deploy&token=[\w-]+)"', index)
        assert link is not None, index
        page = await chatweb.client.get(chatweb.url + link.group(1))
        self.assertEqual(page.code, 200)
        self.assertIn("deployed 1.2.3", await page.text())

    async def test_workerDiesMidRequest(self) -> None:
        """
        A worker killed while it prepares a page: that request gets a 503
        with a JSON error; the next one is answered by a new worker.
        """
        chatweb = await self.startWithMessages()
        workers = chatweb.service.api.pageWorkers
        run = workers.run

        def runThenDie(kind: str, *args: object) -> Deferred[object]:
            answer = run(kind, *args)
            for worker in workers._workers:
                worker.transport.signalProcess("KILL")
            return answer

        self.patch(workers, "run", runThenDie)
        response = await chatweb.get("/session?id=ci")
        self.assertEqual(response.code, 503)
        self.assertIn("unavailable", (await response.json())["error"])
        self.flushLoggedErrors(WorkerFailed)
        self.patch(workers, "run", run)
        response = await chatweb.get("/session?id=ci")
        self.assertEqual(response.code, 200)
        self.assertIn("Build", await response.text())

    async def test_stopEndsTheWorkers(self) -> None:
        """
        When the service stops, its workers exit.
        """
        chatweb = await self.startWithMessages()
        workers = chatweb.service.api.pageWorkers
        pids = [w.transport.pid for w in workers._workers]
        self.assertEqual(len(pids), 1)
        await chatweb.service.stopService()
        self.assertEqual([w.alive for w in workers._workers], [False])
        for pid in pids:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)

    async def test_workersYieldTheCore(self) -> None:
        """
        When the reactor is favoured (as twistd chatweb does), a worker runs
        at a lower priority: on a busy core the reactor's process comes
        first.
        """
        self.patch(_priority, "_favoured", True)
        chatweb = await self.startWithMessages()
        (worker,) = chatweb.service.api.pageWorkers._workers
        self.assertEqual((await chatweb.get("/session?id=ci")).code, 200)
        self.assertEqual(
            os.getpriority(os.PRIO_PROCESS, worker.transport.pid),
            os.getpriority(os.PRIO_PROCESS, 0) + _priority.WORKER_NICENESS,
        )

    async def test_clientGoneKeepsItsPlace(self) -> None:
        """
        A page whose client went away holds its place until the worker
        answers: the worker prepares it anyway, so more requests than the
        limit never pile up in the workers.  Nothing is logged as failed.
        """
        chatweb = await self.startWithMessages()
        api = chatweb.service.api
        for path in ("/session?id=ci", "/messages?session=ci"):
            answer: Deferred[object] = Deferred()
            self.patch(api.pageWorkers, "run", lambda kind, *args: answer)
            request = chatweb.get(path)
            while api._renders.tokens:
                await deferLater(reactor, 0.01)
            request.cancel()
            with self.assertRaises(ResponseNeverReceived):
                await request
            await deferLater(reactor, 0.1)
            self.assertEqual(api._renders.tokens, 0)
            answer.callback(b"late")
            self.assertEqual(api._renders.tokens, 1)


    async def test_clientGoneKeepsItsPlaceOnThreads(self) -> None:
        """
        Without workers, a page whose client went away holds its place
        until its thread is done, as with workers.
        """
        import threading

        from chatweb.web import _pages

        chatweb = await startChatWeb(self)
        for n in range(30):
            await chatweb.post("long", f"message {n}")
        await chatweb.service.queue.whenDelivered()
        api = chatweb.service.api
        release = threading.Event()
        self.addCleanup(release.set)

        def slowRender(*args: object, **kwargs: object) -> str:
            release.wait(30)
            return "<p>page</p>"

        self.patch(_pages, "renderSession", slowRender)
        places = api._renders.tokens
        request = chatweb.get("/session?id=long")
        while api._renders.tokens == places:
            await deferLater(reactor, 0.01)
        request.cancel()
        with self.assertRaises(ResponseNeverReceived):
            await request
        await deferLater(reactor, 0.1)
        self.assertEqual(api._renders.tokens, places - 1)
        release.set()
        for _ in range(500):
            if api._renders.tokens == places:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(api._renders.tokens, places)

    async def test_clientGoneWhileReadingIsNoFailure(self) -> None:
        """
        A request whose client goes away while its session is read is not
        logged as a failure of the backend (trial fails a test that logs
        one).
        """
        chatweb = await startChatWeb(self)
        reading: list[Deferred[object]] = []

        def neverRead() -> Deferred[object]:
            reading.append(Deferred())
            return reading[-1]

        self.patch(chatweb.service.adapter, "listSessions", neverRead)
        request = chatweb.get("/sessions")
        while not reading:
            await deferLater(reactor, 0.01)
        request.cancel()
        with self.assertRaises(ResponseNeverReceived):
            await request
        while not reading[0].called:
            await deferLater(reactor, 0.01)

    async def test_backendsOwnCancellationIsA503(self) -> None:
        """
        A read the backend cancelled itself (its own timeout), for a client
        still there, is a failure of the backend's: a 503, logged.
        """
        chatweb = await startChatWeb(self)
        self.patch(chatweb.service.adapter, "listSessions", lambda: fail(CancelledError()))
        response = await chatweb.get("/sessions")
        self.assertEqual(response.code, 503)
        self.assertIn("unavailable", (await response.json())["error"])
        self.assertEqual(len(self.flushLoggedErrors(CancelledError)), 1)

    async def test_lightReadsDoNotWaitForPages(self) -> None:
        """
        While every worker prepares a page, the reads chat.nvim polls (a
        session's messages and detail, the lists) are read by the server's
        process, as without workers, rather than wait.
        """
        chatweb = await self.startWithMessages()
        api = chatweb.service.api
        page: Deferred[object] = Deferred()
        run = api.pageWorkers.run
        self.patch(api.pageWorkers, "run", lambda kind, *args: page)
        slow = chatweb.get("/session?id=long")
        while api._renders.tokens:
            await deferLater(reactor, 0.01)
        for path in ("/messages?session=ci", "/sessions/ci", "/sessions", "/sessions?detail=1"):
            response = await chatweb.get(path).addTimeout(10, reactor)
            self.assertEqual(response.code, 200, path)
            await response.content()
        self.patch(api.pageWorkers, "run", run)
        page.callback("<html>the long page</html>")
        self.assertEqual(await (await slow).text(), "<html>the long page</html>")

    async def test_newSessionAnsweredWhatever(self) -> None:
        """
        POST /session/new answers with the new session's detail even when
        the page workers cannot: it exists, and a retry would make another.
        """
        chatweb = await self.startWithMessages()
        self.patch(
            chatweb.service.api.pageWorkers, "run",
            lambda kind, *args: fail(WorkerFailed("a worker's trouble")),
        )
        response = await chatweb.client.post(
            chatweb.url + "/session/new", data=b"{}", headers=chatweb.headers
        )
        self.assertEqual(response.code, 200, await response.text())
        self.assertEqual((await response.json())["message_count"], 0)


def _killIfThere(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


#: A server of two workers, which prints their pids (for
#: test_killedServerTakesItsWorkers).
_SERVER = """
import json, sys
from twisted.internet import reactor
from chatweb.web._workers import PageWorkers

def started(_):
    print(json.dumps([w.transport.pid for w in workers._workers]), flush=True)

workers = PageWorkers(reactor, sys.argv[1], 2)
reactor.callWhenRunning(lambda: workers.start().addCallback(started))
reactor.run()
"""


class _ClockedReactor:
    """
    Real processes, with the time of a L{Clock}.
    """

    def __init__(self, clock: Clock) -> None:
        self.spawned = 0
        self.callLater = clock.callLater
        self.seconds = clock.seconds

    def spawnProcess(self, *args: object, **kwargs: object) -> object:
        self.spawned += 1
        return reactor.spawnProcess(*args, **kwargs)  # type: ignore[arg-type]


class PageWorkersUnitTests(TestCase):
    def setUp(self) -> None:
        from chatweb.store._sqlite import SQLiteDatabase

        self.path = os.path.abspath(self.mktemp())
        database = SQLiteDatabase(self.path, reactor)
        self.addCleanup(database.close)
        from chatweb.backends.local import SCHEMA as SESSIONS
        from chatweb.store._journal import SCHEMA as JOURNAL

        return database.open(JOURNAL + SESSIONS)

    def workers(self, processes: int = 1) -> PageWorkers:
        workers = PageWorkers(reactor, self.path, processes)
        self.addCleanup(workers.stop)
        return workers

    async def test_answersInOrder(self) -> None:
        """
        Many requests at once to one worker: each gets its own answer.
        """
        workers = self.workers()
        answers = [workers.run("ids", [f"s{n}"]) for n in range(20)]
        page = workers.run("page", "nobody", None, "/session?id=nobody")
        self.assertEqual([await a for a in answers], [b'["s%d"]' % n for n in range(20)])
        self.assertIsNone(await page)

    async def test_failureIsReported(self) -> None:
        """
        What a worker raises fails that request only.
        """
        workers = self.workers()
        with self.assertRaises(WorkerFailed) as raised:
            await workers.run("missing")
        self.assertIn("AttributeError", str(raised.exception))
        self.assertEqual(await workers.run("ids", []), b"[]")

    async def test_killedWorkerIsReplaced(self) -> None:
        workers = self.workers()
        workers.start()
        (first,) = workers._workers
        answer = workers.run("ids", [])
        first.transport.signalProcess("KILL")
        with self.assertRaises(WorkerFailed):
            await answer
        self.assertEqual(await workers.run("ids", ["x"]), b'["x"]')
        (second,) = workers._workers
        self.assertIsNot(second, first)

    async def test_requestsSpreadOverWorkers(self) -> None:
        workers = self.workers(processes=2)
        answers = [workers.run("ids", []) for n in range(4)]
        self.assertEqual(len(workers._workers), 2)
        self.assertEqual([len(w.waiting) for w in workers._workers], [2, 2])
        for a in answers:
            await a

    async def test_relativePathFromWhereItStarts(self) -> None:
        """
        A relative path is taken from the working directory when a worker
        starts, as the database's own is when it opens (twistd may change
        directory after the service is made).
        """
        here = os.getcwd()
        self.addCleanup(os.chdir, here)
        workers = PageWorkers(reactor, os.path.basename(self.path))
        self.addCleanup(workers.stop)
        os.chdir(os.path.dirname(self.path))
        await workers.start()
        self.assertEqual(await workers.run("ids", []), b"[]")
        # One started again later opens the same file, wherever the
        # program has gone since.
        os.chdir(here)
        (first,) = workers._workers
        first.transport.signalProcess("KILL")
        await first.ended
        self.assertEqual(await workers.run("ids", []), b"[]")

    async def test_importsNothingFromTheWorkingDirectory(self) -> None:
        """
        A module in the server's working directory does not replace one of
        the worker's.
        """
        here = os.getcwd()
        self.addCleanup(os.chdir, here)
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        with open(os.path.join(elsewhere, "json.py"), "w") as f:
            f.write("raise ImportError('not this json')\n")
        os.chdir(elsewhere)
        workers = self.workers()
        await workers.start()
        self.assertEqual(await workers.run("ids", ["a"]), b'["a"]')

    async def test_missingDatabaseNotCreated(self) -> None:
        """
        A worker that cannot open the database does not create it, and is
        not started again at every request: the requests fail at once.
        """
        missing = os.path.abspath(self.mktemp())
        workers = PageWorkers(reactor, missing)
        self.addCleanup(workers.stop)
        await workers.start()
        self.assertFalse(os.path.exists(missing))
        self.assertEqual(workers._workers[0].alive, False)
        with self.assertRaises(WorkerFailed) as raised:
            await workers.run("ids", [])
        self.assertIn("no page worker could start", str(raised.exception))
        self.assertEqual([w.alive for w in workers._workers], [])

    async def test_keysStayHome(self) -> None:
        """
        A worker's environment holds none of the server's keys.
        """
        if not os.path.exists("/proc/self/environ"):
            raise SkipTest("reads /proc")
        environ = dict(os.environ, CHATWEB_API_KEY="api-key-0123456789", PGPASSWORD="pw")
        self.patch(os, "environ", environ)
        workers = self.workers()
        await workers.start()
        (worker,) = workers._workers
        with open(f"/proc/{worker.transport.pid}/environ", "rb") as f:
            seen = f.read()
        self.assertNotIn(b"api-key-0123456789", seen)
        self.assertNotIn(b"PGPASSWORD", seen)
        self.assertIn(b"PATH=", seen)

    async def test_interruptIgnored(self) -> None:
        """
        Ctrl-C (SIGINT to the process group) leaves the workers to the
        server, which stops them once they have answered.
        """
        workers = self.workers()
        await workers.start()
        (worker,) = workers._workers
        os.kill(worker.transport.pid, signal.SIGINT)
        os.kill(worker.transport.pid, signal.SIGTERM)
        self.assertEqual(await workers.run("ids", []), b"[]")
        self.assertTrue(worker.alive)

    async def test_killedServerTakesItsWorkers(self) -> None:
        """
        A server killed outright (SIGKILL: it cannot stop them) does not
        leave its workers behind, even those that could not notice it (busy
        with a page; here, stopped).
        """
        import subprocess
        import time

        server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, self.path],
            stdout=subprocess.PIPE, text=True,
        )
        self.addCleanup(server.wait)
        self.addCleanup(server.kill)
        line = await deferToThread(server.stdout.readline)  # type: ignore[union-attr]
        pids = json.loads(line)
        self.assertEqual(len(pids), 2)
        for pid in pids:
            self.addCleanup(_killIfThere, pid)
            os.kill(pid, signal.SIGSTOP)
        server.kill()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        deadline = time.monotonic() + 10
        while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([gone(pid) for pid in pids], [True, True])

    async def test_readyWorkerPreferred(self) -> None:
        """
        While a new worker starts, requests go to one that is ready.
        """
        workers = self.workers(processes=2)
        await workers.start()
        first, second = workers._workers
        second.transport.signalProcess("KILL")
        await second.ended
        answers = [workers.run("ids", []), workers.run("ids", [])]
        replacement = workers._workers[-1]
        self.assertIsNot(replacement, second)
        self.assertEqual((len(first.waiting), len(replacement.waiting)), (2, 0))
        for answer in answers:
            await answer

    async def test_noProcessLeft(self) -> None:
        """
        When the system will not start a worker (no file descriptor or
        process left), requests fail at once, and it is not tried again at
        every request.
        """
        workers = self.workers()
        await workers.start()
        (worker,) = workers._workers
        worker.transport.signalProcess("KILL")
        await worker.ended
        tried = []

        def spawnProcess(*args: object, **kwargs: object) -> None:
            tried.append(args)
            raise OSError(24, "Too many open files")

        self.patch(reactor, "spawnProcess", spawnProcess)
        for n in range(3):
            with self.assertRaises(WorkerFailed):
                await workers.run("ids", [])
        self.assertEqual(len(tried), 1)

    async def test_workerThatKeepsExitingWaits(self) -> None:
        """
        A worker that exits unasked once it is ready (killed for its memory
        on every view of one page, say) is replaced at once the first time;
        if its replacement does too, requests fail at once until a delay has
        passed, twice as long each time, rather than paying for a new
        process at every request.  Failures far apart start again from the
        first.
        """
        clock = Clock()
        clocked = _ClockedReactor(clock)
        workers = PageWorkers(clocked, self.path)
        self.addCleanup(workers.stop)
        await workers.start()

        async def crash() -> None:
            (worker,) = workers._workers
            await worker.readied
            worker.transport.signalProcess("KILL")
            await worker.ended

        await crash()
        self.assertEqual(await workers.run("ids", ["replaced at once"]), b'["replaced at once"]')
        await crash()
        for delay in (1.0, 2.0):
            spawned = clocked.spawned
            with self.assertRaises(WorkerFailed) as raised:
                await workers.run("ids", [])
            self.assertIn("could start or stay up", str(raised.exception))
            clock.advance(delay - 0.01)
            with self.assertRaises(WorkerFailed):
                await workers.run("ids", [])
            self.assertEqual(clocked.spawned, spawned)
            clock.advance(0.01)
            self.assertEqual(await workers.run("ids", ["after"]), b'["after"]')
            await crash()
        self.assertEqual(clocked.spawned, 4)
        clock.advance(_workers.FAILURES_APART + 5)
        self.assertEqual(await workers.run("ids", ["again"]), b'["again"]')
        await crash()
        self.assertEqual(await workers.run("ids", ["at once"]), b'["at once"]')

    async def test_neverReadyIsKilled(self) -> None:
        """
        A worker that is not ready in time is killed, as one that could not
        start: start() does not wait for ever, nor do requests.
        """
        self.patch(_workers, "_BOOT", "import time; time.sleep(60)")
        self.patch(_workers, "READY_TIMEOUT", 0.5)
        workers = self.workers()
        await workers.start().addTimeout(10, reactor)
        self.assertEqual([w.alive for w in workers._workers], [False])
        with self.assertRaises(WorkerFailed):
            await workers.run("ids", [])

    async def test_stoppedRefuses(self) -> None:
        workers = self.workers()
        await workers.stop()
        with self.assertRaises(WorkerFailed):
            await workers.run("ids", [])
