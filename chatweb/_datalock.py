"""
One chatweb service at a time on a data directory's SQLite store: the
queue's state (what is in flight, in which order) lives in the process, so
two services on one store would each deliver every message.  Several
instances share PostgreSQL instead (docs/deploy.md), which has leases.
"""

from __future__ import annotations

import os

try:
    import fcntl
except ImportError:  # Windows: no flock, and nothing is locked
    fcntl = None  # type: ignore[assignment]

#: The lock file in the data directory; it holds the pid of its holder.
LOCK_NAME = "chatweb.lock"


class DataDirInUse(Exception):
    """
    Another chatweb service holds the data directory.
    """


class DataDirLock:
    """
    An exclusive C{flock} on the data directory's L{LOCK_NAME}, held from
    L{acquire} to L{release} (or the process's end, however it ends).
    """

    def __init__(self, dataDir: str) -> None:
        self.dataDir = dataDir
        self._fd: int | None = None

    def acquire(self) -> None:
        """
        @raise DataDirInUse: another service (of this process or another)
            holds it.
        @raise OSError: the lock file cannot be made.
        """
        if self._fd is not None or fcntl is None:
            return
        path = os.path.join(self.dataDir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataDirInUse(
                f"{self.dataDir} is in use by another chatweb"
                + (f" (process {holder})" if holder.isdigit() else "")
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
