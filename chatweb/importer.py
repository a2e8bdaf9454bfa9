"""
chat.nvim session files in and out of chatweb.

chat.nvim keeps each session in its cache directory as one JSON file: an
object C{{id, messages, provider, model, cwd, prompt, usage, title, pin,
...}}, or, in files written by old versions, a bare list of messages whose
session id is the file name.  L{readSessionFile} reads both into a
L{Session}; L{exportSession} writes the object form back, so a session
imported and exported again is the same file (key order and spacing aside).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Mapping

from chatweb.model import Session


class SessionFileError(Exception):
    """
    A file is not a chat.nvim session; the message says which and why, in
    one line.
    """


def sessionFromJSON(data: Any, fallbackId: str) -> Session:
    """
    A session from the decoded JSON of a chat.nvim file: the object form,
    or the old bare list of messages (which takes C{fallbackId}).
    """
    if isinstance(data, list):
        data = {"id": fallbackId, "messages": data}
    if not isinstance(data, Mapping):
        raise SessionFileError(
            f"expected a JSON object or a list of messages, found {_kind(data)}"
        )
    sessionId = data.get("id", fallbackId)
    if not isinstance(sessionId, str) or not sessionId:
        raise SessionFileError("the session id must be a non-empty string")
    messages = data.get("messages", [])
    if not isinstance(messages, list):
        raise SessionFileError(f"'messages' must be a list, found {_kind(messages)}")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise SessionFileError(f"message {n} must be an object, found {_kind(message)}")
        if not isinstance(message.get("role"), str):
            raise SessionFileError(f"message {n} has no 'role' string")
    return Session.fromDict(data, id=sessionId)


def readSessionFile(path: str) -> Session:
    """
    Read one chat.nvim session file.

    @raise SessionFileError: it cannot be read, or is not a session.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SessionFileError(f"{path}: {e.strerror or e}")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuseConstant)
    except UnicodeDecodeError:
        raise SessionFileError(f"{path}: not UTF-8 text")
    except ValueError as e:
        raise SessionFileError(f"{path}: not valid JSON ({e})")
    except RecursionError:
        raise SessionFileError(f"{path}: nested too deeply")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise SessionFileError(f"{path}: holds text that is not valid Unicode")
    name = os.path.basename(path)
    fallbackId = name[: -len(".json")] if name.endswith(".json") else name
    try:
        return sessionFromJSON(data, fallbackId)
    except SessionFileError as e:
        raise SessionFileError(f"{path}: {e}")


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


async def importFiles(
    backend: Any, paths: Iterable[str], replace: bool = False, out: Any = None,
    err: Any = None,
) -> int:
    """
    Import each file into C{backend} (a L{LocalBackend}), saying what
    happened to each on C{out} / C{err}.

    @return: the number of files that could not be imported.
    """
    failures = 0
    for path in paths:
        try:
            session = readSessionFile(path)
        except SessionFileError as e:
            failures += 1
            print(f"chatweb: cannot import {e}", file=err)
            continue
        try:
            written = await backend.importSession(session, replace)
        except Exception as e:
            failures += 1
            print(f"chatweb: cannot import {path}: {e}", file=err)
            continue
        if written:
            count = len(session.messages)
            print(f"imported {session.id} ({count} message{'' if count == 1 else 's'}) from {path}", file=out)
        else:
            print(
                f"skipped {session.id} from {path}: a session with that id exists"
                " (--replace overwrites it)",
                file=out,
            )
    return failures


async def runImport(
    reactor: Any, paths: list[str], dataDir: str, replace: bool = False
) -> int:
    """
    C{python -m chatweb import}: open the data directory's database (as the
    service does), import C{paths}, close it.

    @return: the exit status: 0 when every file was imported or skipped.
    """
    # Imported here: the service's modules are not needed to read a file.
    from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
    from chatweb.backends.local import LocalBackend
    from chatweb.config import ensureDataDir
    from chatweb.database import SQLiteDatabase
    from chatweb.journal import SCHEMA as JOURNAL_SCHEMA
    from chatweb.service import DATABASE_NAME

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
