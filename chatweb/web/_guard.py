"""
What a request passes before any route: the API key (or a share link's
token), the failed-authentication throttle, the rate limit, and a path and
Host that are UTF-8.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from chatweb.limits import retryAfter
from chatweb.web._errors import _error, _notFound
from chatweb.web._health import isHealthCheck
from chatweb.web._share import redactTokens
from chatweb.web._throttle import clientKey

if TYPE_CHECKING:
    from chatweb.web._api import ChatWebAPI

#: The rate-limit bucket of requests that come with a share token, no key.
_SHARE_BUCKET = b"\0share-link"


def checkAPIKeys(apiKeys: Sequence[str]) -> list[bytes]:
    """
    The keys as bytes, checked as twistd checks its own: a sequence (not a
    string) of non-empty strings of printable ASCII without spaces.

    @raise TypeError: if C{apiKeys} is a string, or holds something else.
    @raise ValueError: if a key is empty or not printable ASCII.
    """
    if isinstance(apiKeys, (str, bytes)):
        raise TypeError(
            "apiKeys must be a sequence of keys, not one string: apiKeys=[key]"
        )
    keys = list(apiKeys)
    if not keys:
        raise ValueError("at least one API key is needed")
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"each API key must be a str, not {type(key).__name__}")
        if not key or not all(0x21 <= ord(c) <= 0x7E for c in key):
            raise ValueError("each API key must be non-empty printable ASCII without spaces")
    return [key.encode("ascii") for key in keys]


#: The 401's message.
UNAUTHORIZED = "missing or invalid X-API-Key (or Authorization: Bearer) header"


def credentials(headers: Any) -> list[bytes]:
    """
    The API keys that request headers offer: each C{X-API-Key}, and the
    token of each C{Authorization: Bearer} (for senders that cannot set a
    header of their own).  One key must be offered, no more.
    """
    return offeredKeys(
        headers.getRawHeaders(b"x-api-key") or [],
        headers.getRawHeaders(b"authorization") or [],
    )


def offeredKeys(apiKeys: Sequence[bytes], authorizations: Sequence[bytes]) -> list[bytes]:
    """
    L{credentials} from the values of the C{X-API-Key} and C{Authorization}
    headers.
    """
    given = list(apiKeys)
    for value in authorizations:
        scheme, _, token = value.strip().partition(b" ")
        # Other schemes (Basic, for a proxy in front) are not ours.
        if scheme.lower() == b"bearer":
            given.append(token.strip())
    return given


def hasCredentials(headers: Any) -> bool:
    """
    Whether the headers offer a key at all (a wrong one counts against the
    client; none at all does not).
    """
    return bool(credentials(headers))


def _isShareRequest(request: IRequest) -> bool:
    """
    Whether C{request} is C{GET /session?...&token=...}, the path taken
    relative to where the resource is mounted (Twisted has decoded its
    percent escapes, as werkzeug does for routing: both see the same path).
    """
    return (
        request.method == b"GET"
        and request.postpath in ([b"session"], [b"sessions"])
        and bool(request.args.get(b"token"))
    )


def _routeNameHidden(request: IRequest) -> bool:
    """
    Whether the route's name is not plainly the path's first segment:
    C{//sessions} (an empty segment first) or C{/%2Fsessions} and
    C{/session%2Fraw} (a slash escaped in it), which Klein would serve as
    C{/sessions} and C{/session/raw}, unseen by a proxy's rule for those.
    """
    postpath = request.postpath or []
    if postpath == [b""]:
        return False  # POST / itself
    return not postpath or postpath[0] == b"" or b"/" in postpath[0]


class _Guard(Resource):
    """
    Answers, in JSON, the requests that cannot reach a route: a key that is
    missing or wrong (401) and a path that is not UTF-8 (400).

    The requests that may come without a key are C{GET /session} and
    C{GET /sessions} with a C{token} query parameter (share links); those
    routes check the token.
    """

    isLeaf = True

    def __init__(self, api: ChatWebAPI, routes: IResource) -> None:
        super().__init__()
        self._api = api
        self._routes = routes

    @property
    def chatwebAPI(self) -> ChatWebAPI:
        """
        The API this resource serves (how L{chatweb.web._site.ChatWebSite} finds
        it in a resource tree).
        """
        return self._api

    def render(self, request: IRequest) -> Any:
        # Whatever Site logs this request (an access log, Twisted's notes
        # about it) sees no share token.
        request.uri = redactTokens(request.uri)
        body = self._render(request)
        if request.method == b"HEAD" and isinstance(body, bytes):
            # No body for HEAD (Twisted would log the request, URI and all,
            # while it drops one).
            return b""
        return body

    def _render(self, request: IRequest) -> Any:
        if isHealthCheck(request):
            # Liveness and readiness, without the key: it reveals nothing else.
            return self._routes.render(request)
        client = clientKey(request.getClientAddress())
        refused = self._api._refuseThrottled(request, client)
        if refused is not None:
            return refused
        key = self._api._authorized(request)
        if key is None:
            if not _isShareRequest(request):
                if hasCredentials(request.requestHeaders):
                    self._api._authFailures.failed(client)
                return _error(request, 401, UNAUTHORIZED)
            # Check the token before it costs anything; each valid one has a
            # rate-limit bucket of its own.
            scope = self._api._shareScope(request)
            if isinstance(scope, bytes):
                return scope
            verified = self._api._verifyToken(request, scope)
            if isinstance(verified, bytes):
                self._api._authFailures.failed(client)
                return verified
            # The route trusts this: the token is checked once.
            self._api._shareExpiry[request] = verified
            key = _SHARE_BUCKET + hashlib.sha256(request.args[b"token"][0]).digest()
        wait = self._api._rateLimiter.take(key)
        if wait:
            request.setHeader(b"Retry-After", retryAfter(wait))
            return _error(request, 429, "too many requests for this API key; slow down")
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            (request.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeError:
            return _error(request, 400, "the request's path or Host is not valid UTF-8")
        if _routeNameHidden(request):
            return _notFound(request)
        try:
            return self._routes.render(request)
        except RequestRedirect:
            return _notFound(request)
        except HTTPException as e:
            # werkzeug refuses some requests (a malformed Host, say) before
            # any route or error handler sees them.
            return _error(request, 400, f"bad request: {e.description or e.name}")
