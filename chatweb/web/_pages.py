"""
The session page and the export, as the routes need them: rendering (pure,
in L{chatweb.render}) run on the reactor's thread pool.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from chatweb.model import QueuedMessage, Session
from chatweb.render._preview import inBackground, renderSession


def renderSessionInThread(
    session: Session,
    queued: Sequence[QueuedMessage] = (),
    before: int | None = None,
    pageURL: Callable[[int | None], str] | None = None,
) -> Deferred[str]:
    """
    L{renderSession} on the reactor's thread pool.  Rendering is pure CPU
    work that grows with the session (about a third of a millisecond per
    message: see bench/render.py), too long for the reactor thread once a
    session has thousands of messages.
    """
    return deferToThread(
        inBackground, renderSession, session, tuple(queued), before, pageURL
    )
