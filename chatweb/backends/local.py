"""
The default backend: sessions and their messages in chatweb's own SQLite
database, answered by an L{IResponder}.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import attrs

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from chatweb.errors import NoSuchMessage
from chatweb.store._sqlite import (
    SESSION_WRITES,
    SQLiteDatabase,
    Upgrades,
    firstArgument,
    sessionWrite,
)
from chatweb.interfaces import IResponder, ISessionAdapter, ISessionManager
from chatweb.store._journal import (
    EventRow,
    EventSink,
    Recorder,
    insertEvent,
    insertEvents,
    publishCommitted,
)
from chatweb.model._values import (
    CancelReason,
    Delivery,
    Event,
    EventKind,
    Message,
    Session,
    SessionPage,
    Usage,
)
from chatweb.backends.responders import NoResponder
from chatweb.backends._models import ModelError, Stopped

_log = Logger()

SCHEMA: list[str | Upgrades] = [
    """
    CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}'
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        session TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        delivery INTEGER UNIQUE,
        reply_to INTEGER,
        data TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session, seq)",
    "CREATE INDEX IF NOT EXISTS messages_by_reply ON messages (reply_to)",
]


#: Characters of message JSON whose parsed messages are kept (about three
#: times as many bytes of memory); then they are forgotten, all at once.
PARSED_MESSAGES_SIZE = 8_000_000


def _withMessages(sessionId: str, meta: str, messages: tuple[Message, ...]) -> Session:
    """
    The session of a C{sessions} row's C{meta} JSON, with C{messages}.
    """
    data = json.loads(meta)
    data["messages"] = []
    return attrs.evolve(Session.fromDict(data, id=sessionId), messages=messages)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _listSessions(cursor: sqlite3.Cursor) -> list[str]:
    if not isinstance(cursor, sqlite3.Cursor):
        # PostgreSQL (its text cannot hold the NUL separator).
        cursor.execute("SELECT id FROM sessions ORDER BY id")
        return [row[0] for row in cursor.fetchall()]
    # One string rather than a row per session: 10,000 rows took 6 ms of
    # Python objects (and GIL) against 2.5 ms.  Session ids have no control
    # characters (chatweb.web._validation), so NUL separates them.
    cursor.execute(
        "SELECT group_concat(id, char(0)) FROM (SELECT id FROM sessions ORDER BY id)"
    )
    joined = cursor.fetchone()[0]
    return [] if joined is None else joined.split("\0")


def _ensureSession(cursor: sqlite3.Cursor, sessionId: str, created: float) -> None:
    cursor.execute(
        "INSERT OR IGNORE INTO sessions (id, created) VALUES (?, ?)",
        (sessionId, created),
    )


@sessionWrite(firstArgument)
def _recordDelivery(
    cursor: sqlite3.Cursor, delivery: Delivery, now: float, withEvents: bool
) -> tuple[bool, list[Event]]:
    """
    Add the delivered message to its session, unless this delivery id is
    already there (a redelivery after a crash).  True if it was added; the
    events it records (when C{withEvents}), in the same transaction.
    """
    added, rows = _deliveryRecorded(cursor, delivery, now)
    return added, insertEvents(cursor, rows) if withEvents else []


def _deliveryRecorded(
    cursor: sqlite3.Cursor, delivery: Delivery, now: float
) -> tuple[bool, list[EventRow]]:
    """
    L{_recordDelivery}'s changes, and the events they make, not recorded
    yet.
    """
    rows: list[EventRow] = []
    _ensureSession(cursor, delivery.session, now)
    if cursor.rowcount == 1:
        rows.append((EventKind.SESSION_CREATED, delivery.session, now, {}))
    message = Message(role="user", content=delivery.content, created=delivery.received)
    cursor.execute(
        "INSERT OR IGNORE INTO messages (session, delivery, data) VALUES (?, ?, ?)",
        (delivery.session, delivery.id, _dumps(message.asDict())),
    )
    added = cursor.rowcount == 1
    if added:
        rows.append(_messageAdded(delivery.session, delivery.id, message, now))
    return added, rows


