"""
chat.nvim session files: read (both forms), imported into the default
backend, previewed, and exported back to an equivalent file.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sqlite3
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend
from chatweb.database import SQLiteDatabase
from chatweb.importer import (
    SessionFileError,
    exportSession,
    importFiles,
    readSessionFile,
)
from chatweb.journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.model import Message, Session
from chatweb.preview import renderSession

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OLD_FORM = os.path.join(FIXTURES, "2024-01-15-10-30-00.json")
TOOLS = os.path.join(FIXTURES, "tools-and-reasoning.json")


def loadJSON(path: str) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def asFile(path: str) -> dict:
    """
    What chat.nvim holds for the file at C{path}: an old bare list becomes
    the object form with the file's name as id (as chat.nvim itself does).
    """
    data = loadJSON(path)
    if isinstance(data, list):
        data = {"id": os.path.basename(path)[:-5], "messages": data}
    return data


def keysOf(session: dict) -> list:
    """
    The keys of a session and of each of its messages, in order.
    """
    return [sorted(session), [sorted(m) for m in session["messages"]]]


class ReadTests(SynchronousTestCase):
    def test_objectForm(self) -> None:
        session = readSessionFile(TOOLS)
        self.assertEqual(
            (session.id, session.provider, session.model, session.cwd, session.pin),
            ("2024-05-20-14-03-11", "deepseek", "deepseek-reasoner",
             "/home/dev/src/inventory-service", True),
        )
        self.assertEqual(len(session.messages), 12)
        self.assertEqual(session.messages[3].tool_call_id, "call_01HZX3K9")
        self.assertEqual(session.messages[2].tokenUsage.cached_tokens, 1792)
        self.assertEqual(
            [m.role for m in session.messages],
            ["user", "assistant", None, "tool", "assistant", None, "tool",
             "assistant", None, "user", None, None],
        )
        self.assertEqual(session.last_user_message_time, 1716214031)

    def test_oldFormTakesIdFromFileName(self) -> None:
        session = readSessionFile(OLD_FORM)
        self.assertEqual(session.id, "2024-01-15-10-30-00")
        self.assertEqual(
            [m.role for m in session.messages], ["user", "assistant", None, "user"]
        )
        self.assertTrue(session.messages[2].on_complete)
        self.assertEqual(session.messages[0].content, "Build completed successfully!")

    def test_invalidFiles(self) -> None:
        """
        Each way a file can be wrong gets a one-line reason naming the file.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        cases = {
            "truncated.json": (b'{"id": "x", "messages": [', "not valid JSON"),
            "latin1.json": ('{"id": "caf\xe9"}'.encode("latin-1"), "not UTF-8"),
            "number.json": (b"42", "found a number"),
            "messages.json": (b'{"id": "x", "messages": {"role": "user"}}',
                              "'messages' must be a list, found an object"),
            "message.json": (b'{"id": "x", "messages": ["hello"]}',
                             "message 0 must be an object, found a string"),
            "role.json": (b'{"id": "x", "messages": [{"role": 5}]}',
                          "message 0: 'role' must be a string, found a number"),
            "id.json": (b'{"id": 7, "messages": []}', "session id must be a string, not number"),
        }
        for name, (content, reason) in cases.items():
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(content)
            with self.assertRaises(SessionFileError) as caught:
                readSessionFile(path)
            message = str(caught.exception)
            self.assertTrue(message.startswith(path + ": "), message)
            self.assertIn(reason, message)
            self.assertNotIn("\n", message)
        missing = os.path.join(directory, "missing.json")
        error = self.assertRaises(SessionFileError, readSessionFile, missing)
        self.assertEqual(str(error), f"{missing}: No such file or directory")

    def test_exportIsTheFile(self) -> None:
        for path in glob.glob(os.path.join(FIXTURES, "*.json")):
            exported = exportSession(readSessionFile(path))
            self.assertEqual(exported, asFile(path), path)
            self.assertEqual(keysOf(exported), keysOf(asFile(path)), path)

    def test_exportLeavesOutMissingContent(self) -> None:
        """
        chat.nvim would read a written C{null} as vim.NIL, a true value.
        """
        call = {"id": "c1", "type": "function",
                "function": {"name": "get_time", "arguments": "{}"}}
        session = Session(id="s", messages=(Message(role="assistant", tool_calls=[call]),))
        self.assertEqual(
            exportSession(session),
            {"id": "s", "messages": [{"role": "assistant", "tool_calls": [call]}]},
        )


