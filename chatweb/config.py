"""
Where chatweb keeps its data, and how it gets its API key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence


API_KEY_ENV = "CHATWEB_API_KEY"
KEY_FILE_NAME = "api-key"
SHARE_SECRET_FILE_NAME = "share-secret"
# Bytes of the secret that signs share links (chatweb.web checks it too).
SHARE_SECRET_SIZE = 32
# The SQLite file in the data directory.
DATABASE_NAME = "chatweb.sqlite3"


#: The listen backlog when the endpoint names none: room for a burst of
#: clients connecting at once (Twisted's default, 50, resets some of 200).
#: The kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024


def withBacklog(endpoint: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    C{endpoint} with C{backlog=} added when it is a tcp, ssl or unix
    endpoint that does not set one.
    """
    kind = endpoint.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "ssl", "unix") or "backlog=" in endpoint:
        return endpoint
    return f"{endpoint}:backlog={backlog}"


class ConfigError(Exception):
    """
    A setting cannot be used; the message says which and why, in one line.
    """


def defaultDataDir() -> str:
    """
    $XDG_DATA_HOME/chatweb, or ~/.local/share/chatweb.
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "chatweb")


def checkKey(key: str, origin: str) -> str:
    """
    An API key travels in an HTTP header: it must be visible ASCII.
    """
    if not key:
        raise ConfigError(f"the API key from {origin} is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise ConfigError(
            f"the API key from {origin} must be printable ASCII without spaces"
        )
    return key


#: Keys shorter than this are accepted with a loud warning: they can be guessed.
MIN_KEY_LENGTH = 16


def readSecretFile(path: str, what: str) -> str:
    """
    The secret a file holds (a provider key, a database password), without
    surrounding whitespace.

    @raise ConfigError: naming C{what} when it cannot be read or is empty.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot read {what} {path}: {reason}") from None
    if not value:
        raise ConfigError(f"{what} {path} is empty")
    return value


def readKeyFile(path: str) -> list[str]:
    """
    The keys in a key file: one per line; blank lines are ignored.  Several
    keys let a key be replaced without downtime (add the new one, move the
    clients, remove the old one, restart between each step).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot read API key file {path}: {reason}")
    keys = [line.strip() for line in lines if line.strip()]
    if not keys:
        raise ConfigError(f"the API key from file {path} is empty")
    for number, key in enumerate(keys, 1):
        where = f"file {path}" if len(keys) == 1 else f"file {path} (line {number})"
        checkKey(key, where)
    return keys


def resolveKeys(
    key: str | None, keyFile: str | None, environ: Mapping[str, str] | None = None
) -> tuple[list[str], str]:
    """
    The API keys, from exactly one of --api-key, --api-key-file and
    $CHATWEB_API_KEY.

    @return: the keys, and where they came from.
    @raise ConfigError: if none or more than one of them is given.
    """
    if environ is None:
        environ = os.environ
    given = [
        name
        for name, value in (
            ("--api-key", key),
            ("--api-key-file", keyFile),
            (f"${API_KEY_ENV}", environ.get(API_KEY_ENV)),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ConfigError(
            f"the API key is given by both {' and '.join(given)}: give only one"
            f" (unset {API_KEY_ENV} or drop an option)"
        )
    if key is not None:
        return [checkKey(key.strip(), "--api-key")], "--api-key"
    if keyFile is not None:
        return readKeyFile(keyFile), f"file {keyFile}"
    fromEnvironment = environ.get(API_KEY_ENV)
    if fromEnvironment is not None:
        origin = f"${API_KEY_ENV}"
        return [checkKey(fromEnvironment.strip(), origin)], origin
    raise ConfigError(
        "no API key given: set CHATWEB_API_KEY, or pass --api-key-file FILE"
        " (or --api-key KEY, visible in ps)"
    )


def shortKeyWarning(keys: Sequence[str], origin: str) -> str | None:
    """
    A one-line warning if a key is short enough to be guessed, else None.
    """
    shortest = min(len(key) for key in keys)
    if shortest >= MIN_KEY_LENGTH:
        return None
    return (
        f"chatweb: WARNING: an API key from {origin} has only {shortest}"
        f" characters and can be guessed; use {MIN_KEY_LENGTH} or more"
        " (python -m chatweb ensure-key makes one)"
    )


def ensureDataDir(path: str) -> str:
    """
    Create the data directory (private to the user) and check that it can
    be written.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot use data directory {path}: {e.strerror or e}")
    return path


def dataDirWarning(path: str) -> str | None:
    """
    A one-line warning if users other than the owner may read or enter the
    data directory (it holds every message), else None.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"data directory {path} may be read by other users (mode"
        f" {mode & 0o777:o}); run: chmod 700 {path}"
    )


def ensureKeyFile(dataDir: str) -> tuple[str, bool]:
    """
    The path of the data directory's key file, made with a random key (mode
    0600) if there is none yet.

    @return: the path, and whether it was just created.
    """
    ensureDataDir(dataDir)
    path = os.path.join(dataDir, KEY_FILE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        readKeyFile(path)
        return path, False
    except OSError as e:
        raise ConfigError(f"cannot create API key file {path}: {e.strerror or e}")
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path, True


def checkDatabase(path: str) -> None:
    """
    Open the SQLite database at C{path} (if it exists) and read its schema,
    so a file that is not a database is refused at start, in one line.
    Called once before the reactor runs.
    """
    import sqlite3

    if not os.path.exists(path):
        return
    try:
        connection = sqlite3.connect(path)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as e:
        raise ConfigError(f"cannot use database {path}: {e}")


def ensureShareSecret(dataDir: str) -> bytes:
    """
    The server secret that signs share links: C{SHARE_SECRET_SIZE} random
    bytes in the data directory's C{share-secret} file (mode 0600), made on
    first use.  Deleting the file (and restarting) invalidates every share
    link given out.

    @raise ConfigError: if the file cannot be made or read, is too short, or
        other users may read it.
    """
    ensureDataDir(dataDir)
    path = os.path.join(dataDir, SHARE_SECRET_FILE_NAME)
    if not os.path.exists(path):
        # Written whole under a temporary name, then linked into place: a
        # second process starting at the same time reads either nothing or
        # the whole secret, and both end up with the same one.
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SHARE_SECRET_SIZE))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        except OSError as e:
            raise ConfigError(f"cannot create share secret file {path}: {e.strerror or e}")
        finally:
            try:
                os.remove(temporary)
            except OSError:
                pass
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read share secret file {path}: {e.strerror or e}")
    if mode & 0o077:
        raise ConfigError(
            f"share secret file {path} may be read by other users"
            f" (mode {mode & 0o777:o}); run: chmod 600 {path}"
        )
    if len(secret) < SHARE_SECRET_SIZE:
        raise ConfigError(
            f"share secret file {path} holds {len(secret)} bytes, not"
            f" {SHARE_SECRET_SIZE}; delete it to make a new one"
        )
    return secret