def _messageAdded(
    sessionId: str, deliveryId: int, message: Message, now: float
) -> EventRow:
    return (
        EventKind.MESSAGE_ADDED,
        sessionId,
        now,
        {"delivery": deliveryId, "message": message.asDict()},
    )


def _appendMessages(
    cursor: sqlite3.Cursor, sessionId: str, messages: list[Message]
) -> None:
    cursor.executemany(
        "INSERT INTO messages (session, data) VALUES (?, ?)",
        [(sessionId, _dumps(m.asDict())) for m in messages],
    )


@sessionWrite(firstArgument)
def _appendReplies(
    cursor: sqlite3.Cursor,
    sessionId: str,
    deliveryId: int,
    messages: list[Message],
    now: float,
    withEvents: bool,
    answers: bool = True,
) -> tuple[None, list[Event]]:
    """
    Add C{messages} made for a delivery; unless they C{answers} it (a
    stopped answer's part), a redelivery of it is answered again.
    """
    replyTo = deliveryId if answers else None
    cursor.executemany(
        "INSERT INTO messages (session, reply_to, data) VALUES (?, ?, ?)",
        [(sessionId, replyTo, _dumps(m.asDict())) for m in messages],
    )
    if not withEvents:
        return None, []
    return None, insertEvents(
        cursor, [_messageAdded(sessionId, deliveryId, m, now) for m in messages]
    )


def _answered(cursor: sqlite3.Cursor, deliveryId: int) -> bool:
    cursor.execute("SELECT 1 FROM messages WHERE reply_to = ? LIMIT 1", (deliveryId,))
    return cursor.fetchone() is not None


@sessionWrite(lambda args: [args[0].id])
def _importSession(
    cursor: sqlite3.Cursor, session: Session, replace: bool, now: float
) -> bool:
    """
    Store C{session} whole (metadata and messages) under its own id.  An
    existing session of that id is left alone unless C{replace}: then its
    metadata and messages become the imported ones.  True if written.
    """
    meta = session.metadata()
    del meta["id"]
    cursor.execute("SELECT 1 FROM sessions WHERE id = ?", (session.id,))
    if cursor.fetchone() is not None:
        if not replace:
            return False
        cursor.execute("DELETE FROM messages WHERE session = ?", (session.id,))
        cursor.execute(
            "UPDATE sessions SET meta = ? WHERE id = ?", (_dumps(meta), session.id)
        )
    else:
        cursor.execute(
            "INSERT INTO sessions (id, created, meta) VALUES (?, ?, ?)",
            (session.id, now, _dumps(meta)),
        )
    _appendMessages(cursor, session.id, list(session.messages))
    return True


def _createSession(
    cursor: sqlite3.Cursor, base: str, created: float, meta: dict[str, Any]
) -> str:
    candidate, n = base, 1
    while True:
        cursor.execute(
            "INSERT OR IGNORE INTO sessions (id, created, meta) VALUES (?, ?, ?)",
            (candidate, created, _dumps(meta)),
        )
        if cursor.rowcount == 1:
            return candidate
        n += 1
        candidate = f"{base}-{n}"


def _wrappedSessions(args: tuple[Any, ...]) -> Sequence[str]:
    operation, _, _, *rest = args
    sessionsOf = SESSION_WRITES.get(operation)
    return sessionsOf(tuple(rest)) if sessionsOf is not None else []


@sessionWrite(_wrappedSessions)
def _withEvent(
    cursor: sqlite3.Cursor,
    operation: Any,
    withEvents: bool,
    kindOf: Any,
    *args: Any,
) -> tuple[Any, list[Event]]:
    """
    Run C{operation(cursor, *args)}; if C{withEvents}, record the event
    C{kindOf(result)} gives (C{(kind, session)} or None) in its transaction.
    """
    result = operation(cursor, *args)
    if not withEvents:
        return result, []
    what = kindOf(result)
    if what is None:
        return result, []
    kind, sessionId, now = what
    return result, [insertEvent(cursor, kind, sessionId, now, {})]


