"""
The seams of chatweb: what it needs from a chat backend (L{ISessionAdapter}),
from durable storage of the queue (L{IJournal}), and from whatever answers in
a session of the default backend (L{IResponder}).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISessionAdapter(Interface):
    """
    The chat backend that owns the sessions.

    The queue delivers through it, and the API reads sessions through it.
    Every method that may wait returns a L{Deferred}; none may block.
    """

    def listSessions():
        """
        @return: a L{Deferred} firing with the ids (C{list} of C{str}) of the
            sessions that exist.
        """

    def getSession(sessionId):
        """
        @return: a L{Deferred} firing with the L{chatweb.model.Session}, or
            with L{None} if there is no such session.
        """

    def isBusy(sessionId):
        """
        Is the session working on something now (answering a message, a
        user typing in it)?  Answer from memory: this is called for every
        delivery.

        @return: C{bool}
        """

    def whenIdle(sessionId):
        """
        @return: a L{Deferred} that fires (with anything) when the session
            next becomes idle.  The queue may cancel it when it stops
            waiting; cancelling must not disturb the session.
        """

    def deliver(delivery):
        """
        Start processing a message in its session, creating the session if
        it does not exist.

        @param delivery: a L{chatweb.model.Delivery}.  The same
            C{delivery.id} may be delivered again after a crash; record it
            to ignore repeats.
        @return: a L{Deferred} that fires when the session is done with the
            message.  An errback means the delivery failed and the queue
            retries it.  Cancelling the Deferred stops the work.
        """


class IJournal(Interface):
    """
    Durable storage of the queue: messages are written here before the
    client hears 204, and stay until delivered (or failed for good).
    """

    def append(session, content, received, idempotencyKey=None):
        """
        Store a message durably.

        With an C{idempotencyKey} seen in the last 24 hours for the same
        session and content, store nothing and answer with the message
        stored then (its C{duplicate} set); seen with another session or
        content, fail with L{chatweb.errors.IdempotencyConflict}.

        @return: a L{Deferred} firing with its L{chatweb.model.QueuedMessage}
            once it is on disk; messages appended one after another get
            increasing ids.
        """

    def failedSessions():
        """
        @return: a L{Deferred} firing with the ids of the sessions that hold
            failed messages (dead letters).
        """

    def requeue(messageId):
        """
        Make a failed message pending again, its attempts reset.

        @return: a L{Deferred} firing with the updated message; failing with
            L{chatweb.errors.UnknownMessage} or L{chatweb.errors.WrongState}.
        """

    def discard(messageId):
        """
        Drop a pending or failed message on purpose (kept, marked
        discarded).

        @return: a L{Deferred} firing with the updated message; failing with
            L{chatweb.errors.UnknownMessage} or L{chatweb.errors.WrongState}.
        """

    def pending():
        """
        @return: a L{Deferred} firing with every pending
            L{chatweb.model.QueuedMessage}, in id order.
        """

    def markDelivered(messageId):
        """
        @return: a L{Deferred} firing once the message is recorded as
            delivered.
        """

    def recordFailure(messageId, error, final):
        """
        Record a failed delivery attempt; C{final} marks the message failed
        for good (a dead letter, kept and visible).

        @return: a L{Deferred} firing with the updated
            L{chatweb.model.QueuedMessage}.
        """

    def messages(session):
        """
        @return: a L{Deferred} firing with the session's pending and failed
            messages, in id order.
        """

    def pendingSessions():
        """
        @return: a L{Deferred} firing with a C{dict}: each session that has
            pending messages, to C{(how many, the highest of their ids)}.
        """

    def nextPending(session, afterId=0):
        """
        @return: a L{Deferred} firing with the session's oldest pending
            L{chatweb.model.QueuedMessage} whose id is above C{afterId}, or
            L{None}.
        """

    eventSink = Attribute(
        "None, or a callable given each L{chatweb.model.Event} the journal"
        " records, once its transaction has committed, in id order.  Every"
        " change the journal makes records one: append (message.queued, not"
        " for a duplicate), requeue (message.queued), discard"
        " (message.discarded), markDelivered (delivery.done), recordFailure"
        " (delivery.failed)."
    )

    def logEvent(kind, session, data=None):
        """
        Record an event that is not a journal change (delivery.started, ...).

        @return: a L{Deferred} firing with the L{chatweb.model.Event}.
        """

    def eventsSince(afterId, session=None, limit=1000):
        """
        @return: a L{Deferred} firing with the events kept whose id is above
            C{afterId} (of C{session} only, if given), in id order, at most
            C{limit}.
        """

    def messageHistory(messageId):
        """
        @return: a L{Deferred} firing with C{(message, events)}: the
            L{chatweb.model.QueuedMessage} of that id (in any state) or None,
            and the events kept that moved it (message.queued,
            delivery.started, delivery.done, delivery.failed,
            message.discarded), in id order.
        """

    def pruneEvents(before):
        """
        Forget the events recorded before the time C{before}.

        @return: a L{Deferred} firing with how many were forgotten.
        """


class IResponder(Interface):
    """
    What answers a user message in a session of the default backend.
    """

    name = Attribute("A short name for logs and options: none, echo, ...")
    answers = Attribute(
        "False if it never answers: the backend then skips reading the session."
    )

    def respond(session, message):
        """
        @param session: the L{chatweb.model.Session}, the new message last.
            Its messages include chat.nvim's role-less completion and error
            records: a responder that gives a model the history takes
            C{session.conversation()}, which leaves them out.
        @param message: the new user L{chatweb.model.Message}.
        @return: a L{Deferred} firing with a list of messages to add to the
            session (possibly empty).  Cancelling it stops the answer.
            A responder that asks a model fails with a
            L{chatweb.backends.ModelError}: a transient one is retried by the
            queue; a permanent one is stored in the session as an error
            record.  A responder with a true C{streams} attribute is
            called with C{emit=} too: a callable given the answer's text as
            it arrives (or None).
        """


class ISessionManager(Interface):
    """
    Optional: an L{ISessionAdapter} that also lets clients manage its
    sessions (C{POST /session/new}, C{DELETE /session/{id}}, C{/clear},
    C{DELETE /session/{id}/messages/{index}}, C{PUT /session/{id}/FIELD},
    C{/retry}).  The API answers those routes with a 501 when the adapter
    does not provide it.

    Each change records its event (session.created, changed, cleared,
    deleted) in the same transaction.  Every method returns a L{Deferred}.
    """

    def createSession(**metadata):
        """
        Create an empty session with the given chat.nvim metadata
        (C{provider}, C{model}, ... as keywords).

        @return: a L{Deferred} firing with the new session's id, in
            chat.nvim's form C{YYYY-MM-DD-HH-MM-SS} (a suffix C{-2}, C{-3},
            ... keeps it unique).
        """

    def deleteSession(sessionId):
        """
        @return: a L{Deferred} firing with True, or False if there is no
            such session.
        """

    def clearSession(sessionId):
        """
        Clear the session as chat.nvim does: its messages and usage go, its
        C{cleared_at} becomes now.

        @return: a L{Deferred} firing with True, or False if there is no
            such session.
        """

    def deleteMessage(sessionId, index):
        """
        Delete the message at C{index} (0-based).

        @return: a L{Deferred} firing with True, False if there is no such
            session; failing with L{IndexError} if there is no such message.
        """

    def updateSession(sessionId, field, value):
        """
        Set one metadata field (title, pin, provider, model, cwd).

        @return: a L{Deferred} firing with True, or False if there is no
            such session.
        """
