"""
Where chatweb keeps its data, and how it gets its API key.
"""

from __future__ import annotations

import os
import secrets

API_KEY_ENV = "CHATWEB_API_KEY"
KEY_FILE_NAME = "api-key"


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


def readKeyFile(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot read API key file {path}: {reason}")
    return checkKey(key, f"file {path}")


def resolveKey(key: str | None, keyFile: str | None) -> str:
    """
    The API key from --api-key, else --api-key-file, else $CHATWEB_API_KEY.
    """
    if key is not None:
        return checkKey(key.strip(), "--api-key")
    if keyFile is not None:
        return readKeyFile(keyFile)
    fromEnvironment = os.environ.get(API_KEY_ENV)
    if fromEnvironment is not None:
        return checkKey(fromEnvironment.strip(), f"${API_KEY_ENV}")
    raise ConfigError(
        "no API key given: set CHATWEB_API_KEY, or pass --api-key-file FILE"
        " (or --api-key KEY, visible in ps)"
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
