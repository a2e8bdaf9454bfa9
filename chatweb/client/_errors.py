"""
What a call of L{chatweb.client.ChatWebClient} raises: one type per thing a
caller can act on.  Messages are the server's (which never hold a key) or
say which URL could not be reached; never the key.
"""

from __future__ import annotations


class ChatWebError(Exception):
    """
    Anything that went wrong talking to chatweb.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unreachable(ChatWebError):
    """
    No answer: the server is down, the address is wrong, or the connection
    broke before the answer came.
    """


class HTTPError(ChatWebError):
    """
    chatweb answered with an error status; C{code} is the status and
    C{message} the server's explanation.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Unauthorized(HTTPError):
    """
    401: the API key is missing or wrong.
    """


class BadRequest(HTTPError):
    """
    400, 413 or 422: the request is malformed, too large, or reuses an
    idempotency key for other content.
    """


class NotFound(HTTPError):
    """
    404: no such thing.
    """


class UnknownSession(NotFound):
    """
    404 for a session: it does not exist.
    """


class UnknownMessage(NotFound):
    """
    404 for a message id: no message has it.
    """


class Conflict(HTTPError):
    """
    409: the session is in progress (stop it first), or the message is in a
    state that does not allow the change.
    """


class Throttled(HTTPError):
    """
    429, still after the retries: too many requests (or messages waiting).
    """


class Unavailable(HTTPError):
    """
    503 (or another 5xx), still after the retries.
    """