class ImportTests(TestCase):
    def setUp(self) -> Deferred:
        self.db = SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)
        self.addCleanup(self.db.close)
        self.backend = LocalBackend(self.db, reactor)
        return self.db.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)

    @inlineCallbacks
    def test_importPreviewExportRoundTrip(self):
        """
        Every fixture, imported and read back from the database, exports to
        the file it came from and previews with its content.
        """
        paths = sorted(glob.glob(os.path.join(FIXTURES, "*.json")))
        out, err = io.StringIO(), io.StringIO()
        failures = yield Deferred.fromCoroutine(
            importFiles(self.backend, paths, out=out, err=err)
        )
        self.assertEqual((failures, err.getvalue()), (0, ""))
        ids = yield self.backend.listSessions()
        self.assertEqual(sorted(ids), sorted(asFile(p)["id"] for p in paths))
        for path in paths:
            expected = asFile(path)
            session = yield self.backend.getSession(expected["id"])
            self.assertEqual(exportSession(session), expected, path)
            self.assertEqual(keysOf(exportSession(session)), keysOf(expected), path)
            page = renderSession(session)
            self.assertIn(f"<b>{len(expected['messages'])}</b> messages", page)
        self.assertIn("imported 2024-05-20-14-03-11 (12 messages) from", out.getvalue())
        self.assertTrue(
            out.getvalue().endswith(f"{len(paths)} imported, 0 skipped, 0 could not be imported\n")
        )

    @inlineCallbacks
    def test_existingSessionKeptUnlessReplaced(self):
        original = Session(id="s", messages=(Message(role="user", content="first"),),
                           model="m1")
        other = Session(id="s", messages=(Message(role="user", content="second"),
                                          Message(role="assistant", content="reply")),
                        model="m2")
        self.assertTrue((yield self.backend.importSession(original)))
        self.assertFalse((yield self.backend.importSession(other)))
        kept = yield self.backend.getSession("s")
        self.assertEqual(([m.content for m in kept.messages], kept.model), (["first"], "m1"))
        self.assertTrue((yield self.backend.importSession(other, replace=True)))
        replaced = yield self.backend.getSession("s")
        self.assertEqual(replaced, other)

    @inlineCallbacks
    def test_badFilesReportedOthersImported(self):
        bad = os.path.abspath(self.mktemp())
        with open(bad, "w") as f:
            f.write("not json")
        out, err = io.StringIO(), io.StringIO()
        failures = yield Deferred.fromCoroutine(
            importFiles(self.backend, [bad, OLD_FORM], out=out, err=err)
        )
        self.assertEqual(failures, 1)
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertTrue(err.getvalue().startswith(f"chatweb: cannot import {bad}: not valid JSON"))
        self.assertEqual((yield self.backend.listSessions()), ["2024-01-15-10-30-00"])


class CommandTests(SynchronousTestCase):
    """
    C{python -m chatweb import}, as a user runs it.
    """

    def chatweb(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "chatweb", "import", *args],
            capture_output=True, text=True, timeout=60,
        )

    def sessionsIn(self, dataDir: str) -> list[str]:
        with sqlite3.connect(os.path.join(dataDir, "chatweb.sqlite3")) as db:
            return [row[0] for row in db.execute("SELECT id FROM sessions ORDER BY id")]

    def test_importsIntoDataDir(self) -> None:
        dataDir = os.path.abspath(self.mktemp())
        result = self.chatweb(TOOLS, OLD_FORM, "--data-dir", dataDir)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(self.sessionsIn(dataDir), ["2024-01-15-10-30-00", "2024-05-20-14-03-11"])
        again = self.chatweb(TOOLS, "--data-dir", dataDir)
        self.assertEqual(again.returncode, 0)
        self.assertIn("skipped 2024-05-20-14-03-11", again.stdout)
        replaced = self.chatweb(TOOLS, "--data-dir", dataDir, "--replace")
        self.assertIn("imported 2024-05-20-14-03-11", replaced.stdout)

    def test_badFileFailsWithOneLine(self) -> None:
        dataDir = os.path.abspath(self.mktemp())
        missing = os.path.abspath("no-such-session.json")
        result = self.chatweb(missing, OLD_FORM, "--data-dir", dataDir)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            f"chatweb: cannot import {missing}: No such file or directory\n",
        )
        self.assertEqual(self.sessionsIn(dataDir), ["2024-01-15-10-30-00"])

    def test_unusableDataDir(self) -> None:
        result = self.chatweb(OLD_FORM, "--data-dir", "/proc/chatweb-import")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn("cannot use data directory /proc/chatweb-import", result.stderr)


class HostileFileTests(SynchronousTestCase):
    """
    Files that are JSON-ish but not importable are refused one by one, with
    a reason, never a traceback.
    """

    def refused(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        with self.assertRaises(SessionFileError) as raised:
            readSessionFile(path)
        return str(raised.exception)

    def test_deepNesting(self) -> None:
        self.assertIn("nested too deeply", self.refused("[" * 100000 + "]" * 100000))

    def test_notANumber(self) -> None:
        message = self.refused('{"id": "x", "messages": [{"role": "user", "created": NaN}]}')
        self.assertIn("NaN", message)

    def test_loneSurrogate(self) -> None:
        message = self.refused('{"id": "x", "messages": [{"role": "user", "content": "\\ud800"}]}')
        self.assertIn("not valid Unicode", message)
