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
from chatweb.store._sqlite import SQLiteDatabase
from chatweb.importer import (
    SessionFileError,
    exportSession,
    importFiles,
    readSessionFile,
)
from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.model import Message, Session
from chatweb.render._preview import renderSession

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

    def test_sessionsDirectory(self) -> None:
        """
        C{python -m chatweb import DIR}, DIR being chat.nvim's sessions
        directory with a FIFO, a package.json and a {} among the sessions,
        and /dev/zero given too: each refused file gets one line, the
        sessions are imported, and it ends (no hang, no traceback).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        fixtures = sorted(glob.glob(os.path.join(FIXTURES, "*.json")))
        for path in fixtures:
            with open(path, "rb") as f:
                writeFile(directory, os.path.basename(path), f.read())
        writeFile(directory, "package.json", NOT_SESSIONS["package.json"][0])
        writeFile(directory, "empty.json", "{}")
        os.mkfifo(os.path.join(directory, "fifo.json"))
        dataDir = os.path.abspath(self.mktemp())
        result = self.chatweb(directory, "/dev/zero", "--data-dir", dataDir)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            sorted(result.stderr.splitlines()),
            sorted([
                f"chatweb: cannot import {directory}/empty.json: not a chat.nvim session:"
                " it has no 'id' and 'messages'",
                f"chatweb: cannot import {directory}/fifo.json: not a regular file (a FIFO)",
                f"chatweb: cannot import {directory}/package.json: not a chat.nvim session:"
                " it has no 'id' and 'messages'",
                "chatweb: cannot import /dev/zero: not a regular file (a character device)",
            ]),
        )
        self.assertEqual(
            result.stdout.splitlines()[-1],
            f"{len(fixtures)} imported, 0 skipped, 4 could not be imported",
        )
        self.assertEqual(self.sessionsIn(dataDir), sorted(asFile(p)["id"] for p in fixtures))

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


def writeFile(directory: str, name: str, content: bytes | str) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    return path


#: JSON files that are not chat.nvim sessions, each with what is said.
NOT_SESSIONS = {
    "package.json": (
        json.dumps({"name": "app", "version": "1.0.0",
                    "config": {"password": "hunter2"}}),
        "not a chat.nvim session: it has no 'id' and 'messages'",
    ),
    "empty-object.json": ("{}", "not a chat.nvim session: it has no 'id' and 'messages'"),
    "no-messages.json": ('{"id": "x"}', "not a chat.nvim session"),
    "no-id.json": ('{"messages": []}', "not a chat.nvim session"),
    "empty-list.json": ("[]", "not a chat.nvim session: a list, but not of chat.nvim messages"),
    "numbers.json": ("[1, 2]", "a list, but not of chat.nvim messages"),
    "objects.json": ('[{"name": "x"}]', "a list, but not of chat.nvim messages"),
    "string.json": ('"hello"', "found a string"),
}

#: Session ids POST / refuses, and so the importer too.
HOSTILE_IDS = {
    "s" * 5000: "at most 256 characters",
    "\x1b[2J\x1b[31mred": "control characters",
    "\x00index": "control characters",
    "line\nbreak": "control characters",
    "invoice\u202efdp.exe": "bidi control characters (U+202E)",
    "a\u2066b": "(U+2066)",
    "mark\u200f": "(U+200F)",
    "arabic\u061c": "(U+061C)",
    "zero\u200bwidth": "(U+200B)",
    "joiner\u200d": "(U+200D)",
    "word\u2060joiner": "(U+2060)",
    "\ufeffbom": "(U+FEFF)",
}


class NotASessionTests(SynchronousTestCase):
    """
    JSON that is not a chat.nvim session is refused with one line, never
    imported as an (empty) session.
    """

    def test_refused(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        for name, (content, reason) in NOT_SESSIONS.items():
            path = writeFile(directory, name, content)
            error = self.assertRaises(SessionFileError, readSessionFile, path)
            self.assertEqual(str(error)[: len(path) + 2], path + ": ", name)
            self.assertIn(reason, str(error), name)

    def test_everyFixtureIsASession(self) -> None:
        for path in glob.glob(os.path.join(FIXTURES, "*.json")):
            readSessionFile(path)


class HostileIdTests(SynchronousTestCase):
    """
    Imported ids obey the rule of POST /: too long, control characters,
    bidi controls and zero-width characters are refused, in the object form
    and as the file name of an old bare list alike.
    """

    def test_objectForm(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        for n, (sessionId, reason) in enumerate(HOSTILE_IDS.items()):
            path = writeFile(directory, f"{n}.json", json.dumps(
                {"id": sessionId, "messages": [{"role": "user", "content": "x"}]}))
            error = self.assertRaises(SessionFileError, readSessionFile, path)
            self.assertIn(reason, str(error), repr(sessionId))

    def test_bareListFileName(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        for sessionId, reason in HOSTILE_IDS.items():
            if "\x00" in sessionId or "/" in sessionId or len(sessionId) > 200:
                continue  # not possible in a file name
            path = writeFile(directory, sessionId + ".json", '[{"role": "user", "content": "x"}]')
            error = self.assertRaises(SessionFileError, readSessionFile, path)
            self.assertIn(reason, str(error), repr(sessionId))

    def test_goodIdsStillImported(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        for sessionId in ["ci", "2024-01-15-10-30-00", "日本語", "👍", "s" * 256, "a b"]:
            path = writeFile(directory, "x.json", json.dumps({"id": sessionId, "messages": []}))
            self.assertEqual(readSessionFile(path).id, sessionId)


class UntrustedFileTests(TestCase):
    """
    Only regular files are read, up to a size limit; anything else gets one
    line and the other files are still imported.
    """

    def setUp(self) -> Deferred:
        self.db = SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)
        self.addCleanup(self.db.close)
        self.backend = LocalBackend(self.db, reactor)
        return self.db.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)

    def importing(self, paths: list[str], **kwargs) -> Deferred:
        self.out, self.err = io.StringIO(), io.StringIO()
        return Deferred.fromCoroutine(
            importFiles(self.backend, paths, out=self.out, err=self.err, **kwargs)
        )

    @inlineCallbacks
    def test_fifoAndDevicesRefused(self):
        """
        A FIFO is not opened for a blocking read (it would wait for a writer
        forever), and /dev/zero is not read until memory runs out.
        """
        fifo = os.path.abspath(self.mktemp())
        os.mkfifo(fifo)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        failures = yield self.importing([fifo, "/dev/zero", directory, OLD_FORM])
        self.assertEqual(failures, 3)
        self.assertEqual(
            self.err.getvalue().splitlines(),
            [
                f"chatweb: cannot import {fifo}: not a regular file (a FIFO)",
                "chatweb: cannot import /dev/zero: not a regular file (a character device)",
                f"chatweb: cannot import {directory}: a directory with no .json files",
            ],
        )
        self.assertEqual((yield self.backend.listSessions()), ["2024-01-15-10-30-00"])
        self.assertTrue(self.out.getvalue().endswith(
            "1 imported, 0 skipped, 3 could not be imported\n"))

    @inlineCallbacks
    def test_sizeLimit(self):
        failures = yield self.importing([TOOLS, OLD_FORM], maxSize=2000)
        self.assertEqual(failures, 1)
        self.assertIn(f"{TOOLS}: larger than the limit of 2,000 bytes", self.err.getvalue())
        self.assertEqual((yield self.backend.listSessions()), ["2024-01-15-10-30-00"])

    @inlineCallbacks
    def test_wholeDirectory(self):
        """
        A directory stands for its *.json files, as chat.nvim's sessions
        directory: the sessions are imported, anything else gets one line.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        fixtures = sorted(glob.glob(os.path.join(FIXTURES, "*.json")))
        for path in fixtures:
            with open(path, "rb") as f:
                writeFile(directory, os.path.basename(path), f.read())
        for name, (content, _) in NOT_SESSIONS.items():
            writeFile(directory, name, content)
        writeFile(directory, "notes.txt", "not looked at")
        os.mkfifo(os.path.join(directory, "pipe.json"))
        failures = yield self.importing([directory])
        self.assertEqual(failures, len(NOT_SESSIONS) + 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), len(NOT_SESSIONS) + 1)
        self.assertIn(
            f"chatweb: cannot import {directory}/package.json: not a chat.nvim session:"
            " it has no 'id' and 'messages'",
            lines,
        )
        self.assertIn(
            f"chatweb: cannot import {directory}/pipe.json: not a regular file (a FIFO)", lines
        )
        self.assertEqual(
            sorted((yield self.backend.listSessions())),
            sorted(asFile(p)["id"] for p in fixtures),
        )
        self.assertTrue(self.out.getvalue().endswith(
            f"{len(fixtures)} imported, 0 skipped, {len(NOT_SESSIONS) + 1} could not be imported\n"
        ))

    @inlineCallbacks
    def test_namesPrintedEscaped(self):
        """
        A file name with terminal escapes or bidi controls is printed
        escaped: nothing reaches the terminal raw.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        writeFile(directory, "\x1b[2Jevil\u202e.json", '[{"role": "user", "content": "x"}]')
        writeFile(directory, "ok\u200b.json", json.dumps(
            {"id": "bad\x07\u2066id", "messages": []}))
        failures = yield self.importing([directory])
        self.assertEqual(failures, 2)
        printed = self.err.getvalue() + self.out.getvalue()
        self.assertEqual([c for c in printed if not c.isprintable() and c not in " \n"], [])
        self.assertIn("\\x1b[2Jevil\\u202e.json", printed)
        self.assertIn("bad\\x07\\u2066id", printed)
