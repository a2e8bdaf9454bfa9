"""
The HTTP API: chat.nvim's routes over Klein.

Every request must carry a valid X-API-Key; errors are JSON objects
C{{"error": "..."}} that say what was wrong.  Only the routes below exist:
any other method or path is a 404.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import unquote_to_bytes
from typing import Any, Sequence

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from chatweb.interfaces import ISessionAdapter
from chatweb.model import Session
from chatweb.preview import SECURITY_HEADERS, renderSession
from chatweb.queue import MessageQueue
from chatweb.site import DEFAULT_MAX_BODY

MAX_SESSION_ID = 256

_log = Logger()


class BadRequest(Exception):
    """
    The request is malformed; the message says how.
    """


def _jsonType(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _isValidUnicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validateSessionId(value: Any, field: str = "session") -> str:
    """
    A session id is a non-empty string of at most L{MAX_SESSION_ID}
    characters without control characters.
    """
    if not isinstance(value, str):
        raise BadRequest(f"field '{field}' must be a string, not {_jsonType(value)}")
    if not value:
        raise BadRequest(f"field '{field}' must not be empty")
    if len(value) > MAX_SESSION_ID:
        raise BadRequest(
            f"field '{field}' must be at most {MAX_SESSION_ID} characters"
        )
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise BadRequest(f"field '{field}' must not contain control characters")
    if not _isValidUnicode(value):
        raise BadRequest(f"field '{field}' is not valid Unicode")
    return value


def parseMessage(body: bytes) -> tuple[str, str]:
    """
    Read C{{"session": str, "content": str}} from a request body.

    @raise BadRequest: saying what is wrong with it.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} at position {e.pos}")
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON")
    if not isinstance(data, dict):
        raise BadRequest(
            f"request body must be a JSON object, not {_jsonType(data)}"
        )
    for field in ("session", "content"):
        if field not in data:
            raise BadRequest(f"missing field '{field}' (a string)")
    session = validateSessionId(data["session"])
    content = data["content"]
    if not isinstance(content, str):
        raise BadRequest(f"field 'content' must be a string, not {_jsonType(content)}")
    if not _isValidUnicode(content):
        raise BadRequest("field 'content' is not valid Unicode")
    return session, content


def _error(request: IRequest, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps({"error": message}).encode("utf-8")


def _json(request: IRequest, value: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


class _Guard(Resource):
    """
    Answers, in JSON, the requests that cannot reach a route: a key that is
    missing or wrong (401) and a path that is not UTF-8 (400).
    """

    isLeaf = True

    def __init__(self, api: ChatWebAPI, routes: IResource) -> None:
        super().__init__()
        self._api = api
        self._routes = routes

    def render(self, request: IRequest) -> Any:
        if not self._api._authorized(request):
            return _error(request, 401, "missing or invalid X-API-Key header")
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            (request.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeError:
            return _error(request, 400, "the request's path or Host is not valid UTF-8")
        return self._routes.render(request)


class ChatWebAPI:
    """
    The routes, over a L{MessageQueue} (for posting) and an
    L{ISessionAdapter} (for reading sessions).
    """

    app = Klein()

    def __init__(
        self,
        queue: MessageQueue,
        adapter: ISessionAdapter,
        apiKeys: Sequence[str],
        maxBodySize: int = DEFAULT_MAX_BODY,
    ) -> None:
        if not apiKeys or not all(apiKeys):
            raise ValueError("at least one non-empty API key is needed")
        self._queue = queue
        self._adapter = adapter
        self._keys = [key.encode("utf-8") for key in apiKeys]
        self._maxBodySize = maxBodySize

    def resource(self) -> IResource:
        """
        The L{IResource} that serves the API.
        """
        return _Guard(self, self.app.resource())

    # -- guards

    def _authorized(self, request: IRequest) -> bool:
        given = request.requestHeaders.getRawHeaders(b"x-api-key")
        if not given or len(given) != 1:
            return False
        # Compare with every key, in constant time for each.
        matches = [hmac.compare_digest(given[0], key) for key in self._keys]
        return any(matches)

    def _refuse(self, request: IRequest, method: bytes) -> bytes | None:
        """
        A 404 for a method that is not the route's (werkzeug lets HEAD into
        GET routes), else None.
        """
        if request.method != method:
            return _error(request, 404, "not found")
        return None

    # -- routes

    @app.route("/", methods=["POST"])
    def postMessage(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"POST")
        if refused is not None:
            return refused
        # ChatWebSite refuses large bodies before they are read; this covers
        # a Site of the embedding program's own.
        body = request.content.read(self._maxBodySize + 1)
        if len(body) > self._maxBodySize:
            return _error(
                request,
                413,
                f"request body is larger than the limit of {self._maxBodySize} bytes",
            )
        try:
            session, content = parseMessage(body)
        except BadRequest as e:
            return _error(request, 400, str(e))

        def queued(_: object) -> bytes:
            request.setResponseCode(204)
            return b""

        def failed(failure: Any) -> bytes:
            _log.failure("Could not store a message", failure)
            return _error(request, 503, "the message could not be stored; retry later")

        return self._queue.post(session, content).addCallbacks(queued, failed)

    @app.route("/sessions", methods=["GET"])
    def listSessions(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"GET")
        if refused is not None:
            return refused

        def listed(ids: list[str]) -> bytes:
            return _json(request, sorted(set(ids) | self._queue.sessionsWithPending()))

        return self._adapter.listSessions().addCallbacks(
            listed, lambda f: self._unavailable(request, f)
        )

    @app.route("/session", methods=["GET"])
    def previewSession(self, request: IRequest) -> Any:
        refused = self._refuse(request, b"GET")
        if refused is not None:
            return refused
        values = request.args.get(b"id") or [b""]
        try:
            sessionId = values[0].decode("utf-8")
        except UnicodeDecodeError:
            return _error(request, 400, "query parameter 'id' is not valid UTF-8")
        if not sessionId:
            return _error(request, 400, "missing query parameter 'id'")

        def render(session: Any) -> bytes:
            queued = self._queue.pendingFor(sessionId)
            if session is None:
                if not queued:
                    return _error(request, 404, f"no session {sessionId!r}")
                session = Session(id=sessionId)
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            for name, value in SECURITY_HEADERS.items():
                request.setHeader(name, value)
            return renderSession(session, queued).encode("utf-8")

        return self._adapter.getSession(sessionId).addCallbacks(
            render, lambda f: self._unavailable(request, f)
        )

    def _unavailable(self, request: IRequest, failure: Any) -> bytes:
        _log.failure("The session backend failed", failure)
        return _error(request, 503, "the session backend is unavailable; retry later")

    # -- everything else

    @app.handle_errors(NotFound, MethodNotAllowed)
    def notFound(self, request: IRequest, failure: Any) -> bytes:
        return _error(request, 404, "not found")

    @app.handle_errors(Exception)
    def internalError(self, request: IRequest, failure: Any) -> bytes:
        _log.failure("Unhandled error in a route", failure)
        return _error(request, 500, "internal error")

