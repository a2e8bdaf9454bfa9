"""
A page worker: a process that reads sessions from the SQLite database and
renders their pages, so that this work holds another interpreter's GIL,
not the reactor's (see L{chatweb.web._workers}).

    python -c "from chatweb.web._pageworker import main; main()"

(L{chatweb.web._workers} starts it so, and may lower its priority first.)

It reads frames from stdin and writes frames to file descriptor 3 (not
stdout, where a library might print); a frame is a 4-byte big-endian
length and a pickle.  The first frame it reads is its configuration; once
it can answer it writes C{("ready", None)}.  Each next frame is C{(kind,
args)}, the name of a L{PageWorker} method and its arguments, answered in
order with C{("ok", value)} or C{("error", description)}.  It exits at the
end of stdin.
"""

from __future__ import annotations

from bisect import bisect_right
import json
import os
import pickle
import sqlite3
import struct
import sys
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, cast
from urllib.parse import quote

from twisted.internet.task import Clock

from chatweb.backends.local import LocalBackend
from chatweb.model import Session
from chatweb.sessions import SessionView, pageView, sessionDetail, sessionView, undelivered
from chatweb.render._preview import PAGE_MESSAGES, renderIndex, renderSession
from chatweb.store._journal import _failedSessions, _undelivered
from chatweb.web._json import _exportJSON
from chatweb.web._pages import indexLinks, mergeSessionIds, pageLinks
from chatweb.web._share import ShareLinks

_LENGTH = struct.Struct(">I")
#: The file descriptor a worker writes its answers to.
ANSWERS_FD = 3


