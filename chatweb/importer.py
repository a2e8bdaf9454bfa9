"""
chat.nvim session files in and out of chatweb.

chat.nvim keeps each session in its sessions directory as one JSON file: an
object C{{id, messages, provider, model, cwd, prompt, usage, title, pin,
...}}, or, in files written by old versions, a bare list of messages whose
session id is the file name.  L{readSessionFile} reads both into a
L{Session}; L{exportSession} writes the object form back, so a session
imported and exported again is the same file (key order and spacing aside).

Files are not trusted: only regular files are read (never a FIFO or a
device), up to L{MAX_FILE_SIZE} bytes; JSON that is not a chat.nvim session
is refused; session ids obey the rule of POST / (L{sessionIdProblem}).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any, Iterable, Iterator, Mapping

from chatweb.model._values import Session

#: The largest session file read, in bytes.  chat.nvim's biggest sessions
#: (long tool outputs) are a few megabytes.
MAX_FILE_SIZE = 64 * 1024 * 1024


class SessionFileError(Exception):
    """
    A file is not a chat.nvim session; the message says which and why, in
    one line.
    """


def shown(text: str) -> str:
    """
    C{text} safe to print on a terminal: characters that are not printable
    (controls, bidi controls, zero-width characters, line separators) become
    escapes such as C{\\x1b} or C{\\u202e}; other text is left as it is.
    """
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(c: str) -> str:
    n = ord(c)
    if n <= 0xFF:
        return f"\\x{n:02x}"
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def _looksLikeMessage(value: Any) -> bool:
    # A chat.nvim message has a role; its role-less records mark a
    # completed answer or an error.
    return isinstance(value, Mapping) and (
        isinstance(value.get("role"), str)
        or "on_complete" in value
        or "error" in value
    )


def sessionFromJSON(data: Any, fallbackId: str) -> Session:
    """
    A session from the decoded JSON of a chat.nvim file: the object form
    (which must have an C{id} and a list of C{messages}), or the old bare
    list of messages (which takes C{fallbackId}).

    @raise SessionFileError: C{data} is not a chat.nvim session.
    """
    if isinstance(data, list):
        if not data or not all(_looksLikeMessage(m) for m in data):
            raise SessionFileError(
                "not a chat.nvim session: a list, but not of chat.nvim messages"
            )
        data = {"id": fallbackId, "messages": data}
    if not isinstance(data, Mapping):
        raise SessionFileError(
            f"expected a JSON object or a list of messages, found {_kind(data)}"
        )
    if "id" not in data or "messages" not in data:
        raise SessionFileError(
            "not a chat.nvim session: it has no 'id' and 'messages'"
        )
    # Imported here: chatweb.web imports this module (for the export).
    from chatweb.web._validation import sessionIdProblem

    sessionId = data["id"]
    problem = sessionIdProblem(sessionId)
    if problem is not None:
        what = "the session id"
        if isinstance(sessionId, str):
            what = repr(sessionId if len(sessionId) <= 80 else sessionId[:80] + "...")
        raise SessionFileError(f"session id {what} {problem}")
    messages = data["messages"]
    if not isinstance(messages, list):
        raise SessionFileError(f"'messages' must be a list, found {_kind(messages)}")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise SessionFileError(f"message {n} must be an object, found {_kind(message)}")
        role = message.get("role")
        if "role" in message and not isinstance(role, str):
            raise SessionFileError(f"message {n}: 'role' must be a string, found {_kind(role)}")
    return Session.fromDict(data, id=sessionId)


def _readRegularFile(path: str, maxSize: int) -> bytes:
    """
    The bytes of the regular file at C{path}, at most C{maxSize} of them.

    Opened without blocking (a FIFO would wait for a writer) and checked
    once open: a FIFO, a device or a directory is refused, never read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise SessionFileError(e.strerror or str(e))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SessionFileError(f"not a regular file ({_fileKind(info.st_mode)})")
        if info.st_size > maxSize:
            raise SessionFileError(
                f"larger than the limit of {maxSize:,} bytes ({info.st_size:,} bytes)"
            )
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, maxSize + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > maxSize:
                raise SessionFileError(f"larger than the limit of {maxSize:,} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise SessionFileError(e.strerror or str(e))
    finally:
        os.close(fd)


def _fileKind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def readSessionFile(path: str, maxSize: int = MAX_FILE_SIZE) -> Session:
    """
    Read one chat.nvim session file.

    @raise SessionFileError: it cannot be read, or is not a session; the
        message starts with C{path}.
    """
    try:
        return _readSession(path, maxSize)
    except SessionFileError as e:
        raise SessionFileError(f"{path}: {e}")


def _readSession(path: str, maxSize: int) -> Session:
    raw = _readRegularFile(path, maxSize)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuseConstant)
    except UnicodeDecodeError:
        raise SessionFileError("not UTF-8 text")
    except ValueError as e:
        raise SessionFileError(f"not valid JSON ({e})")
    except RecursionError:
        raise SessionFileError("nested too deeply")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise SessionFileError("holds text that is not valid Unicode")
    except RecursionError:
        raise SessionFileError("nested too deeply")
    name = os.path.basename(path)
    fallbackId = name[: -len(".json")] if name.endswith(".json") else name
    return sessionFromJSON(data, fallbackId)


