"""
chatweb.testing's helpers clean up after the test that uses them.
"""

from __future__ import annotations

import os
import sys
import textwrap

import treq
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import reporter
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.testing import ChatWebProcess, startChatWeb


class StartChatWebTests(TestCase):
    async def test_treqDefaultPool(self) -> None:
        """
        treq's module functions keep connections open in a global pool;
        the helper closes them when the test ends, so trial finds the
        reactor clean (this test errors if it does not).
        """
        chatweb = await startChatWeb(self)
        for _ in range(2):
            response = await treq.get(chatweb.url + "/sessions", headers=chatweb.headers)
            self.assertEqual(await response.json(), [])
        response = await treq.post(
            chatweb.url + "/", json={"session": "ci", "content": "hi"}, headers=chatweb.headers
        )
        self.assertEqual(response.code, 204)


FAILING_TEST = '''
import os
from twisted.trial.unittest import TestCase
from chatweb.testing import ChatWebProcess


class Failing(TestCase):
    async def test_failsBeforeStop(self):
        process = ChatWebProcess(os.path.abspath(self.mktemp()), testCase=self)
        await process.start()
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(process.pid))
        self.fail("failing before stop()")
'''


class ChatWebProcessTests(TestCase):
    async def test_itsOwnKeyWhateverTheShellHas(self) -> None:
        """
        The process takes the key it was given, even with the user's own
        CHATWEB_API_KEY in the environment (a real one, say).
        """
        self.patch(os, "environ", dict(os.environ, CHATWEB_API_KEY="the-users-own-key-123"))
        process = ChatWebProcess(os.path.abspath(self.mktemp()), apiKey="the-tests-key-456",
                                 testCase=self)
        url = await process.start()
        response = await treq.post(url + "/", json={"session": "ci", "content": "hi"},
                                   headers={"X-API-Key": process.apiKey}, persistent=False)
        self.assertEqual(response.code, 204)

    async def test_failingTestLeavesNoTwistd(self) -> None:
        """
        A test that fails before stop() leaves no twistd running once trial
        has exited.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "test_failing.py"), "w") as f:
            f.write(textwrap.dedent(FAILING_TEST))
        pidFile = os.path.join(directory, "pid")
        env = dict(os.environ, PID_FILE=pidFile)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "twisted.trial", "--temp-directory", os.path.join(directory, "_trial_temp"),
             "test_failing"],
            env=env,
            path=directory,
            reactor=reactor,
        ).addTimeout(120, reactor)
        self.assertEqual(code, 1, out + err)
        self.assertIn(b"failing before stop()", out)
        with open(pidFile) as f:
            pid = int(f.read())
        # The child is gone (its parent reaped it, or it was never a zombie
        # of ours): signalling it fails.
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)


class ProcessOutputTests(TestCase):
    def test_portSplitAcrossReads(self) -> None:
        """
        The listening line may arrive in pieces: the port is read once the
        line is whole.
        """
        from chatweb.testing._process import _ProcessOutput

        output = _ProcessOutput()
        process = ChatWebProcess("/nonexistent")
        process._protocol = output
        found = output.waitFor(process.LISTENING)
        output.outReceived(b"... chatweb listening on 127.0.0.1:3")
        self.assertNoResult(found)
        output.outReceived(b"6231\n")
        self.assertEqual(self.successResultOf(found).group(1), b"36231")


class InMemoryTests(SynchronousTestCase):
    def test_stoppedWithTheTest(self) -> None:
        """
        chatWebInMemory's queue stops when the test that made it ends: no
        sweep left on the clock.
        """
        from chatweb.testing import chatWebInMemory

        made = []

        class Inner(SynchronousTestCase):
            def test_it(self) -> None:
                made.append(chatWebInMemory(self))
                made[0].clock.advance(5)

        result = reporter.TestResult()
        Inner("test_it").run(result)
        self.assertTrue(result.wasSuccessful(), result.errors)
        self.assertEqual(made[0].clock.getDelayedCalls(), [])

    def test_runSaysWhenACallWaits(self) -> None:
        from chatweb.testing import chatWebInMemory

        chatweb = chatWebInMemory(self)
        chatweb.journal.failAppends = True  # the store fails: 503, retried on the clock
        with self.assertRaises(AssertionError) as caught:
            chatweb.run(chatweb.client.send("ci", "x"))
        self.assertIn("advance the clock", str(caught.exception))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_pendingLimitsApply(self) -> None:
        """
        limits= holds in memory as in a real service: the pending limits
        too (the queue enforces them), so a test of a client's 429s tests
        something.
        """
        from chatweb.limits import Limits
        from chatweb.testing import MemoryAdapter, chatWebInMemory

        adapter = MemoryAdapter(autoComplete=False)
        chatweb = chatWebInMemory(self, adapter=adapter, limits=Limits(maxPendingPerSession=1))

        async def post(content: str) -> int:
            response = await chatweb.stub.post(
                "http://127.0.0.1/", json={"session": "ci", "content": content},
                headers={"X-API-Key": chatweb.apiKey})
            return int(response.code)

        codes = [chatweb.run(post(str(n))) for n in range(3)]
        self.assertEqual(codes, [204, 429, 429])  # (the one in flight counts)

    def test_eventStreamsSayWhereTheyAre(self) -> None:
        """
        In memory there are no event streams: asking for one says so, rather
        than blaming the session or a mount.
        """
        from chatweb.testing import chatWebInMemory

        chatweb = chatWebInMemory(self)

        async def get(path: str) -> tuple[int, str]:
            response = await chatweb.stub.get(
                "http://127.0.0.1" + path, headers={"X-API-Key": chatweb.apiKey})
            return int(response.code), (await response.json())["error"]

        for path in ("/events", "/sessions/ci/events"):
            code, error = chatweb.run(get(path))
            self.assertEqual(code, 404)
            self.assertIn("this API serves no event streams", error)
            self.assertIn("startChatWeb", error)
