"""
C{POST /} without twisted.web's L{Request}: the request senders make
thousands of times, answered from the bytes of one read.

A durable POST spent about 500 us of CPU, a bare twisted.web resource that
only validates 70 us: a C{Request}, its headers objects, Klein's routing
and response writing cost more than storing the message.  When one read
from the connection holds exactly one plain C{POST /} (HTTP/1.1, a
C{Content-Length}, ASCII headers, each named once, no C{Transfer-Encoding}
or C{Expect}), a valid key, a valid body and nothing else, it is answered
here: the same checks in the same order, the same queue, the same 204 once
the message is on disk.  Only where twisted.web would certainly hand it to
the API: the API is the site's root, or below plain resources that route
by their children (L{FastPost.takes}).  Anything else, and any request that this path
would refuse, goes to twisted.web untouched, which answers it as it always
has: the error answers have one source.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString

from chatweb.model._values import QueuedMessage
from chatweb.web._errors import _REASONS, rawErrorResponse
from chatweb.web._guard import offeredKeys
from chatweb.web._messages import idempotencyKey, keyedIdempotencyKey, notQueued
from chatweb.web._throttle import clientKey
from chatweb.web._validation import BadRequest, parseMessage

if TYPE_CHECKING:
    from chatweb.web._api import ChatWebAPI

_log = Logger()

#: Header lines as this path takes them: a token, a colon, printable ASCII
#: (no ambiguity: matched in linear time, whatever the bytes).
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADERS = re.compile(rb"(?:" + _TOKEN + rb":[\x20-\x7e\t]*\r\n)*")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):([\x20-\x7e\t]*)\r\n")

#: A Host that is plainly a host name or an address, and a port: werkzeug
#: refuses some others (an empty label, one over 63 characters) with a 400.
_HOST = re.compile(
    rb"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?(?::[0-9]{1,5})?"
    rb"|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?"
)

#: A path segment with one spelling (no percent escape can mean it).
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z0-9._~-]+")


def _plainHost(host: bytes) -> bool:
    """
    Whether C{host} is plainly a host name or an IP address, with an
    optional port (werkzeug refuses some other values with a 400).
    """
    if _HOST.fullmatch(host) is None:
        return False
    if host.startswith(b"["):
        try:
            ipaddress.IPv6Address(host[1 : host.index(b"]")].decode("ascii"))
        except ValueError:
            return False
    return True


#: Headers that need twisted.web (chunked bodies, 100 Continue, a
#: compressed body's 415).
_ELSEWHERE = frozenset([b"transfer-encoding", b"expect", b"content-encoding"])


class _Answered:
    """
    What L{chatweb.web._site.ChatWebSite.log} and the request metrics read
    of a request answered here (they were written for twisted.web's).
    """

    method = b"POST"
    prepath: list[bytes] = []

    def __init__(self, path: bytes, postpath: list[bytes], code: int, address: Any) -> None:
        self.path = self.uri = path
        self.postpath = postpath
        self.code = code
        self.sentLength = 0
        self._address = address

    def getClientAddress(self) -> Any:
        return self._address


class _Date:
    """
    The C{Date} header's value, formatted once a second.
    """

    second = -1
    value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second, self.value = second, datetimeToString(second)
        return self.value


def _reason(code: int) -> bytes:
    return _REASONS.get(code) or RESPONSES.get(code, b"Unknown")


class FastPost:
    """
    Answers plain C{POST /} requests of a L{ChatWebAPI} mounted at
    C{mount} (path segments) for its site's channels.

    @ivar answered: how many requests were answered here.
    """

    answered = 0

    def __init__(self, api: ChatWebAPI, site: Any) -> None:
        """
        @param site: the L{chatweb.web._site.ChatWebSite} whose API it is
            (its C{mount}, C{log} and C{serverName}).
        """
        self._api = api
        self._site = site
        self._root = site.resource
        self._target = b"/" + b"".join(segment + b"/" for segment in site.mount)
        self._requestLine = b"POST " + self._target + b" HTTP/1.1\r\n"
        self._postpath = list(site.mount) + [b""]
        self._date = _Date()
        #: More headers than this, and twisted.web refuses the request.
        self._maxHeaders: int = getattr(site.protocol, "maxHeaders", HTTPChannel.maxHeaders)

    @staticmethod
    def takes(site: Any, root: Any) -> bool:
        """
        Whether twisted.web would hand a C{POST} to the site's mount to the
        API, whatever the request: the site finds resources and builds
        requests as chatweb's site does, and every resource on the way is
        a plain L{Resource} that routes by its children (a resource of the
        program's own, or a leaf, might answer or refuse it first), each
        path segment a plain word (one spelling only).
        """
        from chatweb.web._site import ChatWebSite, LimitedRequest

        if (
            type(site).getResourceFor is not ChatWebSite.getResourceFor
            or site.requestFactory is not LimitedRequest
        ):
            return False
        node = root
        for segment in site.mount:
            kind = type(node)
            children = getattr(node, "children", None)
            if (
                _PLAIN_SEGMENT.fullmatch(segment) is None
                or segment in (b".", b"..")
                or getattr(node, "isLeaf", False)
                or getattr(kind, "getChildWithDefault", None) is not Resource.getChildWithDefault
                or getattr(kind, "getChild", None) is not Resource.getChild
                or not isinstance(children, dict)
            ):
                return False
            node = children.get(segment)
        return node is not None and getattr(node, "chatwebAPI", None) is not None

    def reaches(self, site: Any) -> bool:
        """
        Whether the site still serves the tree this was made for.
        """
        return site.resource is self._root

    def parse(self, data: bytes, maxHeaderSize: int, maxBodySize: int) -> Any:
        """
        C{(headers, body)} if C{data} is exactly one plain C{POST} to the
        API's root, else None.  C{headers} maps each lowercased name to
        its value; a name sent twice is not plain.
        """
        if not data.startswith(self._requestLine):
            return None
        end = data.find(b"\r\n\r\n", 0, maxHeaderSize + 4)
        if end < 0:
            return None
        start = len(self._requestLine)
        block = data[start : end + 2]
        if _HEADERS.fullmatch(block) is None:
            return None
        fields = _FIELD.findall(block)
        if len(fields) > self._maxHeaders:
            return None
        headers = {name.lower(): value.strip(b" \t") for name, value in fields}
        if len(headers) != len(fields) or not _ELSEWHERE.isdisjoint(headers):
            return None
        length = headers.get(b"content-length", b"")
        if not length.isdigit() or len(length) > 12 or int(length) > maxBodySize:
            return None
        body = data[end + 4 :]
        if len(body) != int(length):
            return None
        host = headers.get(b"host")
        if host is not None and not _plainHost(host):
            return None
        connection = headers.get(b"connection", b"keep-alive").lower()
        if connection not in (b"keep-alive", b"close"):
            return None
        return headers, body

    def answer(self, channel: Any, headers: dict[bytes, bytes], body: bytes) -> bool:
        """
        Queue the message of a request that L{parse} took, and answer it on
        C{channel} once it is stored; False (nothing done) if twisted.web
        should answer it instead.
        """
        api = self._api
        address = channel.transport.getPeer()
        client = clientKey(address)
        if api._authFailures.wait(client):
            return False
        apiKey = api.matchKey(
            offeredKeys(
                [headers[b"x-api-key"]] if b"x-api-key" in headers else [],
                [headers[b"authorization"]] if b"authorization" in headers else [],
            )
        )
        if apiKey is None:
            return False
        # The site's limit was checked; the API's own may be lower (a site
        # built without the API's limits).
        if len(body) > api._limits.maxBodySize:
            return False
        try:
            key = idempotencyKey(
                [headers[b"idempotency-key"]] if b"idempotency-key" in headers else None
            )
            session, content = parseMessage(body)
        except BadRequest:
            return False
        if len(content) > api._limits.maxContentLength:
            return False
        # Last, as in the guard: a refused token is not taken.
        if api._rateLimiter.take(apiKey):
            return False
        if key is not None:
            key = keyedIdempotencyKey(apiKey, key)
        close = headers.get(b"connection", b"").lower() == b"close"
        self.answered += 1

        def queued(message: QueuedMessage) -> None:
            headers = [
                (b"Server", self._site.serverName),
                (b"Date", self._date.now()),
                (b"X-Message-Id", b"%d" % (message.id,)),
            ]
            if close:
                headers.append((b"Connection", b"close"))
            lines = [b"HTTP/1.1 204 No Content\r\n"]
            lines.extend(b"%s: %s\r\n" % header for header in headers)
            self._send(channel, 204, b"".join(lines) + b"\r\n", close, address)

        def failed(failure: Failure) -> None:
            code, error, retry = notQueued(failure, session)
            headers = [(b"Date", self._date.now())]
            if retry is not None:
                headers.append((b"Retry-After", retry))
            response = rawErrorResponse(
                code, _reason(code), error, headers, self._site.serverName, close
            )
            self._send(channel, code, response, close, address)

        api._queue.post(session, content, key).addCallbacks(queued, failed).addErrback(
            channel.fastFailed
        )
        return True

    def _send(
        self, channel: Any, code: int, response: bytes, close: bool, address: Any
    ) -> None:
        if channel._lost:
            # As twisted.web: an answer nobody received is not logged.
            channel.fastAnswered(b"", close)
            return
        record = _Answered(self._target, self._postpath, code, address)
        record.sentLength = len(response) - response.index(b"\r\n\r\n") - 4
        try:
            self._site.log(record)
        except Exception:
            _log.failure("Could not log a request")
        channel.fastAnswered(response, close)
