"""
The twistd plugin's options, and how chatweb refuses bad ones: one line, a
non-zero exit, no traceback.
"""

from __future__ import annotations

import os
import subprocess

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from chatweb.config import ensureKeyFile
from chatweb.tap import Options, makeService
from chatweb.testing import twistdCommand


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
        options = self.parse("--api-key", "K")
        self.assertEqual(options["key"], "K")
        self.assertEqual(options["listen"], "tcp:7777:interface=127.0.0.1")
        self.assertEqual(options["interval"], 5.0)
        self.assertEqual(options["responder"], "none")
        self.assertTrue(options["data-dir"].endswith(os.path.join("share", "chatweb")))

    def test_dataDirFollowsXDG(self) -> None:
        os.environ["XDG_DATA_HOME"] = "/srv/data"
        self.assertEqual(self.parse("--api-key", "K")["data-dir"], "/srv/data/chatweb")

    def test_hostAndPort(self) -> None:
        options = self.parse("--api-key", "K", "--port", "8000", "--host", "::1")
        self.assertEqual(options["listen"], r"tcp:8000:interface=\:\:1")

    def test_listenOverrides(self) -> None:
        options = self.parse("--api-key", "K", "--port", "1", "--listen", "unix:/tmp/cw.sock")
        self.assertEqual(options["listen"], "unix:/tmp/cw.sock")

    def test_keyFromEnvironment(self) -> None:
        os.environ["CHATWEB_API_KEY"] = "from-env\n"
        self.assertEqual(self.parse()["key"], "from-env")

    def test_keyFromFile(self) -> None:
        path, created = ensureKeyFile(self.mktemp())
        self.assertTrue(created)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            key = f.read().strip()
        self.assertGreaterEqual(len(key), 32)
        os.environ["CHATWEB_API_KEY"] = "ignored"
        self.assertEqual(self.parse("--api-key-file", path)["key"], key)
        self.assertEqual(ensureKeyFile(os.path.dirname(path)), (path, False))

    def test_noKey(self) -> None:
        message = self.refused()
        for hint in ("CHATWEB_API_KEY", "--api-key-file"):
            self.assertIn(hint, message)

    def test_badValues(self) -> None:
        self.assertIn("--port", self.refused("--api-key", "K", "--port", "http"))
        self.assertIn("--port", self.refused("--api-key", "K", "--port", "70000"))
        self.assertIn("--interval", self.refused("--api-key", "K", "--interval", "0"))
        self.assertIn("--responder", self.refused("--api-key", "K", "--responder", "gpt"))
        self.assertIn("printable", self.refused("--api-key", "a key"))
        self.assertIn("empty", self.refused("--api-key", ""))
        empty = self.mktemp()
        open(empty, "w").close()
        self.assertIn("empty", self.refused("--api-key-file", empty))
        self.assertIn("No such file", self.refused("--api-key-file", "/nonexistent/key"))

    def test_badEndpointAndDataDir(self) -> None:
        options = self.parse("--api-key", "K", "--listen", "carrier-pigeon:1")
        with self.assertRaises(SystemExit) as raised:
            makeService(options)
        self.assertIn("--listen", str(raised.exception.code))
        blocker = self.mktemp()
        open(blocker, "w").close()
        options = self.parse("--api-key", "K", "--data-dir", os.path.join(blocker, "sub"))
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

    def twistd(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if k != "CHATWEB_API_KEY"}
        environment.update(env or {})
        return subprocess.run(
            twistdCommand() + list(args),
            capture_output=True,
            text=True,
            env=environment,
            timeout=60,
        )

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
        result = self.twistd("-n", "chatweb", "--api-key", "K", "--data-dir", blocker)
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
