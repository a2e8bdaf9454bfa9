"""
The examples in docs/ work as documented.
"""

from __future__ import annotations

import importlib.util
import os

import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from chatweb import ISessionAdapter
from chatweb.web import ChatWebSite
from chatweb.testing import startChatWeb

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples", "notes_adapter.py")


def loadExample():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("notes_adapter", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NotesAdapterTests(TestCase):
    async def test_customAdapterServesTheAPI(self) -> None:
        adapter = loadExample().NotesAdapter(reactor)
        verifyObject(ISessionAdapter, adapter)
        chatweb = await startChatWeb(self, adapter=adapter)
        for n in range(3):
            response = await chatweb.post("notes", f"note {n}")
            self.assertEqual(response.code, 204)
        # The adapter is busy for half a second per message: the queue holds
        # the rest and delivers each the moment the session is idle.
        self.assertTrue(adapter.isBusy("notes"))
        await chatweb.service.queue.whenDelivered()
        session = await adapter.getSession("notes")
        self.assertEqual([m.content for m in session.messages], ["note 0", "note 1", "note 2"])
        response = await chatweb.get("/sessions")
        self.assertEqual(await response.json(), ["notes"])
        response = await chatweb.get("/session?id=notes")
        self.assertIn("note 2", await response.text())


EMBEDDED = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples", "embedded_site.py"
)
KEY = "embedded-test-key"


def loadEmbedded():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("embedded_site", EMBEDDED)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EmbeddedSiteTests(TestCase):
    """
    docs/examples/embedded_site.py: chatweb mounted at /chat/ of a program's
    own site, as docs/embedding.md shows it.
    """

    #: Whether ChatWebSite finds the mount and the API by itself.
    autoMount = False

    async def startProgram(self) -> str:
        from chatweb.web._twisted_compat import listeningDeferred

        example = loadEmbedded()
        program = example.makeService(
            [KEY], os.path.abspath(self.mktemp()), "tcp:0:interface=127.0.0.1"
        )
        chatweb, web = list(program)
        if self.autoMount:
            web.factory = ChatWebSite(example.makeRoot(chatweb), limits=chatweb.limits)
            self.assertEqual(web.factory.mount, [b"chat"])
        program.startService()
        self.addCleanup(self.stopProgram, program, web.factory)
        await chatweb.ready
        port = await listeningDeferred(web)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def stopProgram(self, program, site) -> None:  # type: ignore[no-untyped-def]
        await site.closeConnections()
        await program.stopService()

    async def test_programRoutesKeepTheirOwnRules(self) -> None:
        url = await self.startProgram()
        response = await treq.get(url + "/", pool=self.pool)
        self.assertEqual((response.code, await response.text()), (200, "my program\n"))
        # No key, and larger than chatweb's body limit: the program's route
        # takes it.
        body = b"x" * (2 * 1024 * 1024)
        response = await treq.post(url + "/upload", data=body, pool=self.pool)
        self.assertEqual(
            (response.code, await response.text()), (200, f"{len(body)} bytes\n")
        )

    async def test_chatwebRulesUnderItsMount(self) -> None:
        url = await self.startProgram()
        auth = {"X-API-Key": KEY}
        response = await treq.post(
            url + "/chat/", json={"session": "ci", "content": "hi"}, headers=auth, pool=self.pool
        )
        self.assertEqual(response.code, 204)
        await response.content()
        response = await treq.post(
            url + "/chat/", json={"session": "ci", "content": "hi"}, pool=self.pool
        )
        self.assertEqual(response.code, 401)
        self.assertIn("X-API-Key", (await response.json())["error"])
        response = await treq.post(
            url + "/chat/", data=b"x" * (2 * 1024 * 1024), headers=auth, pool=self.pool
        )
        self.assertEqual(response.code, 413)
        await response.content()

    async def test_nothingUnderTheMountIs500(self) -> None:
        url = await self.startProgram()
        auth = {"X-API-Key": KEY}
        for method, path in [
            ("POST", "/chat"),
            ("GET", "/chat"),
            ("HEAD", "/chat"),
            ("GET", "/chat//"),
            ("GET", "/chat//sessions"),
            ("GET", "/chat/session//raw"),
            ("POST", "/chat/session//share"),
            ("GET", "/chat/sessions/"),
            ("DELETE", "/chat/queue/\u0661"),
            ("POST", "/chat/queue/\uff11/retry"),
        ]:
            response = await treq.request(
                method, url + path, json={"session": "ci", "content": "hi"}, headers=auth,
                pool=self.pool,
            )
            self.assertLess(response.code, 500, (method, path))
            self.assertEqual(
                response.headers.getRawHeaders("content-type"), ["application/json"]
            )
            await response.content()


class EmbeddedSiteAutoMountTests(EmbeddedSiteTests):
    """
    The same, with C{ChatWebSite(root)} finding where chatweb's resource was
    put and its API.
    """

    autoMount = True


WAIT_FOR_ANSWER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples", "wait_for_answer.py"
)


