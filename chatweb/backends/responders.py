"""
What answers a user message in a session of the default backend.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from chatweb.interfaces import IResponder
from chatweb.model._values import Message, Session


@implementer(IResponder)
class NoResponder:
    """
    Record the message only: nothing answers.
    """

    name = "none"
    answers = False

    def respond(self, session: Session, message: Message) -> Deferred[list[Message]]:
        return succeed([])


@implementer(IResponder)
class EchoResponder:
    """
    Answer every message with an assistant message of the same content:
    enough to see the whole path work without a model.
    """

    name = "echo"
    answers = True

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def respond(self, session: Session, message: Message) -> Deferred[list[Message]]:
        return succeed(
            [
                Message(
                    role="assistant",
                    content=message.content,
                    created=self._clock.seconds(),
                )
            ]
        )


RESPONDERS = ("none", "echo")


def makeResponder(name: str, clock: IReactorTime) -> IResponder:
    """
    The responder called C{name} (one of L{RESPONDERS}).
    """
    if name == "none":
        return NoResponder()
    if name == "echo":
        return EchoResponder(clock)
    raise ValueError(f"unknown responder {name!r}; choose one of {', '.join(RESPONDERS)}")
