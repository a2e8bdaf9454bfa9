"""
The C{chatweb} command against a real chatweb on 127.0.0.1: what a shell
user sees (stdout, one-line errors on stderr, exit status), run as a child
process (C{python -m chatweb}, the same dispatcher as the console script).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from chatweb.testing import startChatWeb
from chatweb.testing._process import _ProcessOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "cli-test-key-0123456789"


class _Run(ProcessProtocol):
    def __init__(self, stdin: bytes | None) -> None:
        self.stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


def _env(url: str | None, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATWEB_")}
    env["PYTHONPATH"] = ROOT
    env["XDG_DATA_HOME"] = "/nonexistent-chatweb-test"
    if url is not None:
        env["CHATWEB_URL"] = url
    if key is not None:
        env["CHATWEB_API_KEY"] = key
    return env


async def chatwebCommand(
    *args: str, url: str | None = None, key: str | None = KEY, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """
    Run C{chatweb ARGS...}; its exit status, stdout and stderr.
    """
    protocol = _Run(stdin)
    command = [sys.executable, "-m", "chatweb", *args]
    reactor.spawnProcess(protocol, command[0], command, env=_env(url, key), path=ROOT)
    code = await protocol.ended
    return code, protocol.out.decode(), protocol.err.decode()


class CommandTests(TestCase):
    async def setUp(self) -> None:
        self.chatweb = await startChatWeb(self, apiKey=KEY, responder="echo")
        self.url = self.chatweb.url

    async def command(self, *args: str, **kwargs: Any) -> tuple[int, str, str]:
        kwargs.setdefault("url", self.url)
        result = await chatwebCommand(*args, **kwargs)
        self.assertNotIn(KEY, result[1] + result[2])
        return result

    def assertOneLineError(self, result: tuple[int, str, str], *words: str) -> None:
        code, out, err = result
        self.assertNotEqual(code, 0)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("chatweb: "), err)
        for word in words:
            self.assertIn(word, err)

    async def messages(self, session: str) -> list[tuple[str | None, str | None]]:
        await self.chatweb.service.queue.whenDelivered()
        found = await self.chatweb.service.adapter.getSession(session)
        return [(m.role, m.content) for m in found.messages] if found else []

    async def test_send(self) -> None:
        code, out, err = await self.command("send", "ci", "hello")
        self.assertEqual((code, err), (0, ""))
        status = await self.chatweb.api.status(int(out))
        self.assertEqual(status.session, "ci")
        self.assertEqual(await self.messages("ci"), [("user", "hello"), ("assistant", "hello")])

    async def test_sendFromStdin(self) -> None:
        code, out, err = await self.command("send", "ci", stdin="line 1\nline 2\n".encode())
        self.assertEqual((code, err), (0, ""))
        self.assertEqual((await self.messages("ci"))[0], ("user", "line 1\nline 2"))
        self.assertOneLineError(await self.command("send", "ci", stdin=b""), "nothing to send")

    async def test_sendWaitPrintsTheAnswer(self) -> None:
        code, out, err = await self.command("send", "--wait", "ci/nightly", "echo me")
        self.assertEqual((code, out, err), (0, "echo me\n", ""))
        code, out, err = await self.command("send", "--wait", "--json", "ci", "again")
        self.assertEqual(json.loads(out)["answers"], ["again"])

    async def test_keyFile(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(KEY + "\n")
        code, out, err = await self.command("sessions", "--key-file", path, key=None)
        self.assertEqual((code, err), (0, ""))

    async def test_errorsAreOneLine(self) -> None:
        self.assertOneLineError(
            await self.command("send", "ci", "x", key="wrong-key"), "401", "X-API-Key"
        )
        self.assertOneLineError(await self.command("send", "ci", "x", key=None), "CHATWEB_API_KEY")
        self.assertOneLineError(
            await self.command("send", "ci", "x", key="s\u00e9cret"), "printable ASCII"
        )
        self.assertOneLineError(
            await self.command("send", "--url", "http://127.0.0.1:1", "ci", "x"), "cannot reach"
        )
        self.assertOneLineError(await self.command("show", "nope"), "404", "nope")
        self.assertOneLineError(await self.command("status", "12345"), "404")
        self.assertEqual(await self.messages("ci"), [])

    async def test_readCommands(self) -> None:
        await self.command("send", "--wait", "ci", "first")
        code, out, _ = await self.command("sessions")
        self.assertEqual(out, "ci\n")
        code, out, _ = await self.command("sessions", "--json")
        self.assertEqual(json.loads(out), ["ci"])
        code, out, _ = await self.command("show", "ci")
        self.assertEqual(out, "[user]\nfirst\n\n[assistant]\nfirst\n")
        code, out, _ = await self.command("show", "ci", "--json")
        self.assertEqual([m["content"] for m in json.loads(out)], ["first", "first"])
        code, out, _ = await self.command("status", "1")
        self.assertIn("delivered", out)
        code, out, _ = await self.command("status", "1", "--json")
        self.assertEqual(json.loads(out)["state"], "delivered")
        code, out, _ = await self.command("share", "ci")
        self.assertTrue(out.startswith(self.url + "/session?id=ci&token="), out)
        response = await self.chatweb.client.get(out.strip())
        self.assertEqual(response.code, 200)
        self.assertIn("first", await response.text())

    async def test_followUntilCtrlC(self) -> None:
        protocol = _ProcessOutput()
        command = [sys.executable, "-m", "chatweb", "follow", "ci"]
        process = reactor.spawnProcess(
            protocol, command[0], command, env=_env(self.url, KEY), path=ROOT
        )
        self.addCleanup(lambda: None if protocol.ended.called else process.signalProcess("KILL"))
        # Streams are open once the server counts them.
        while not self.chatweb.service.api.live.openCount():
            await deferLater(reactor, 0.05)
        await self.chatweb.api.send("ci", "watched")
        await protocol.waitFor(rb"delivery\.done message 1\n")
        process.signalProcess("INT")
        code = await protocol.ended
        self.assertEqual(code, 0, protocol.output)
        lines = protocol.output.decode().splitlines()
        self.assertIn("ci message.added [assistant] watched", " ".join(lines))
        self.assertTrue(lines[-1].endswith("delivery.done message 1"), lines)

    async def test_importAndEnsureKeyStillThere(self) -> None:
        dataDir = os.path.abspath(self.mktemp())
        code, out, err = await self.command("ensure-key", "--data-dir", dataDir)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), os.path.join(dataDir, "api-key"))


class FailureLineTests(TestCase):
    def test_multiLineReasonPrintedOnOneLine(self) -> None:
        """
        A reason that spans lines (a server's or a library's message) is
        still one line on stderr, so scripts can read it.
        """
        import io

        from chatweb.cli import _fail

        stderr = io.StringIO()
        self.assertEqual(_fail(stderr, "500: it broke\n  Traceback:\n\tsomewhere"), 1)
        self.assertEqual(stderr.getvalue(), "chatweb: 500: it broke Traceback: somewhere\n")
