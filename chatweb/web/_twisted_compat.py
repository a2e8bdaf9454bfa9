"""
Every use chatweb's server makes of a private Twisted name, in one place
(its requests to model servers make one more: L{chatweb._httpclient}).

Twisted offers no public way to do these few things; each is wrapped here
behind a name of our own, and tests/test_twisted_compat.py checks that
Twisted still has (and still calls) every one of them, so that a Twisted
release that changes them fails that test by name instead of breaking
chatweb quietly.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.web.http import HTTPChannel

#: The private names used below, by owner: the compatibility test checks
#: that each one exists.
PRIVATE_NAMES: dict[type, tuple[str, ...]] = {
    HTTPChannel: (
        "_send100Continue",
        "_respondToBadRequestAndDisconnect",
        # LineReceiver's: bytes of a line not yet whole, and a read under way.
        "_buffer",
        "_busyReceiving",
    ),
    StreamServerEndpointService: ("_raiseSynchronously", "_waitingForPort"),
}


class HTTPChannelHooks(HTTPChannel):
    """
    An L{HTTPChannel} whose two private steps call public hooks:

      - L{badRequest}, where Twisted answers a malformed request with a
        bare 400 and closes the connection;
      - L{shouldContinue}, before Twisted sends C{100 Continue} to a client
        that asked for it (C{Expect: 100-continue}).
    """

    def badRequest(self) -> None:
        """
        The request is malformed: answer it and close the connection.
        """
        super()._respondToBadRequestAndDisconnect()

    def shouldContinue(self) -> bool:
        """
        Whether to send C{100 Continue} to the current request.
        """
        return True

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.badRequest()

    def _send100Continue(self) -> None:
        if self.shouldContinue():
            super()._send100Continue()


def betweenRequests(channel: HTTPChannel) -> bool:
    """
    Whether C{channel} is between two requests: none being received or
    answered, no byte of the next one read.
    """
    return bool(
        not channel.requests
        and channel.line_mode
        and not channel._buffer
        and not channel._busyReceiving
    )


def raiseListenErrorsSynchronously(service: StreamServerEndpointService) -> None:
    """
    Make C{service} raise, from C{privilegedStartService}, an error that
    its endpoint's C{listen} reports at once (a busy port), instead of only
    logging it.
    """
    service._raiseSynchronously = True


def listeningDeferred(service: StreamServerEndpointService) -> Deferred[Any] | None:
    """
    The Deferred that fires with C{service}'s listening port, once the
    service has begun to listen (None before).
    """
    return service._waitingForPort