def _changeEvent(
    cursor: sqlite3.Cursor,
    kind: EventKind,
    sessionId: str,
    now: float,
    withEvents: bool,
    data: dict[str, Any] | None = None,
) -> list[Event]:
    if not withEvents:
        return []
    return [insertEvent(cursor, kind, sessionId, now, data or {})]


@sessionWrite(firstArgument)
def _deleteSession(
    cursor: sqlite3.Cursor, sessionId: str, now: float, withEvents: bool
) -> tuple[bool, list[Event]]:
    cursor.execute("DELETE FROM messages WHERE session = ?", (sessionId,))
    cursor.execute("DELETE FROM sessions WHERE id = ?", (sessionId,))
    if cursor.rowcount != 1:
        return False, []
    return True, _changeEvent(cursor, EventKind.SESSION_DELETED, sessionId, now, withEvents)


def _readMeta(cursor: sqlite3.Cursor, sessionId: str) -> dict[str, Any] | None:
    cursor.execute("SELECT meta FROM sessions WHERE id = ?", (sessionId,))
    row = cursor.fetchone()
    return None if row is None else dict(json.loads(row[0]))


@sessionWrite(firstArgument)
def _clearSession(
    cursor: sqlite3.Cursor, sessionId: str, now: float, withEvents: bool
) -> tuple[bool, list[Event]]:
    meta = _readMeta(cursor, sessionId)
    if meta is None:
        return False, []
    meta.pop("usage", None)
    meta["cleared_at"] = int(now)
    cursor.execute("DELETE FROM messages WHERE session = ?", (sessionId,))
    cursor.execute(
        "UPDATE sessions SET meta = ? WHERE id = ?", (_dumps(meta), sessionId)
    )
    return True, _changeEvent(
        cursor, EventKind.SESSION_CLEARED, sessionId, now, withEvents,
        {"cleared_at": meta["cleared_at"]},
    )


@sessionWrite(firstArgument)
def _deleteMessage(
    cursor: sqlite3.Cursor, sessionId: str, index: int, now: float, withEvents: bool
) -> tuple[bool, list[Event]]:
    if _readMeta(cursor, sessionId) is None:
        return False, []
    cursor.execute(
        "SELECT seq FROM messages WHERE session = ? ORDER BY seq LIMIT 1 OFFSET ?",
        (sessionId, index),
    )
    row = cursor.fetchone()
    if index < 0 or row is None:
        raise NoSuchMessage(index)
    cursor.execute("DELETE FROM messages WHERE seq = ?", (row[0],))
    return True, _changeEvent(
        cursor, EventKind.SESSION_CHANGED, sessionId, now, withEvents,
        {"deleted_message": index + 1},
    )


@sessionWrite(firstArgument)
def _updateSession(
    cursor: sqlite3.Cursor,
    sessionId: str,
    field: str,
    value: Any,
    now: float,
    withEvents: bool,
) -> tuple[bool, list[Event]]:
    meta = _readMeta(cursor, sessionId)
    if meta is None:
        return False, []
    meta[field] = value
    cursor.execute(
        "UPDATE sessions SET meta = ? WHERE id = ?", (_dumps(meta), sessionId)
    )
    return True, _changeEvent(
        cursor, EventKind.SESSION_CHANGED, sessionId, now, withEvents, {field: value}
    )


#: The error record stored after a cancelled answer, by why it was
#: cancelled.  A stop and a timeout are in chat.nvim's words (a stopped
#: request; curl's timeout); a delivery cut by chatweb stopping is
#: delivered again at the next start.
CANCELLED: dict[CancelReason, str] = {
    "stop": "Request cancelled by user. Press r to retry.",
    "timeout": "Operation timeout. The server took too long to respond.",
    "shutdown": "Request cancelled: chatweb stopped. It is asked again when chatweb starts.",
}


def sessionIdFor(when: float) -> str:
    """
    chat.nvim's form of a server-made session id: the local time,
    YYYY-MM-DD-HH-MM-SS.
    """
    return time.strftime("%Y-%m-%d-%H-%M-%S", time.localtime(when))


