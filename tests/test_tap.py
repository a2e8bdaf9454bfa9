"""
The twistd plugin's options, and how chatweb refuses bad ones: one line, a
non-zero exit, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from chatweb.config import ensureKeyFile
from chatweb.tap import Options, makeService
from chatweb.testing import twistdCommand

KEY = "tap-test-key-0123456789"


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CHATWEB_API_KEY"})

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def refused(self, *args: str) -> str:
        with self.assertRaises(SystemExit) as raised:
            self.parse(*args)
        message = str(raised.exception.code)
        self.assertTrue(message.startswith("chatweb: "), message)
        self.assertNotIn("\n", message)
        return message

    def test_defaults(self) -> None:
        options = self.parse("--api-key", KEY)
        self.assertEqual(options["keys"], [KEY])
        self.assertEqual(options["listen"], "tcp:7777:interface=127.0.0.1:backlog=1024")
        self.assertEqual(options["interval"], 5.0)
        self.assertEqual(options["responder"], "none")
        self.assertTrue(options["data-dir"].endswith(os.path.join("share", "chatweb")))

    def test_dataDirFollowsXDG(self) -> None:
        os.environ["XDG_DATA_HOME"] = "/srv/data"
        self.assertEqual(self.parse("--api-key", KEY)["data-dir"], "/srv/data/chatweb")

    def test_hostAndPort(self) -> None:
        options = self.parse("--api-key", KEY, "--port", "8000", "--host", "::1")
        self.assertEqual(options["listen"], r"tcp:8000:interface=\:\:1:backlog=1024")

    def test_listenOverrides(self) -> None:
        options = self.parse("--api-key", KEY, "--port", "1", "--listen", "unix:/tmp/cw.sock")
        self.assertEqual(options["listen"], "unix:/tmp/cw.sock:backlog=1024")
        options = self.parse("--api-key", KEY, "--listen", "tcp:1:backlog=7")
        self.assertEqual(options["listen"], "tcp:1:backlog=7")

    def test_keyFromEnvironment(self) -> None:
        os.environ["CHATWEB_API_KEY"] = KEY + "\n"
        self.assertEqual(self.parse()["keys"], [KEY])

    def test_keyFromFile(self) -> None:
        path, created = ensureKeyFile(self.mktemp())
        self.assertTrue(created)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            key = f.read().strip()
        self.assertGreaterEqual(len(key), 32)
        self.assertEqual(self.parse("--api-key-file", path)["keys"], [key])
        self.assertEqual(ensureKeyFile(os.path.dirname(path)), (path, False))

    def test_twoKeySourcesRefused(self) -> None:
        """
        Giving the key in two ways is an error that names both, whichever
        two they are.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(KEY + "\n")
        message = self.refused("--api-key", KEY, "--api-key-file", path)
        self.assertIn("--api-key and --api-key-file", message)
        os.environ["CHATWEB_API_KEY"] = KEY
        message = self.refused("--api-key-file", path)
        self.assertIn("--api-key-file and $CHATWEB_API_KEY", message)
        self.assertIn("--api-key and", self.refused("--api-key", KEY))

    def test_severalKeysInTheFile(self) -> None:
        """
        One key per line: each one is accepted (to rotate keys), blank lines
        are ignored, and a bad line is named.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("old-key-0123456789\n\n  new-key-0123456789  \n")
        options = self.parse("--api-key-file", path)
        self.assertEqual(options["keys"], ["old-key-0123456789", "new-key-0123456789"])
        service = makeService(self.parse(
            "--api-key-file", path, "--data-dir", self.mktemp(), "--port", "0"))
        self.addCleanup(service.stopService)
        from twisted.web.http_headers import Headers

        self.assertEqual(
            [service.api.headersAuthorized(Headers({b"x-api-key": [k.encode()]}))
             for k in ("old-key-0123456789", "new-key-0123456789", "other-key-012345")],
            [True, True, False],
        )
        with open(path, "w") as f:
            f.write("good-key-0123456789\nbad key\n")
        self.assertIn("line 2", self.refused("--api-key-file", path))

    def test_logEachMessage(self) -> None:
        """
        The queue logs each message only with --log-each-message.
        """
        for flags, expected in (((), False), (("--log-each-message",), True)):
            service = makeService(self.parse(
                "--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0", *flags))
            self.addCleanup(service.stopService)
            self.assertIs(service.queue.logEachMessage, expected)

    def test_pageWorkers(self) -> None:
        """
        Two processes read and render pages unless --page-workers says
        otherwise; 0 leaves it to threads.
        """
        for flags, expected in (((), 2), (("--page-workers", "1"), 1), (("--page-workers", "0"), None)):
            service = makeService(self.parse(
                "--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0", *flags))
            self.addCleanup(service.stopService)
            workers = service.api.pageWorkers
            self.assertEqual(None if workers is None else workers.processes, expected)
        self.assertIn("--page-workers", self.refused("--api-key", KEY, "--page-workers", "-1"))

    def test_startupObjectsLeaveTheCollector(self) -> None:
        """
        When twistd's service starts, what exists then (modules, wiring) is
        frozen out of the garbage collector's full collections, which held
        the reactor for tens of milliseconds under load.
        """
        import gc

        from chatweb.tap import _FreezeAtStart

        service = makeService(self.parse(
            "--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0"))
        self.addCleanup(service.stopService)
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        [freezer] = [s for s in service if isinstance(s, _FreezeAtStart)]
        # The last to start: everything else exists by then.
        self.assertIs(list(service)[-1], freezer)
        freezer.startService()
        self.assertGreater(gc.get_freeze_count(), 1000)

    def test_theReactorComesFirst(self) -> None:
        """
        When twistd's service starts, the threads that read and render are
        set to yield to the reactor's (chatweb._priority).
        """
        from chatweb import _priority
        from chatweb.tap import _FreezeAtStart

        interval = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, interval)
        self.patch(_priority, "_favoured", False)
        service = makeService(self.parse(
            "--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0"))
        self.addCleanup(service.stopService)
        [freezer] = [s for s in service if isinstance(s, _FreezeAtStart)]
        import gc

        self.addCleanup(gc.unfreeze)
        freezer.startService()
        self.assertTrue(_priority._favoured)
        self.assertEqual(sys.getswitchinterval(), _priority.SWITCH_INTERVAL)

    def test_shortKeyWarnsLoudly(self) -> None:
        import io

        errors = io.StringIO()
        self.patch(sys, "stderr", errors)
        self.parse("--api-key", "a")
        [line] = errors.getvalue().splitlines()
        self.assertIn("WARNING", line)
        self.assertIn("only 1 characters", line)
        self.assertNotIn(" a ", line)
        errors.truncate(0)
        self.parse("--api-key", KEY)
        self.assertEqual(errors.getvalue().strip("\x00"), "")

    def test_noKey(self) -> None:
        message = self.refused()
        for hint in ("CHATWEB_API_KEY", "--api-key-file"):
            self.assertIn(hint, message)

    def test_badValues(self) -> None:
        self.assertIn("--port", self.refused("--api-key", KEY, "--port", "http"))
        self.assertIn("--port", self.refused("--api-key", KEY, "--port", "70000"))
        self.assertIn("--interval", self.refused("--api-key", KEY, "--interval", "0"))
        self.assertIn("--responder", self.refused("--api-key", KEY, "--responder", "gpt"))
        self.assertIn("printable", self.refused("--api-key", "a key"))
        self.assertIn("empty", self.refused("--api-key", ""))
        empty = self.mktemp()
        open(empty, "w").close()
        self.assertIn("empty", self.refused("--api-key-file", empty))
        self.assertIn("No such file", self.refused("--api-key-file", "/nonexistent/key"))

    def test_modelOptions(self) -> None:
        """
        --responder openai with its options makes a model responder whose
        key comes from the key file and shows nowhere; --providers makes
        one of the file's providers; model options without a model
        responder, or both forms at once, are refused in one line.
        """
        keyFile = self.mktemp()
        with open(keyFile, "w") as f:
            f.write("sk-provider-secret-0123456789\n")
        service = makeService(self.parse(
            "--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0",
            "--responder", "openai", "--base-url", "http://127.0.0.1:11434/v1/",
            "--model", "llama3.2", "--provider-key-file", keyFile,
            "--model-timeout", "5", "--system-prompt", "Be brief."))
        self.addCleanup(service.stopService)
        responder = service.adapter.responder
        self.assertEqual(
            responder.providers(),
            [{"name": "openai", "protocol": "openai", "models": ["llama3.2"]}],
        )
        provider = responder._providers["openai"]
        self.assertEqual(
            (provider.baseUrl, provider.timeout, provider.systemPrompt),
            ("http://127.0.0.1:11434/v1", 5.0, "Be brief."),
        )
        self.assertEqual(provider.key.reveal(), "sk-provider-secret-0123456789")
        self.assertNotIn("sk-provider-secret", repr(provider) + repr(responder))

        providers = self.mktemp()
        with open(providers, "w") as f:
            f.write('[providers.a]\nmodel = "m"\n[providers.b]\nprotocol = "anthropic"\n')
        options = self.parse("--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0",
                             "--providers", providers)
        self.assertEqual(options["responder"], "openai")
        service = makeService(options)
        self.addCleanup(service.stopService)
        self.assertEqual([p["name"] for p in service.adapter.responder.providers()], ["a", "b"])

        self.assertIn("--model needs --responder openai",
                      self.refused("--api-key", KEY, "--model", "x"))
        self.assertIn("give no --model",
                      self.refused("--api-key", KEY, "--providers", providers, "--model", "x"))
        with open(providers, "w") as f:
            f.write("[providers.a]\nprotocol = 'x'\n")
        options = self.parse("--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0",
                             "--providers", providers)
        with self.assertRaises(SystemExit) as raised:
            makeService(options)
        self.assertIn("protocol must be openai or anthropic", str(raised.exception.code))

    def test_unreadableSecretFiles(self) -> None:
        """
        A provider key file or database password file that cannot be read
        (or holds nothing) stops chatweb with one line naming it.
        """
        empty = self.mktemp()
        open(empty, "w").close()
        for path, reason in [("/nonexistent/secret", "No such file"), (empty, "empty")]:
            message = self.refused("--api-key", KEY, "--database", "postgresql://u@127.0.0.1/d",
                                   "--database-password-file", path)
            self.assertIn(f"--database-password-file {path}", message)
            self.assertIn(reason, message)
            options = self.parse("--api-key", KEY, "--data-dir", self.mktemp(), "--port", "0",
                                 "--responder", "openai", "--model", "m",
                                 "--provider-key-file", path)
            with self.assertRaises(SystemExit) as raised:
                makeService(options)
            message = str(raised.exception.code)
            self.assertNotIn("\n", message)
            self.assertIn(f"provider key file {path}", message)
            self.assertIn(reason, message)

    def test_badEndpointAndDataDir(self) -> None:
        options = self.parse("--api-key", KEY, "--listen", "carrier-pigeon:1")
        with self.assertRaises(SystemExit) as raised:
            makeService(options)
        self.assertIn("--listen", str(raised.exception.code))
        blocker = self.mktemp()
        open(blocker, "w").close()
        options = self.parse("--api-key", KEY, "--data-dir", os.path.join(blocker, "sub"))
        with self.assertRaises(SystemExit) as raised:
            makeService(options)
        self.assertIn("cannot use data directory", str(raised.exception.code))

    def test_pluginIsDiscovered(self) -> None:
        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("chatweb", names)


class CommandLineTests(SynchronousTestCase):
    """
    What a user sees from the real twistd.
    """

    def twistd(
        self, *args: str, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if k != "CHATWEB_API_KEY"}
        environment.update(env or {})
        return subprocess.run(
            twistdCommand() + list(args),
            capture_output=True,
            text=True,
            env=environment,
            cwd=cwd,
            timeout=60,
        )

    def test_busyPortWithAndWithoutDaemonMode(self) -> None:
        """
        A port in use: with -n or without it (daemon mode), twistd exits
        non-zero at once with the same one line, and leaves no pidfile.
        """
        import socket

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        lines = []
        for daemon in (False, True):
            cwd = os.path.abspath(self.mktemp())
            os.makedirs(cwd)
            result = self.twistd(
                *([] if daemon else ["-n"]), "chatweb", "--api-key", KEY,
                "--data-dir", os.path.join(cwd, "data"), "--port", port, cwd=cwd,
            )
            self.assertNotEqual(result.returncode, 0)
            self.assertNotIn("Traceback", result.stderr)
            [line] = result.stderr.strip().splitlines()
            lines.append(line)
            self.assertFalse(os.path.exists(os.path.join(cwd, "twistd.pid")))
        self.assertEqual(lines[0], lines[1])
        self.assertIn("chatweb: cannot listen", lines[0])
        self.assertIn("Address already in use", lines[0])

    def test_databaseFailingAtStartLeavesNoPidfile(self) -> None:
        """
        A database that opens but cannot take chatweb's schema fails once
        twistd has written its pidfile: the exit is still non-zero, the
        reason is said once, and the pidfile is removed.
        """
        import sqlite3

        cwd = os.path.abspath(self.mktemp())
        dataDir = os.path.join(cwd, "data")
        os.makedirs(dataDir, mode=0o700)
        with sqlite3.connect(os.path.join(dataDir, "chatweb.sqlite3")) as db:
            db.execute("CREATE TABLE queue (x)")
        result = self.twistd(
            "-n", "chatweb", "--api-key", KEY, "--data-dir", dataDir, "--port", "0", cwd=cwd
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        output = result.stdout + result.stderr
        self.assertEqual(output.count("cannot start on the database"), 1, output)
        self.assertFalse(os.path.exists(os.path.join(cwd, "twistd.pid")))

    def test_version(self) -> None:
        from chatweb.tap import version

        result = self.twistd("chatweb", "--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith(f"chatweb {version()} (Twisted "), result.stdout)
        result = subprocess.run(
            [sys.executable, "-m", "chatweb", "--version"], capture_output=True, text=True
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith(f"chatweb {version()}"), result.stdout)

    def test_pythonDashMHelpSaysWhatItIs(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "chatweb", "--help"], capture_output=True, text=True
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        text = " ".join(result.stdout.split())
        self.assertIn("chat sessions over HTTP", text)
        self.assertIn("twistd -n chatweb", text)

    def test_helpListsChatweb(self) -> None:
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0)
        self.assertIn("chatweb", result.stdout)

    def test_noKeyIsOneLineAndNonZero(self) -> None:
        result = self.twistd("-n", "chatweb", "--data-dir", self.mktemp())
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("CHATWEB_API_KEY", lines[0])

    def test_unwritableDataDirIsOneLine(self) -> None:
        blocker = self.mktemp()
        open(blocker, "w").close()
        result = self.twistd("-n", "chatweb", "--api-key", KEY, "--data-dir", blocker)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_keyNeverEchoed(self) -> None:
        """
        Failing after the key was read, from either source, chatweb does
        not repeat it.
        """
        blocker = self.mktemp()
        open(blocker, "w").close()
        for args, env in (
            (["--api-key", "s3cret-value"], {}),
            ([], {"CHATWEB_API_KEY": "s3cret-value"}),
        ):
            result = self.twistd(
                "-n", "chatweb", *args, "--data-dir", blocker, env=env
            )
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("cannot use data directory", result.stderr)
            self.assertNotIn("s3cret-value", result.stdout + result.stderr)
