"""
A user's own trial tests, written with chatweb.testing: run them with

    python -m twisted.trial test_with_chatweb    (or: trial ./test_with_chatweb.py)

from the directory that holds it (tests/test_examples.py does, from a fresh
directory, as a user would).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.client import ChatWebClient, UnknownSession
from chatweb.testing import ChatWebProcess, chatWebInMemory, startChatWeb


class BusySessionTests(SynchronousTestCase):
    """
    chatweb in memory, on a task.Clock: the 5-second sweep is stepped by
    advancing the clock, nothing waits for real time.
    """

    def test_busySessionIsDeliveredByTheSweep(self) -> None:
        chatweb = chatWebInMemory(self)
        chatweb.adapter.setBusy("ci")  # someone is working in the session
        sent = chatweb.run(chatweb.client.send("ci", "Build completed successfully!"))
        self.assertEqual(chatweb.run(chatweb.client.status(sent.messageId)).state, "pending")

        chatweb.clock.advance(5)  # a sweep: still busy, so it waits
        self.assertEqual(chatweb.adapter.contents("ci"), [])

        # Idle again, without telling anyone: the next sweep finds out.
        chatweb.adapter.setBusy("ci", False, notify=False)
        chatweb.clock.advance(4.9)
        self.assertEqual(chatweb.adapter.contents("ci"), [])
        chatweb.clock.advance(0.1)
        self.assertEqual(chatweb.adapter.contents("ci"), ["Build completed successfully!"])
        self.assertEqual(chatweb.run(chatweb.client.status(sent.messageId)).state, "delivered")

    def test_unknownSession(self) -> None:
        chatweb = chatWebInMemory(self)
        with self.assertRaises(UnknownSession):
            chatweb.run(chatweb.client.session("nope"))


class RealServerTests(TestCase):
    async def test_answerFromTheEchoResponder(self) -> None:
        # In this process, on a free port of 127.0.0.1; stopped with the test.
        chatweb = await startChatWeb(self, responder="echo")
        answer = await chatweb.api.ask("ci", "hello")
        self.assertEqual(answer.texts, ("hello",))

    async def test_realTwistd(self) -> None:
        # The real `twistd -n chatweb` as a child process, stopped when the
        # test ends, even when it fails first.
        process = ChatWebProcess(
            os.path.abspath(self.mktemp()), apiKey="k", args=["--responder", "echo"],
            testCase=self,
        )
        url = await process.start()
        client = ChatWebClient(url, "k")
        self.addCleanup(client.close)
        answer = await client.ask("ci", "hello from a child")
        self.assertEqual(answer.texts, ("hello from a child",))