def _refuseConstant(name: str) -> Any:
    # NaN and Infinity are not JSON: an export would not be JSON either.
    raise ValueError(f"{name} is not a JSON number")


def exportSession(session: Session) -> dict[str, Any]:
    """
    C{session} in chat.nvim's file form (the object form, with its id).

    A message without content leaves the key out rather than writing
    C{null}: chat.nvim reads C{null} as C{vim.NIL}, which Lua code takes for
    a value.
    """
    data = session.asDict()
    for message in data["messages"]:
        if message.get("content", "") is None:
            del message["content"]
    return data


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a number")


def sessionFiles(paths: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """
    Each file to import, as C{(path, None)}, or C{(path, reason)} for an
    argument that gives none: a directory stands for its C{*.json} files
    (as in chat.nvim's sessions directory), in name order.
    """
    for path in paths:
        if not os.path.isdir(path):
            yield path, None
            continue
        try:
            names = sorted(n for n in os.listdir(path) if n.endswith(".json"))
        except OSError as e:
            yield path, e.strerror or str(e)
            continue
        if not names:
            hint = ""
            if os.path.isdir(os.path.join(path, "sessions")):
                hint = f" (chat.nvim keeps sessions in {os.path.join(path, 'sessions')})"
            yield path, f"a directory with no .json files{hint}"
        for name in names:
            yield os.path.join(path, name), None


async def importFiles(
    backend: Any,
    paths: Iterable[str],
    replace: bool = False,
    out: Any = None,
    err: Any = None,
    maxSize: int = MAX_FILE_SIZE,
) -> int:
    """
    Import each file (or each C{*.json} file of each directory) into
    C{backend} (a L{LocalBackend}): one line on C{out} for each file
    imported or skipped, one on C{err} for each file that could not be
    imported, and a count on C{out} at the end.  File names and ids are
    printed with L{shown}.

    @return: the number of files that could not be imported.
    """
    imported = skipped = failures = 0
    for path, reason in sessionFiles(paths):
        if reason is not None:
            failures += 1
            print(f"chatweb: cannot import {shown(path)}: {shown(reason)}", file=err)
            continue
        try:
            session = readSessionFile(path, maxSize)
        except SessionFileError as e:
            failures += 1
            print(f"chatweb: cannot import {shown(str(e))}", file=err)
            continue
        try:
            written = await backend.importSession(session, replace)
        except Exception as e:
            failures += 1
            print(f"chatweb: cannot import {shown(path)}: {shown(str(e))}", file=err)
            continue
        if written:
            imported += 1
            count = len(session.messages)
            print(
                f"imported {shown(session.id)} ({count} message{'' if count == 1 else 's'})"
                f" from {shown(path)}",
                file=out,
            )
        else:
            skipped += 1
            print(
                f"skipped {shown(session.id)} from {shown(path)}: a session with"
                " that id exists (--replace overwrites it)",
                file=out,
            )
    print(
        f"{imported} imported, {skipped} skipped, {failures} could not be imported",
        file=out,
    )
    return failures


async def runImport(
    reactor: Any, paths: list[str], dataDir: str, replace: bool = False
) -> int:
    """
    C{python -m chatweb import}: open the data directory's database (as the
    service does), import C{paths} (files or directories), close it.

    @return: the exit status: 0 when every file was imported or skipped.
    """
    # Imported here: the service's modules are not needed to read a file.
    from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
    from chatweb.backends.local import LocalBackend
    from chatweb.config import ensureDataDir
    from chatweb.store._sqlite import SQLiteDatabase
    from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
    from chatweb.config import DATABASE_NAME

    ensureDataDir(dataDir)
    database = SQLiteDatabase(os.path.join(dataDir, DATABASE_NAME), reactor)
    try:
        await database.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)
        failures = await importFiles(
            LocalBackend(database, reactor), paths, replace, sys.stdout, sys.stderr
        )
    finally:
        await database.close()
    return 1 if failures else 0
