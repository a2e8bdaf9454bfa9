"""
Share links: signed, expiring tokens that let a browser open one session's
page without the X-API-Key header.

A token is the URL-safe base64 (without padding) of 40 bytes: the expiry
(unix seconds, 8 bytes big-endian) followed by HMAC-SHA256, keyed with the
server secret, over a version label, that expiry and the session id.  It
names no session: it is only valid together with the id it was made for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime

from chatweb.config import SHARE_SECRET_SIZE

#: Seconds a share link lives unless the caller chooses.
DEFAULT_LIFETIME = 3600
#: The longest life a caller may ask for: seven days.
MAX_LIFETIME = 7 * 24 * 3600
#: Bytes of a new server secret; a shorter secret is refused.
SECRET_SIZE = SHARE_SECRET_SIZE

_LABEL = b"chatweb share link v1\0"
_EXPIRY = struct.Struct(">Q")
_TOKEN_BYTES = _EXPIRY.size + hashlib.sha256().digest_size
_TOKEN_CHARS = (_TOKEN_BYTES * 4 + 2) // 3


#: What a share token is replaced with in a request's URI.
REDACTED = b"REDACTED"


def redactTokens(uri: bytes) -> bytes:
    """
    C{uri} with the value of every C{token} query parameter (however its
    name is spelled with percent escapes) replaced by L{REDACTED}: what a
    log may show of a share-link request.
    """
    path, question, query = uri.partition(b"?")
    if not question:
        return uri
    pieces = []
    for piece in query.split(b"&"):
        name = piece.split(b"=", 1)[0]
        if unquote_to_bytes(name.replace(b"+", b" ")).strip().lower() == b"token":
            piece = name + b"=" + REDACTED
        pieces.append(piece)
    return path + question + b"&".join(pieces)


class InvalidToken(Exception):
    """
    A share token is forged, damaged, expired, or made for another session;
    the message says which, as far as it is safe to tell.
    """


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class ShareLinks:
    """
    Makes and checks share tokens with one server secret.
    """

    def __init__(self, secret: bytes, clock: IReactorTime) -> None:
        if len(secret) < SECRET_SIZE:
            raise ValueError(f"a share secret needs at least {SECRET_SIZE} bytes")
        self._secret = secret
        self._clock = clock

    def _mac(self, sessionId: str, expires: int) -> bytes:
        message = _LABEL + _EXPIRY.pack(expires) + sessionId.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def issue(self, sessionId: str, lifetime: int = DEFAULT_LIFETIME) -> tuple[str, int]:
        """
        A token for C{sessionId}, valid for C{lifetime} seconds from now.

        @return: the token, and its expiry in unix seconds.
        """
        if not 0 < lifetime <= MAX_LIFETIME:
            raise ValueError(f"lifetime must be 1 to {MAX_LIFETIME} seconds")
        expires = int(self._clock.seconds()) + lifetime
        return _encode(_EXPIRY.pack(expires) + self._mac(sessionId, expires)), expires

    def verify(self, sessionId: str, token: str) -> int:
        """
        Check that C{token} was made for C{sessionId} and has not expired.

        @return: its expiry, in unix seconds.
        @raise InvalidToken: if it was not, or has.
        """
        if len(token) != _TOKEN_CHARS:
            raise InvalidToken("the share token is malformed")
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise InvalidToken("the share token is malformed")
        # One token, one spelling: the unused low bits of the last character
        # must be zero.
        if len(raw) != _TOKEN_BYTES or _encode(raw) != token:
            raise InvalidToken("the share token is malformed")
        (expires,) = _EXPIRY.unpack(raw[: _EXPIRY.size])
        if not hmac.compare_digest(raw[_EXPIRY.size :], self._mac(sessionId, expires)):
            raise InvalidToken("the share token is not valid for this session")
        if self._clock.seconds() >= expires:
            raise InvalidToken("the share link has expired; ask for a new one")
        return expires
