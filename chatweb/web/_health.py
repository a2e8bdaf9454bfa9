"""
C{GET /healthz}: readiness, for load balancers and orchestrators (not for
liveness: during a database outage every instance is unready).  It needs no key and says nothing but C{{"status": ...}}:
200 C{ok} when the store is open and the queue runs, 503 C{starting},
C{stopping} or C{database unreachable} (a database server that the last
attempt could not reach) otherwise.
"""

from __future__ import annotations

from typing import Callable

from twisted.web.iweb import IRequest

from chatweb.web._errors import _error
from chatweb.web._json import _json

#: The states C{status()} may give.
OK = "ok"
STARTING = "starting"
STOPPING = "stopping"
UNREACHABLE = "database unreachable"


class HealthCheck:
    """
    Answers C{GET /healthz} from C{status}, a callable that gives L{OK},
    L{STARTING}, L{STOPPING} or L{UNREACHABLE}.
    """

    def __init__(self, status: Callable[[], str]) -> None:
        self._status = status

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _error(request, 404, "not found")
        status = self._status()
        request.setHeader(b"Cache-Control", b"no-store")
        if status != OK:
            request.setResponseCode(503)
            request.setHeader(b"Retry-After", b"1")
        return _json(request, {"status": status})


def isHealthCheck(request: IRequest) -> bool:
    """
    Whether C{request} is C{GET /healthz} (or HEAD), relative to where the
    API is mounted: the one request let in without a key.
    """
    return request.method in (b"GET", b"HEAD") and request.postpath == [b"healthz"]
