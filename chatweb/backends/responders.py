"""
What answers a user message in a session of the default backend.
"""

from __future__ import annotations

from typing import Any

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
    streams = False

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
    streams = False

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


RESPONDERS = ("none", "echo", "openai", "anthropic")


def makeResponder(name: str, clock: IReactorTime, **options: Any) -> IResponder:
    """
    The responder called C{name} (one of L{RESPONDERS}).  For C{openai}
    and C{anthropic}, C{clock} is the reactor and C{options} are
    L{chatweb.backends._providers.providerFromOptions}'s (C{baseUrl},
    C{model}, C{keyFile}, C{systemPrompt}, C{systemPromptFile},
    C{timeout}) plus C{historyBudget}; or C{providersFile}, a TOML file of
    named providers.
    """
    if name == "none":
        return NoResponder()
    if name == "echo":
        return EchoResponder(clock)
    if name in ("openai", "anthropic"):
        from chatweb.backends._models import ModelResponder
        from chatweb.backends._providers import loadProviders, providerFromOptions

        budget = options.pop("historyBudget", None)
        extra = {} if budget is None else {"historyBudget": budget}
        providersFile = options.pop("providersFile", None)
        if providersFile is not None:
            providers, default = loadProviders(providersFile)
            return ModelResponder(providers, clock, default=default, **extra)
        return ModelResponder([providerFromOptions(name, **options)], clock, **extra)
    raise ValueError(f"unknown responder {name!r}; choose one of {', '.join(RESPONDERS)}")
