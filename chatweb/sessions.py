"""
The read model of sessions: one place that knows a session's data (from the
adapter), its queued and failed messages (from the journal) and what is in
flight (from the queue).  The web layer asks it instead of assembling a
session from the three.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import attrs
from twisted.internet.defer import Deferred

from chatweb.interfaces import IJournal, ISessionAdapter
from chatweb.model import FAILED, PENDING, Message, QueuedMessage, Session, SessionPage


class _InFlight(Protocol):
    def deliveringNow(self, session: str) -> int | None: ...


@attrs.frozen
class SessionView:
    """
    A session as a reader sees it.

    @ivar session: its data; an empty L{Session} if it does not exist yet
        but has messages waiting (the first delivery creates it).
    @ivar queued: its pending messages in delivery order (the one in
        flight, if any, among them: it is pending until delivered).
    @ivar failed: its dead letters, in id order.
    @ivar inFlight: the id of the message being delivered, or None.
    """

    session: Session
    queued: tuple[QueuedMessage, ...] = ()
    failed: tuple[QueuedMessage, ...] = ()
    inFlight: int | None = None

    @property
    def id(self) -> str:
        return self.session.id


def sessionView(
    sessionId: str,
    session: Session | None,
    waiting: Sequence[QueuedMessage],
    inFlight: int | None = None,
) -> SessionView | None:
    """
    The L{SessionView} of C{sessionId} from what was read of it: its data
    (None if it does not exist) and its undelivered messages in id order
    (C{waiting}); None if it has neither.  (Also what a page worker,
    L{chatweb.web._pageworker}, reads in another process.)
    """
    if session is None and not waiting:
        return None
    return SessionView(
        session=session if session is not None else Session(id=sessionId),
        queued=tuple(m for m in waiting if m.state == PENDING),
        failed=tuple(m for m in waiting if m.state == FAILED),
        inFlight=inFlight,
    )


def pageView(
    sessionId: str,
    page: SessionPage | None,
    waiting: Sequence[QueuedMessage],
    inFlight: int | None = None,
) -> tuple[SessionPage, SessionView] | None:
    """
    As L{sessionView}, for the part of the session a page shows.
    """
    view = sessionView(sessionId, None if page is None else page.session, waiting, inFlight)
    if view is None:
        return None
    return (page if page is not None else SessionPage.whole(view.session)), view


def undelivered(view: SessionView) -> list[QueuedMessage]:
    """
    The messages of C{view} that a page shows after the others: queued and
    failed, in id order.
    """
    return sorted(view.queued + view.failed, key=lambda m: m.id)


class Sessions:
    """
    Sessions, their queued and failed messages, and what is in flight.
    """

    def __init__(
        self, adapter: ISessionAdapter, journal: IJournal, queue: _InFlight
    ) -> None:
        self._adapter = adapter
        self._journal = journal
        self._queue = queue

    def ids(self) -> Deferred[list[str]]:
        """
        The ids of the sessions that exist.
        """
        return self._adapter.listSessions()

    def get(self, sessionId: str) -> Deferred[SessionView | None]:
        """
        The L{SessionView} of C{sessionId}; None if the session neither
        exists nor has messages queued or failed.
        """
        return Deferred.fromCoroutine(self._get(sessionId))

    async def _get(self, sessionId: str) -> SessionView | None:
        # The journal first: a message delivered between the two reads is
        # then in the session (the adapter stores it before the journal
        # lets it go), never in neither.
        waiting: list[QueuedMessage] = await self._journal.messages(sessionId)
        session = await self._adapter.getSession(sessionId)
        return sessionView(sessionId, session, waiting, self._queue.deliveringNow(sessionId))

    def page(
        self, sessionId: str, before: int | None, around: int
    ) -> Deferred[tuple[SessionPage, SessionView] | None]:
        """
        What a page of C{sessionId} shows: the part of the session around
        index C{before} (L{SessionPage}: up to C{around} messages either
        side; the end when None), and its L{SessionView}, whose session
        holds the same messages only.  None as for L{get}.

        An adapter with a C{getSessionPage(sessionId, before, around)}
        method reads only that part; from others the whole session is read.
        """
        return Deferred.fromCoroutine(self._page(sessionId, before, around))

    async def _page(
        self, sessionId: str, before: int | None, around: int
    ) -> tuple[SessionPage, SessionView] | None:
        # The journal first, as in _get.
        waiting: list[QueuedMessage] = await self._journal.messages(sessionId)
        readPage = getattr(self._adapter, "getSessionPage", None)
        page: SessionPage | None
        if readPage is not None:
            page = await readPage(sessionId, before, around)
        else:
            session = await self._adapter.getSession(sessionId)
            page = None if session is None else SessionPage.whole(session)
        return pageView(sessionId, page, waiting, self._queue.deliveringNow(sessionId))

    def messages(self, sessionId: str, since: int = 0) -> Deferred[list[Message] | None]:
        """
        The messages of C{sessionId} from index C{since} on (0: all); None
        if there is no such session.
        """

        def after(session: Session | None) -> list[Message] | None:
            if session is None:
                return None
            return list(session.messages[max(since, 0):])

        return self._adapter.getSession(sessionId).addCallback(after)


#: Characters of a message's content that a session's detail shows.
LAST_MESSAGE_CHARACTERS = 100
#: Characters of the first user message that make an untitled session's
#: title (as chat.nvim does).
TITLE_CHARACTERS = 50


def sessionDetail(view: SessionView, inProgress: bool) -> dict[str, object]:
    """
    The JSON form of a session's detail, as chat.nvim's C{GET /sessions/{id}}
    gives it: id, title, cwd, provider, model, pin, in_progress,
    message_count, last_message (role, content cut to 100 characters,
    created; chat.nvim's role-less records are skipped) or None, cleared_at.
    """
    session = view.session
    title = session.title
    if title is None:
        first = next(
            (
                m.content
                for m in session.messages
                if m.role == "user" and isinstance(m.content, str)
            ),
            None,
        )
        title = first[:TITLE_CHARACTERS] if first is not None else ""
    last = next((m for m in reversed(session.messages) if m.role is not None), None)
    lastMessage = None
    if last is not None:
        content = last.content
        lastMessage = {
            "role": last.role,
            "content": content[:LAST_MESSAGE_CHARACTERS] if isinstance(content, str) else None,
            "created": last.created,
        }
    return {
        "id": session.id,
        "title": title,
        "cwd": session.cwd,
        "provider": session.provider,
        "model": session.model,
        "pin": bool(session.pin),
        "in_progress": inProgress,
        "message_count": len(session.messages),
        "last_message": lastMessage,
        "cleared_at": session.cleared_at,
    }