class WaitForAnswerTests(TestCase):
    async def test_postAndWaitForTheAnswer(self) -> None:
        """
        docs/examples/wait_for_answer.py (docs/api.md) posts a message and
        returns the echoed answer, for a session whose id holds '/'.
        """
        from twisted.internet.threads import deferToThread

        spec = importlib.util.spec_from_file_location("wait_for_answer", WAIT_FOR_ANSWER)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        chatweb = await startChatWeb(self, responder="echo")
        answers = await deferToThread(
            module.ask, chatweb.url, chatweb.apiKey, "ci/nightly", "hello there"
        )
        self.assertEqual(len(answers), 1)
        self.assertIn("hello there", answers[0])


EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _processesMentioning(text: str) -> list[int]:
    """
    The ids of the running processes whose command line holds C{text}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


class UserTrialExampleTests(TestCase):
    """
    docs/examples/test_with_chatweb.py, run as a user runs it: trial, in a
    directory of its own.
    """

    async def runExample(self, replace: tuple[str, str] | None = None) -> tuple[int, str, str]:
        from twisted.internet.utils import getProcessOutputAndValue
        import sys

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(EXAMPLES, "test_with_chatweb.py"), encoding="utf-8") as f:
            source = f.read()
        if replace is not None:
            self.assertIn(replace[0], source)
            source = source.replace(*replace)
        with open(os.path.join(directory, "test_with_chatweb.py"), "w", encoding="utf-8") as f:
            f.write(source)
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "twisted.trial", "test_with_chatweb"],
            env=env, path=directory, reactor=reactor,
        ).addTimeout(180, reactor)
        self.assertEqual(_processesMentioning(directory), [])
        return code, out.decode(), err.decode()

    async def test_runsGreen(self) -> None:
        code, out, err = await self.runExample()
        self.assertEqual(code, 0, out + err)
        self.assertIn("test_busySessionIsDeliveredByTheSweep ...", out)
        self.assertIn("PASSED (successes=4)", out)

    async def test_failingTestLeavesNoProcess(self) -> None:
        """
        The user's twistd test fails after its process started: trial
        reports the failure, and no twistd of that test is left running.
        """
        code, out, err = await self.runExample(
            ('self.assertEqual(answer.texts, ("hello from a child",))',
             'self.assertEqual(answer.texts, ("another answer",))')
        )
        self.assertEqual(code, 1, out + err)
        self.assertIn("another answer", out)
        self.assertIn("FAILED (failures=1, successes=3)", out)


def loadLinechat():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "linechat", os.path.join(EXAMPLES, "linechat.py")
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LinechatTests(TestCase):
    """
    docs/examples/linechat.py: a line-based chat server that gains chatweb,
    its rooms as sessions, mounted under /chat/.
    """

    async def test_postedMessageWaitsForTheFloor(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.defer import Deferred as D
        from twisted.protocols.basic import LineReceiver
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        from chatweb.client import ChatWebClient
        from chatweb.web._twisted_compat import listeningDeferred

        example = loadLinechat()
        program = example.makeService(
            [KEY], os.path.abspath(self.mktemp()),
            "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1",
        )
        chatServer, chatweb, web = list(program)
        program.startService()
        self.addCleanup(program.stopService)
        self.addCleanup(web.factory.closeConnections)
        await chatweb.ready
        chatPort = (await listeningDeferred(chatServer)).getHost().port
        webPort = (await listeningDeferred(web)).getHost().port

        class Alice(LineReceiver):
            delimiter = b"\n"

            def connectionMade(self) -> None:
                self.lines: list[str] = []
                self.waiting: list[tuple[str, D]] = []

            def lineReceived(self, line: bytes) -> None:
                self.lines.append(line.decode())
                for text, d in list(self.waiting):
                    if text in line.decode():
                        self.waiting.remove((text, d))
                        d.callback(None)

            def waitFor(self, text: str) -> D:
                d: D = D()
                self.waiting.append((text, d))
                if any(text in line for line in self.lines):
                    self.waiting.remove((text, d))
                    d.callback(None)
                return d.addTimeout(30, reactor)

        alice = Alice()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", chatPort), alice)
        self.addCleanup(alice.transport.loseConnection)
        alice.sendLine(b"alice")
        await alice.waitFor("you are in lobby")
        alice.sendLine(b"/join ops")
        await alice.waitFor("you are in ops")
        alice.sendLine(b"/hold")
        await alice.waitFor("alice holds the floor")

        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        client = ChatWebClient(f"http://127.0.0.1:{webPort}/chat", KEY, http=http)
        sent = await client.send("ops", "deploy finished")
        # A sender that can only post text, with the key as a bearer token.
        response = await http.post(
            f"http://127.0.0.1:{webPort}/chat/sessions/ops/messages",
            data=b"second", headers={"Authorization": "Bearer " + KEY},
        )
        self.assertEqual(response.code, 204)
        self.assertEqual((await client.status(sent.messageId)).state, "pending")
        self.assertFalse([line for line in alice.lines if "<chatweb>" in line])

        alice.sendLine(b"/release")
        await alice.waitFor("<chatweb> second")
        said = [line for line in alice.lines if line.startswith("<chatweb>")]
        self.assertEqual(said, ["<chatweb> deploy finished", "<chatweb> second"])
        self.assertEqual((await client.status(sent.messageId)).state, "delivered")
        self.assertEqual(await client.sessions(), ["ops"])
        messages = await client.messages("ops")
        self.assertEqual(messages[-1].content, "chatweb: second")
        response = await http.get(f"http://127.0.0.1:{webPort}/")
        self.assertIn(b"linechat", await response.content())
