"""
A program with web routes of its own, and chatweb's API mounted at /chat/.

  - GET /         the program's home page (no key)
  - POST /upload  the program's upload route: any body, no key, no
                  chatweb limit
  - /chat/...     chatweb's API: key, limits, share links

Run it with twistd (`twistd -ny embedded_site.py`, after setting
CHATWEB_API_KEY and CHATWEB_DATA), or build the service from your own code
with makeService().
"""

from __future__ import annotations

import os
from typing import Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Application, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Request

from chatweb import ChatWebService
from chatweb.web import ChatWebSite


class Home(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"my program\n"


class Upload(Resource):
    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        size = len(request.content.read()) if request.content is not None else 0
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"%d bytes\n" % (size,)


def makeRoot(chatweb: ChatWebService) -> Resource:
    """
    The program's resource tree, with chatweb's API at /chat/.
    """
    root = Resource()
    root.putChild(b"", Home())
    root.putChild(b"upload", Upload())
    root.putChild(b"chat", chatweb.resource)
    return root


def makeSite(chatweb: ChatWebService) -> ChatWebSite:
    """
    A ChatWebSite for the whole tree: chatweb's body limit and its refusal
    of bodies without a key apply under /chat only (mount=); connection
    limits and timeouts apply to the whole site.
    """
    return ChatWebSite(
        makeRoot(chatweb),
        mount=b"/chat",
        limits=chatweb.limits,
        refuseBeforeBody=chatweb.api.refuseBeforeBody,
    )


def makeService(
    apiKeys: Sequence[str], dataDir: str, endpoint: str = "tcp:8080:interface=127.0.0.1"
) -> MultiService:
    """
    The program's service: chatweb (which runs the queue, listening on
    nothing itself) and the web server for the whole site.
    """
    from twisted.internet import reactor

    program = MultiService()
    chatweb = ChatWebService(apiKeys=apiKeys, dataDir=dataDir, endpoint=None)
    chatweb.setServiceParent(program)
    web = StreamServerEndpointService(serverFromString(reactor, endpoint), makeSite(chatweb))
    web.setServiceParent(program)
    return program


if __name__ == "__builtin__" or __name__ == "builtins":
    # Run by `twistd -ny embedded_site.py`.
    application = Application("my-program")
    makeService(
        [os.environ["CHATWEB_API_KEY"]], os.environ["CHATWEB_DATA"]
    ).setServiceParent(application)