def readFrame(stream: BinaryIO) -> Any:
    """
    The next frame's value, or None at the end of C{stream}.
    """
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def frame(value: Any) -> bytes:
    """
    C{value} as a frame.
    """
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class PageWorker:
    """
    What a page worker answers: each method reads in one snapshot of the
    database and returns what the parent sends to the client.
    """

    def __init__(self, path: str, shareSecret: bytes | None) -> None:
        # Read only (the parent's writer is the database's one writer), and
        # never a new, empty file in place of a missing one.
        self._connection = sqlite3.connect(
            f"file:{quote(path)}?mode=ro", uri=True, isolation_level=None
        )
        self._connection.execute("PRAGMA busy_timeout=10000")
        # The local backend's reads (and its cache of parsed messages), on
        # this process's own connection: it is given no database to write.
        self._backend = LocalBackend(cast(Any, None), cast(Any, None))
        self._shareSecret = shareSecret
        #: The last answer of ids(), and what it was made from.
        self._listed: tuple[tuple[int, tuple[str, ...]], bytes] | None = None

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Cursor]:
        cursor = self._connection.cursor()
        cursor.execute("BEGIN")
        try:
            yield cursor
        finally:
            cursor.execute("COMMIT")

    def page(self, sessionId: str, before: int | None, base: str) -> bytes | None:
        """
        The HTML page of C{sessionId} that ends before message C{before}
        (links to the others start with C{base}), encoded; None if there is
        no such session (as L{chatweb.sessions.Sessions.page}).
        """
        with self._snapshot() as cursor:
            waiting = _undelivered(cursor, sessionId)
            part = self._backend._getSessionPage(cursor, sessionId, before, PAGE_MESSAGES)
        found = pageView(sessionId, part, waiting)
        if found is None:
            return None
        part, view = found
        # Encoded here, not by the server's reactor.
        return renderSession(part, undelivered(view), before, pageLinks(base)).encode("utf-8")

    def ids(self, pending: list[str]) -> bytes:
        """
        The sorted ids of every session, and of those with messages pending
        (C{pending}, from the parent's queue) or failed, in JSON.  Made
        again only when the database or C{pending} changed since the last
        time (C{PRAGMA data_version} counts the commits of every other
        connection).
        """
        with self._snapshot() as cursor:
            version = cursor.execute("PRAGMA data_version").fetchone()[0]
            key = (version, tuple(pending))
            if self._listed is not None and self._listed[0] == key:
                return self._listed[1]
            ids = self._sessionIds(cursor, pending)
        body = json.dumps(ids, ensure_ascii=False).encode("utf-8")
        self._listed = (key, body)
        return body

    def index(self, pending: list[str], prefix: str, lifetime: int, now: float) -> bytes:
        """
        The HTML index of the same sessions as L{ids}, each linked with a
        share token that lives C{lifetime} seconds from C{now}.
        """
        secret = self._shareSecret
        links = None
        if secret is not None:
            # Share links expire from the parent's time.
            clock = Clock()
            clock.advance(now)
            links = ShareLinks(secret, clock)
        with self._snapshot() as cursor:
            sessionIds = self._sessionIds(cursor, pending)
        return renderIndex(sessionIds, indexLinks(sessionIds, prefix, lifetime, links)).encode(
            "utf-8"
        )

    def export(self, sessionId: str) -> bytes | None:
        """
        C{sessionId} as a chat.nvim session file, in JSON; None if there is
        no such session.
        """
        session = self._session(sessionId)
        return None if session is None else _exportJSON(session)

    def messages(self, sessionId: str, since: int) -> bytes | None:
        """
        The messages of C{sessionId} from the C{since}-th (1-based) on, in
        JSON (C{GET /messages}); None if there is no such session.
        """
        session = self._session(sessionId)
        if session is None:
            return None
        chosen = session.messages[max(since - 1, 0) :]
        return json.dumps([m.asDict() for m in chosen], ensure_ascii=False).encode("utf-8")

    def detail(self, sessionId: str) -> dict[str, object] | None:
        """
        C{sessionId}'s detail (C{GET /sessions/{id}}) but C{in_progress},
        which only the parent knows; None if there is no such session.
        """
        session = self._session(sessionId)
        return None if session is None else sessionDetail(SessionView(session), False)

    def details(
        self, pending: list[str], limit: int, after: str | None
    ) -> tuple[list[dict[str, object]], str | None]:
        """
        The details (as L{detail}) of up to C{limit} sessions after
        C{after}, in id order, and the last one's id if more follow
        (C{GET /sessions?detail=1}).
        """
        page = []
        with self._snapshot() as cursor:
            every = self._sessionIds(cursor, pending)
            if after is not None:
                every = every[bisect_right(every, after) :]
            for sessionId in every[:limit]:
                session = self._sessionIn(cursor, sessionId)
                if session is not None:
                    page.append(sessionDetail(SessionView(session), False))
        return page, (every[limit - 1] if len(every) > limit else None)

    def _session(self, sessionId: str) -> Session | None:
        with self._snapshot() as cursor:
            return self._sessionIn(cursor, sessionId)

    def _sessionIn(self, cursor: sqlite3.Cursor, sessionId: str) -> Session | None:
        """
        The session as L{chatweb.sessions.Sessions.get} reads it: an empty
        one if it only has messages waiting or failed; None if neither.
        """
        waiting = _undelivered(cursor, sessionId)
        session = self._backend._getSessionParsedOnce(cursor, sessionId)
        view = sessionView(sessionId, session, waiting)
        return None if view is None else view.session

    def _sessionIds(self, cursor: sqlite3.Cursor, pending: list[str]) -> list[str]:
        ids = self._backend._listSessionsOnce(cursor)
        return mergeSessionIds(ids, set(_failedSessions(cursor)) | set(pending))


def main() -> None:
    answers = os.fdopen(ANSWERS_FD, "wb")
    stdin = sys.stdin.buffer
    config = readFrame(stdin)
    if config is None:
        return
    worker = PageWorker(config["path"], config["shareSecret"])
    answers.write(frame(("ready", None)))
    answers.flush()
    while True:
        request = readFrame(stdin)
        if request is None:
            return
        kind, args = request
        try:
            answer: tuple[str, Any] = ("ok", getattr(worker, kind)(*args))
        except Exception as e:
            answer = ("error", f"{type(e).__name__}: {e}")
        answers.write(frame(answer))
        answers.flush()