@implementer(ISessionAdapter, ISessionManager)
class LocalBackend:
    """
    Sessions kept in the data directory's SQLite database.

    A session is busy while it records a message and its responder
    answers; the queue never hands it two messages at once.
    """

    def __init__(
        self,
        database: SQLiteDatabase,
        clock: IReactorTime,
        responder: IResponder | None = None,
        eventSink: EventSink | None = None,
    ) -> None:
        self._db = database
        self._clock = clock
        #: Given each message.added and session.created event once committed
        #: (they are recorded in the journal's events table, which must be in
        #: the same database); None: no events are recorded.
        self.eventSink = eventSink
        self.responder = responder if responder is not None else NoResponder()
        self._busy: set[str] = set()
        self._idleWaiters: dict[str, list[Deferred[None]]] = {}
        #: Per reader connection: the data_version of its last list, and
        #: the list (10,000 ids took 2 ms to read again).
        self._listed: dict[sqlite3.Connection, tuple[int, list[str]]] = {}
        #: Messages parsed by their row's seq (see _getSessionParsedOnce),
        #: and the length of their JSON.
        self._parsed: dict[int, Message] = {}
        self._parsedSize = 0

    # -- reading

    def listSessions(self) -> Deferred[list[str]]:
        return self._db.read(self._listSessionsOnce)

    def _listSessionsOnce(self, cursor: sqlite3.Cursor) -> list[str]:
        """
        The session ids, read again only when the database has changed
        since this reader connection last read them (C{PRAGMA
        data_version} counts the commits of every other connection, of
        this process or another).  Runs on a reader thread.
        """
        if not isinstance(cursor, sqlite3.Cursor):
            return _listSessions(cursor)  # PostgreSQL: no data_version
        connection = cursor.connection
        version = cursor.execute("PRAGMA data_version").fetchone()[0]
        listed = self._listed.get(connection)
        if listed is not None and listed[0] == version:
            return list(listed[1])
        ids = _listSessions(cursor)
        self._listed[connection] = (version, ids)
        return list(ids)

    def getSession(self, sessionId: str) -> Deferred[Session | None]:
        return self._db.read(self._getSessionParsedOnce, sessionId)

    def _getSessionParsedOnce(
        self, cursor: sqlite3.Cursor, sessionId: str
    ) -> Session | None:
        """
        The session and its messages, each message parsed once: a message's row is
        never changed, only deleted, and its C{seq} is never used again
        (AUTOINCREMENT), so the parsed L{Message} is kept by C{seq}.  A view
        of a 5,000-message session spent most of its time (and its thread's
        GIL, which the reactor waits for) in C{json.loads} and
        L{Message.fromDict}.  Runs on a reader thread.
        """
        cursor.execute("SELECT meta FROM sessions WHERE id = ?", (sessionId,))
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(
            "SELECT seq, data FROM messages WHERE session = ? ORDER BY seq",
            (sessionId,),
        )
        messages = []
        for seq, data in cursor.fetchall():
            message = self._parsedMessage(seq, data)
            if message is not None:
                messages.append(message)
        return _withMessages(sessionId, row[0], tuple(messages))

    def _parsedMessage(self, seq: int, data: str) -> Message | None:
        """
        The message of row C{seq} (whose JSON is C{data}), parsed once; None
        if it is not a JSON object (as L{Session.fromDict} skips those).
        """
        parsed = self._parsed
        message = parsed.get(seq)
        if message is None:
            value = json.loads(data)
            if not isinstance(value, dict):
                return None
            message = Message.fromDict(value)
            if self._parsedSize > PARSED_MESSAGES_SIZE:
                # Crude, and safe from two reader threads at once.
                parsed.clear()
                self._parsedSize = 0
            parsed[seq] = message
            self._parsedSize += len(data)
        return message

    def getSessionPage(
        self, sessionId: str, before: int | None, around: int
    ) -> Deferred[SessionPage | None]:
        """
        The part of a session a page needs: its settings, its message count
        and usage, and the messages up to C{around} either side of index
        C{before} (the end when None), read and decoded alone.  The page of
        a 5,000-message session decoded all of them on a reader thread,
        holding the GIL that the reactor's thread waited for.
        """
        return self._db.read(self._getSessionPage, sessionId, before, around)

    def _getSessionPage(
        self, cursor: sqlite3.Cursor, sessionId: str, before: int | None, around: int
    ) -> SessionPage | None:
        # Runs on a reader thread.  Rows that are not JSON objects are not
        # messages (as in _getSessionParsedOnce): chatweb writes each
        # message as an object, so its text starts with "{".
        cursor.execute("SELECT meta FROM sessions WHERE id = ?", (sessionId,))
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(
            "SELECT count(*) FROM messages WHERE session = ? AND data LIKE ?",
            (sessionId, "{%"),
        )
        total = int(cursor.fetchone()[0])
        end = total if before is None else max(0, min(before, total))
        first, last = max(0, end - around), min(total, end + around)
        cursor.execute(
            "SELECT seq, data FROM messages WHERE session = ? AND data LIKE ?"
            " ORDER BY seq LIMIT ? OFFSET ?",
            (sessionId, "{%", last - first, first),
        )
        messages = tuple(
            message
            for seq, data in cursor.fetchall()
            if (message := self._parsedMessage(seq, data)) is not None
        )
        # Only the messages whose text names "usage" can report one (each
        # parsed once, as the page's messages are).
        cursor.execute(
            "SELECT seq, data FROM messages WHERE session = ? AND data LIKE ?"
            " AND data LIKE ? ORDER BY seq",
            (sessionId, "{%", '%"usage"%'),
        )
        usage = Usage()
        for seq, data in cursor.fetchall():
            message = self._parsedMessage(seq, data)
            if message is not None and message.tokenUsage is not None:
                usage = usage + message.tokenUsage
        return SessionPage(_withMessages(sessionId, row[0], messages), first, total, usage)

    # -- busy and idle

    def isBusy(self, sessionId: str) -> bool:
        return sessionId in self._busy

    def whenIdle(self, sessionId: str) -> Deferred[None]:
        if sessionId not in self._busy:
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            waiters = self._idleWaiters.get(sessionId, [])
            if d in waiters:
                waiters.remove(d)

        waiter: Deferred[None] = Deferred(cancel)
        self._idleWaiters.setdefault(sessionId, []).append(waiter)
        return waiter

    def _becameIdle(self, sessionId: str) -> None:
        self._busy.discard(sessionId)
        for waiter in self._idleWaiters.pop(sessionId, []):
            waiter.callback(None)

    # -- writing

    def recorder(self) -> Recorder | None:
        """
        How to deliver in the queue's own transaction (see
        L{chatweb.store.SQLiteJournal.appendRecorded}), when a delivery is
        only the message recorded: no responder answers.  Else None.
        """
        if self.responder.answers:
            return None
        return self._recordInTransaction

    def _recordInTransaction(
        self, cursor: Any, delivery: Delivery, now: float
    ) -> list[EventRow]:
        # The journal records and publishes these with its own, once
        # committed: both sinks are the service's hub.
        rows = _deliveryRecorded(cursor, delivery, now)[1]
        return rows if self.eventSink is not None else []

    def deliver(self, delivery: Delivery) -> Deferred[None]:
        self._busy.add(delivery.session)
        d = Deferred.fromCoroutine(self._process(delivery))

        def idle(result: object) -> object:
            self._becameIdle(delivery.session)
            return result

        return d.addBoth(idle)

    async def _process(self, delivery: Delivery) -> None:
        added = self._published(
            await self._db.write(
                _recordDelivery,
                delivery,
                self._clock.seconds(),
                self.eventSink is not None,
            )
        )
        if not self.responder.answers:
            return
        # A redelivery after a crash: answer only if no answer was stored.
        if not added and await self._db.read(_answered, delivery.id):
            return
        session = await self.getSession(delivery.session)
        if session is None or not session.messages:
            return
        try:
            respond: Any = self.responder.respond
            if getattr(self.responder, "streams", False):
                replies = await respond(
                    session, session.messages[-1], emit=delivery.emit
                )
            else:
                replies = await self.responder.respond(session, session.messages[-1])
        except Stopped as stopped:
            # Kept, marked as chat.nvim marks a cancelled request, but not as
            # this delivery's answer: a delivery cancelled by its timeout is
            # tried again.
            why = (delivery.cancelReason and delivery.cancelReason()) or "stop"
            await self._store(
                delivery,
                stopped.partial + [self._errorRecord(CANCELLED[why])],
                replyTo=False,
            )
            raise CancelledError()
        except ModelError as e:
            if e.transient:
                raise
            # Permanent: the error is the answer; the queue moves on.  Said
            # in the log too: a wrong key would otherwise show only in
            # each session.
            _log.warn(
                "The model's answer to message {id} of session {session!r}"
                " is an error: {error}",
                id=delivery.id,
                session=delivery.session,
                error=str(e),
            )
            replies = e.partial + [self._errorRecord(str(e))]
        if replies:
            await self._store(delivery, list(replies))

    def _errorRecord(self, error: str) -> Message:
        return Message(error=error, created=int(self._clock.seconds()))

    async def _store(
        self, delivery: Delivery, messages: list[Message], replyTo: bool = True
    ) -> None:
        self._published(
            await self._db.write(
                _appendReplies,
                delivery.session,
                delivery.id,
                messages,
                self._clock.seconds(),
                self.eventSink is not None,
                replyTo,
            )
        )

    def providers(self) -> list[dict[str, Any]]:
        """
        What C{GET /providers} lists: the responder's providers, if it has
        some; else the responder itself if it answers.
        """
        providers = getattr(self.responder, "providers", None)
        if callable(providers):
            return list(providers())
        if not self.responder.answers:
            return []
        name = str(self.responder.name)
        return [{"name": name, "models": [name]}]

    def providerProblem(self, name: str) -> str | None:
        """
        What is wrong with C{name} as a session's provider (one the
        responder has not configured), or None.  A responder without named
        providers takes any: the field is then chat.nvim's metadata only.
        """
        problem = getattr(self.responder, "providerProblem", None)
        return problem(name) if callable(problem) else None

    def _published(self, result: tuple[Any, list[Event]]) -> Any:
        return publishCommitted(self.eventSink, result)

    def createSession(self, **metadata: Any) -> Deferred[str]:
        """
        Create an empty session with a server-made id (see L{sessionIdFor})
        and the given chat.nvim metadata (provider, model, cwd, ...).
        """
        now = self._clock.seconds()
        return self._db.write(
            _withEvent,
            _createSession,
            self.eventSink is not None,
            lambda sessionId: (EventKind.SESSION_CREATED, sessionId, now),
            sessionIdFor(now),
            now,
            metadata,
        ).addCallback(self._published)

    def importSession(self, session: Session, replace: bool = False) -> Deferred[bool]:
        """
        Store a whole session (one read from a chat.nvim file, say) in one
        transaction.  Fires with False, writing nothing, when a session of
        that id exists and C{replace} is false.
        """
        now = self._clock.seconds()

        def kindOf(written: bool) -> tuple[EventKind, str, float] | None:
            if not written:
                return None
            kind = EventKind.SESSION_CHANGED if replace else EventKind.SESSION_CREATED
            return kind, session.id, now

        return self._db.write(
            _withEvent,
            _importSession,
            self.eventSink is not None,
            kindOf,
            session,
            replace,
            now,
        ).addCallback(self._published)

    # -- managing (ISessionManager)

    def _change(self, operation: Any, *args: Any) -> Deferred[Any]:
        return self._db.write(
            operation, *args, self._clock.seconds(), self.eventSink is not None
        ).addCallback(self._published)

    def deleteSession(self, sessionId: str) -> Deferred[bool]:
        return self._change(_deleteSession, sessionId)

    def clearSession(self, sessionId: str) -> Deferred[bool]:
        return self._change(_clearSession, sessionId)

    def deleteMessage(self, sessionId: str, index: int) -> Deferred[bool]:
        return self._change(_deleteMessage, sessionId, index)

    def updateSession(self, sessionId: str, field: str, value: Any) -> Deferred[bool]:
        return self._change(_updateSession, sessionId, field, value)
