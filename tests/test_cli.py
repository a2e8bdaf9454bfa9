"""
The C{chatweb} command against a real chatweb on 127.0.0.1: what a shell
user sees (stdout, one-line errors on stderr, exit status), run as a child
process (C{python -m chatweb}, the same dispatcher as the console script).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
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
        # A Windows program's final line end is one too; only one goes.
        code, out, err = await self.command("send", "win", stdin=b"crlf\r\n")
        code, out, err = await self.command("send", "win", stdin=b"two\n\n")
        code, out, err = await self.command("send", "win", stdin=b"three\n\r\n")
        sent = [content for role, content in await self.messages("win") if role == "user"]
        self.assertEqual(sent, ["crlf", "two\n", "three\n"])
        self.assertOneLineError(await self.command("send", "ci", stdin=b""), "nothing to send")

    async def test_sendWaitPrintsTheAnswer(self) -> None:
        code, out, err = await self.command("send", "--wait", "ci/nightly", "echo me")
        self.assertEqual((code, out, err), (0, "echo me\n", ""))
        code, out, err = await self.command("send", "--wait", "--json", "ci", "again")
        self.assertEqual(json.loads(out)["answers"], ["again"])
        # With a key, a second run (a CI job run again) queues nothing.
        for run in range(2):
            code, out, err = await self.command(
                "send", "--wait", "--json", "--idempotency-key", "job-7", "keyed", "once")
            self.assertEqual((code, json.loads(out)["answers"]), (0, ["once"]))
            self.assertEqual(json.loads(out)["message_id"], 3)
        self.assertEqual(await self.messages("keyed"), [("user", "once"), ("assistant", "once")])
        # The answer is text to show: no control character reaches the terminal.
        code, out, err = await self.command("send", "--wait", "esc", "x\x1b]0;title\x07y")
        self.assertEqual(out, "x\\x1b]0;title\\x07y\n")

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

    async def test_optionsBeforeTheCommand(self) -> None:
        """
        The client options work before the command too (C{chatweb --url URL
        send ...}); given on both sides, the one after the command wins.
        Before a command that is not a client's, they are a usage error.
        """
        keyFile = os.path.abspath(self.mktemp())
        with open(keyFile, "w") as f:
            f.write(KEY + "\n")
        code, out, err = await chatwebCommand(
            "--url", self.url, "--key-file", keyFile, "--timeout", "5", "send", "ci", "before",
            url="http://127.0.0.1:1", key=None,
        )
        self.assertEqual((code, err), (0, ""))
        code, out, err = await self.command("--json", "sessions")
        self.assertEqual((code, json.loads(out), err), (0, ["ci"], ""))
        self.assertOneLineError(
            await self.command("--url", self.url, "sessions", "--url", "http://127.0.0.1:1"),
            "cannot reach chatweb at http://127.0.0.1:1",
        )
        code, out, err = await self.command("--url", "http://127.0.0.1:1", "sessions",
                                            "--url", self.url)
        self.assertEqual((code, out), (0, "ci\n"))
        code, out, err = await self.command("--timeout", "-1", "sessions")
        self.assertEqual(code, 2)
        self.assertIn("not a number of seconds above 0", err)
        code, out, err = await self.command(
            "--json", "ensure-key", "--data-dir", os.path.abspath(self.mktemp()))
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--json: options of the client commands, not of ensure-key", err)

    def test_followLinesSplitAsAShellWould(self) -> None:
        """
        Each line of C{follow} splits into its event id, session id and
        kind as a shell splits words, whatever the session's id.
        """
        from chatweb.cli import _describe
        from chatweb.client import StreamEvent

        for session in ["ci", "ci/nightly", "2024-01-15-10-30-00", "ci nightly", "it's",
                        "caf\u00e9", ""]:
            event = StreamEvent(7, "message.queued", session, 0.0, {"message": 3})
            line = _describe(event)
            self.assertEqual(shlex.split(line), ["7", session, "message.queued", "message", "3"])
            if session in ("ci", "ci/nightly"):
                self.assertEqual(line, f"7 {session} message.queued message 3")

    async def test_outputWhoseEncodingLacksACharacter(self) -> None:
        """
        Output to an encoding without a message's characters (ASCII) writes
        them as escapes rather than failing.
        """
        import subprocess

        await self.command("send", "café", "crème brûlée")
        env = dict(_env(self.url, KEY), PYTHONIOENCODING="ascii")
        for args in (["sessions"], ["show", "café"]):
            done = await deferToThread(
                subprocess.run, [sys.executable, "-m", "chatweb", *args], env=env, cwd=ROOT,
                capture_output=True, timeout=60,
            )
            self.assertEqual((done.returncode, done.stderr), (0, b""), args)
        self.assertTrue(done.stdout.startswith(b"[user]\ncr\\xe8me br\\xfbl\\xe9e\n"), done.stdout)

    async def test_readerThatStopsReading(self) -> None:
        """
        Output piped to a reader that stops early (C{| head -1}) ends the
        command quietly, with status 0: no traceback.
        """
        import subprocess

        await self.command("send", "--wait", "ci", "first")
        command = [sys.executable, "-m", "chatweb", "follow", "--last-event-id", "0"]
        process = subprocess.Popen(command, env=_env(self.url, KEY), cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: process.poll() is not None or process.kill())
        assert process.stdout is not None and process.stderr is not None
        line = await deferToThread(process.stdout.readline)
        self.assertIn(b"message.queued", line)
        process.stdout.close()
        # The next event is written to a pipe nobody reads.
        await self.command("send", "ci", "second")
        code = await deferToThread(process.wait, 30)
        self.assertEqual((code, process.stderr.read()), (0, b""))

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

    async def test_textBeyondASCIIWithinTheLimit(self) -> None:
        """
        A message of 400,000 bytes of UTF-8 is sent as such: escaped (each
        character 6 bytes), it would pass the server's 1 MiB body limit.
        """
        text = "\u00e9" * 200_000
        code, out, err = await self.command("send", "big", stdin=text.encode("utf-8"))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(await self.messages("big"), [("user", text), ("assistant", text)])

    async def test_stdinNotUTF8(self) -> None:
        self.assertOneLineError(
            await self.command("send", "ci", stdin=b"caf\xe9\n"), "not valid UTF-8"
        )
        self.assertEqual(await self.messages("ci"), [])

    async def test_controlCharactersShownAsEscapes(self) -> None:
        """
        C{show} prints a message's control characters as escapes: no
        sender can drive the reader's terminal.  C{--json} keeps them.
        """
        await self.command("send", "--wait", "ci", "\x1b[31mred\x1b[0m\x07 and\ttab")
        code, out, _ = await self.command("show", "ci")
        self.assertNotIn("\x1b", out)
        self.assertIn("\\x1b[31mred\\x1b[0m\\x07 and\ttab", out)
        code, out, _ = await self.command("show", "ci", "--json")
        self.assertEqual(json.loads(out)[0]["content"], "\x1b[31mred\x1b[0m\x07 and\ttab")

    async def test_badURLOrTimeout(self) -> None:
        for url in ["127.0.0.1:7777", "ftp://127.0.0.1/", "http://"]:
            self.assertOneLineError(
                await self.command("sessions", "--url", url), "not an http:// or https:// URL"
            )
        # What used to reach the HTTP client and end in a traceback.
        for url, said in [
            ("http://127.0.0.1:99999", "(Port out of range 0-65535)"),
            ("http://admin:hunter2@127.0.0.1:7777",
             "a URL with a user name or password: http://127.0.0.1:7777 (the API key goes in"
             " --key-file or $CHATWEB_API_KEY)"),
            ("http://127.0.0.1 :7777", "not a host name or address in"),
            ("http://a..b/", "cannot use the URL http://a..b: Empty Label"),
        ]:
            result = await self.command("sessions", "--url", url)
            self.assertOneLineError(result, said)
            self.assertNotIn("hunter2", result[2])
        code, out, err = await self.command("sessions", "--timeout", "-1")
        self.assertEqual(code, 2)
        self.assertIn("not a number of seconds above 0", err)

    async def test_importAndEnsureKeyStillThere(self) -> None:
        dataDir = os.path.abspath(self.mktemp())
        code, out, err = await self.command("ensure-key", "--data-dir", dataDir)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), os.path.join(dataDir, "api-key"))


class _Silent(Protocol):
    """
    Takes a request and never answers.
    """

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.callback(None) if not self.factory.received.called else None


class SilentServerTests(TestCase):
    """
    Against a server that takes connections and never answers.
    """

    async def setUp(self) -> None:
        from twisted.internet.protocol import Factory

        factory = Factory.forProtocol(_Silent)
        factory.received = Deferred()  # type: ignore[attr-defined]
        self.received = factory.received  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    async def test_noAnswerWithinTheTimeout(self) -> None:
        """
        Every command gives up after C{--timeout} seconds, saying so; an
        event stream (C{follow}, C{send --wait}) too, for its start.
        """
        for args in [("sessions",), ("follow", "ci"), ("send", "--wait", "ci", "x")]:
            code, out, err = await chatwebCommand(*args, "--timeout", "0.5", url=self.url)
            self.assertEqual((code, out), (1, ""), args)
            self.assertEqual(err, f"chatweb: no answer from chatweb at {self.url} within 0.5 s\n")

    async def test_ctrlCWhileSending(self) -> None:
        """
        Ctrl-C while a message is being sent: one line saying it may have
        been queued, and status 130 (a shell's loop stops too).
        """
        protocol = _Run(None)
        command = [sys.executable, "-m", "chatweb", "send", "ci", "x"]
        process = reactor.spawnProcess(
            protocol, command[0], command, env=_env(self.url, KEY), path=ROOT
        )
        self.addCleanup(lambda: None if protocol.ended.called else process.signalProcess("KILL"))
        await self.received
        process.signalProcess("INT")
        self.assertEqual(await protocol.ended, 130)
        self.assertEqual(protocol.out, b"")
        self.assertEqual(
            protocol.err.decode(),
            "chatweb: interrupted: the message may or may not have been queued (give"
            " --idempotency-key to make sending it again safe)\n",
        )

    async def test_ctrlCWhileFollowOpens(self) -> None:
        """
        Ctrl-C ends C{follow} with status 0 and nothing on stderr, also
        before its stream has opened.
        """
        protocol = _Run(None)
        command = [sys.executable, "-m", "chatweb", "follow"]
        process = reactor.spawnProcess(
            protocol, command[0], command, env=_env(self.url, KEY), path=ROOT
        )
        self.addCleanup(lambda: None if protocol.ended.called else process.signalProcess("KILL"))
        await self.received
        process.signalProcess("INT")
        self.assertEqual((await protocol.ended, protocol.out, protocol.err), (0, b"", b""))


class StdinTests(TestCase):
    def test_endlessInputRefused(self) -> None:
        """
        Input on stdin past C{MAX_STDIN} bytes is refused (an endless
        input, C{yes | chatweb send}, would fill the memory).
        """
        import argparse
        import io
        import types

        from chatweb import cli

        self.patch(cli, "MAX_STDIN", 10)
        for data, text in [(b"0123456789", "0123456789"), (b"012345678\n", "012345678")]:
            args = argparse.Namespace(text=None)
            self.patch(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))
            cli._readText(args)
            self.assertEqual(args.text, text)
        self.patch(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"y\n" * 100)))
        with self.assertRaises(cli.UsageError) as raised:
            cli._readText(argparse.Namespace(text=None))
        self.assertIn("larger than 10 bytes", str(raised.exception))


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
