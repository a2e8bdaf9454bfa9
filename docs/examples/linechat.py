"""
An existing Twisted program, a line-based chat server with rooms (on
twisted.protocols.basic), that gains chatweb: scripts post into a room over
HTTP, and the room is a chatweb session through an adapter of its own.

  - telnet 127.0.0.1 8023: the chat.  The first line is your name; then
    `/join ROOM` (you start in "lobby"), `/hold` and `/release` (while
    someone holds the floor, chatweb's messages for the room wait), and
    anything else is said to the room.
  - http://127.0.0.1:8080/chat/...: chatweb's API.  A message posted to
    session ROOM is said in that room by "chatweb", in order, once nobody
    holds the floor.

Run it with twistd (`twistd -ny linechat.py`, after setting
CHATWEB_API_KEY and CHATWEB_DATA), or build the service from your own code
with makeService().  tests/test_examples.py runs it.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Application, MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from chatweb import ChatWebService, Delivery, ISessionAdapter, Message, Session
from chatweb.web import ChatWebSite

# -- the program as it was: a chat server


class Room:
    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[ChatUser] = set()
        #: (speaker, text, time), in order.
        self.history: list[tuple[str, str, float]] = []
        #: Who holds the floor, if anyone.
        self.holder: ChatUser | None = None

    def say(self, speaker: str, text: str) -> None:
        self.history.append((speaker, text, time.time()))
        for member in self.members:
            member.sendLine(f"<{speaker}> {text}".encode("utf-8"))


class ChatUser(LineReceiver):
    delimiter = b"\n"
    factory: ChatFactory

    def connectionMade(self) -> None:
        self.name: str | None = None
        self.room: Room | None = None
        self.sendLine(b"name?")

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if self.name is None:
            self.name = text.strip() or "anonymous"
            self.join("lobby")
        elif text.startswith("/join "):
            self.join(text[len("/join "):].strip())
        elif text == "/hold":
            self.factory.hold(self)
        elif text == "/release":
            self.factory.release(self)
        elif self.room is not None:
            self.room.say(self.name, text)

    def join(self, name: str) -> None:
        self.leave()
        self.room = self.factory.room(name)
        self.room.members.add(self)
        self.sendLine(f"* you are in {name}".encode("utf-8"))

    def leave(self) -> None:
        if self.room is not None:
            self.room.members.discard(self)
            if self.room.holder is self:
                self.factory.release(self)

    def connectionLost(self, reason: object = None) -> None:
        self.leave()


class ChatFactory(Factory[ChatUser]):
    protocol = ChatUser

    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}
        #: Called with a room's name when its floor is released.
        self.onRelease: list = []

    def room(self, name: str) -> Room:
        if name not in self.rooms:
            self.rooms[name] = Room(name)
        return self.rooms[name]

    def hold(self, user: ChatUser) -> None:
        if user.room is not None and user.room.holder is None:
            user.room.holder = user
            user.room.say("*", f"{user.name} holds the floor")

    def release(self, user: ChatUser) -> None:
        room = user.room
        if room is not None and room.holder is user:
            room.holder = None
            room.say("*", f"{user.name} released the floor")
            for notify in list(self.onRelease):
                notify(room.name)


# -- what the program adds: an adapter, and chatweb mounted at /chat/


@implementer(ISessionAdapter)
class RoomsAdapter:
    """
    The chat's rooms as chatweb sessions: a room is busy while someone
    holds its floor; delivering a message says it in the room.
    """

    def __init__(self, chat: ChatFactory) -> None:
        self._chat = chat
        self._delivered: set[int] = set()
        self._idle: dict[str, list[Deferred]] = {}
        chat.onRelease.append(self._released)

    def listSessions(self) -> Deferred:
        return succeed(sorted(name for name, room in self._chat.rooms.items() if room.history))

    def getSession(self, sessionId: str) -> Deferred:
        room = self._chat.rooms.get(sessionId)
        if room is None or not room.history:
            return succeed(None)
        messages = tuple(
            Message(role="user", content=f"{speaker}: {text}", created=when)
            for speaker, text, when in room.history
        )
        return succeed(Session(id=sessionId, messages=messages))

    def isBusy(self, sessionId: str) -> bool:
        room = self._chat.rooms.get(sessionId)
        return room is not None and room.holder is not None

    def whenIdle(self, sessionId: str) -> Deferred:
        if not self.isBusy(sessionId):
            return succeed(None)
        waiter: Deferred = Deferred(lambda d: self._idle[sessionId].remove(d))
        self._idle.setdefault(sessionId, []).append(waiter)
        return waiter

    def deliver(self, delivery: Delivery) -> Deferred:
        if delivery.id not in self._delivered:  # again after a crash: once
            self._delivered.add(delivery.id)
            self._chat.room(delivery.session).say("chatweb", delivery.content)
        return succeed(None)

    def _released(self, name: str) -> None:
        for waiter in self._idle.pop(name, []):
            waiter.callback(None)


class Home(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"linechat: telnet to the chat port; chatweb is at /chat/\n"


def makeService(
    apiKeys: Sequence[str],
    dataDir: str,
    chatEndpoint: str = "tcp:8023:interface=127.0.0.1",
    webEndpoint: str = "tcp:8080:interface=127.0.0.1",
) -> MultiService:
    """
    The program: the chat server (as before), chatweb with the rooms
    adapter (listening on nothing itself), and a web server with chatweb's
    API at /chat/.
    """
    from twisted.internet import reactor

    program = MultiService()
    chat = ChatFactory()
    StreamServerEndpointService(serverFromString(reactor, chatEndpoint), chat).setServiceParent(
        program
    )
    chatweb = ChatWebService(
        apiKeys=apiKeys, dataDir=dataDir, endpoint=None, adapter=RoomsAdapter(chat)
    )
    chatweb.setServiceParent(program)
    root = Resource()
    root.putChild(b"", Home())
    root.putChild(b"chat", chatweb.resource)
    site = ChatWebSite(root, mount=b"/chat", limits=chatweb.limits,
                       refuseBeforeBody=chatweb.api.refuseBeforeBody)
    StreamServerEndpointService(serverFromString(reactor, webEndpoint), site).setServiceParent(
        program
    )
    return program


if __name__ == "__builtin__" or __name__ == "builtins":
    # Run by `twistd -ny linechat.py`.
    application = Application("linechat")
    makeService(
        [os.environ["CHATWEB_API_KEY"]], os.environ["CHATWEB_DATA"]
    ).setServiceParent(application)
