"""
Failures that only say the database server could not be reached (it is
down, restarting, or refusing connections): nothing in chatweb to mend, and
while they last every request and every sweep meets one.  They are logged
in one line each, not with a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure


#: SQLSTATEs of a server shutting down or starting (admin_shutdown,
#: crash_shutdown, cannot_connect_now); class 08 is the connection's.
_GOING = {"57P01", "57P02", "57P03"}


def unreachable(failure: Failure) -> str | None:
    """
    Why the database could not be reached, if that is what C{failure}
    says: psycopg's C{OperationalError} from a connection that failed
    (no SQLSTATE: a pool's timeout among them), a connection exception or
    a server going away.  None for any other failure (a deadlock, a
    timeout of a statement, a full disk: a traceback may help).
    """
    psycopg = sys.modules.get("psycopg")  # (not imported: not in use)
    if psycopg is None or not failure.check(psycopg.OperationalError):
        return None
    state = getattr(failure.value, "sqlstate", None)
    if state is None or state.startswith("08") or state in _GOING:
        return " ".join(failure.getErrorMessage().split())
    return None


def logFailure(log: Logger, failure: Failure, format: str, **kwargs: Any) -> None:
    """
    Log C{failure} with C{format}: in one line if the database was
    unreachable, else with its traceback.
    """
    reason = unreachable(failure)
    if reason is None:
        log.failure(format, failure, **kwargs)
    else:
        log.warn(format + ": the database is unreachable ({reason})", reason=reason, **kwargs)
