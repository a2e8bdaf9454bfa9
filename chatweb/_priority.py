"""
The reactor's thread first, in chatweb's own process.

On a busy core the threads that read and render compete with the reactor's
for the core and for the GIL.  Under a mixed load (bench/table.py: POSTs,
long pages, the list of 10,000 sessions) the reactor's thread waited 13 to
30 ms at times while doing 1 to 5 ms of work.  Two settings make it wait
less:

  - the threads that read the store and render pages run at a lower
    priority (nice +10, Linux only): when the reactor's thread wakes, the
    kernel gives it the core;
  - the interpreter's switch interval is 1 ms instead of 5: a thread that
    holds the GIL gives it up sooner to a thread that waits for it.

Both are the process's own business: C{twistd chatweb} sets them when it
starts (L{chatweb.tap}), not a program that embeds chatweb.  The writer
thread keeps its priority: POSTs wait for its commits.
"""

from __future__ import annotations

import os
import sys
import threading

#: Added to the niceness of the threads that read and render.
WORKER_NICENESS = 10
#: The interpreter's switch interval, seconds.
SWITCH_INTERVAL = 0.001

_favoured = False
_local = threading.local()


def favourTheReactor() -> None:
    """
    From now on, lower the priority of chatweb's reading and rendering
    threads (each the first time it works), and set the interpreter's
    switch interval to L{SWITCH_INTERVAL}.
    """
    global _favoured
    _favoured = True
    sys.setswitchinterval(SWITCH_INTERVAL)


def favoured() -> bool:
    """
    Whether L{favourTheReactor} was called: page workers (other processes,
    L{chatweb.web._workers}) then run at a lower priority too.
    """
    return _favoured


def asWorker() -> None:
    """
    Called by work on a reading or rendering thread: the first time on each
    thread, after L{favourTheReactor}, lowers that thread's priority.
    """
    if not _favoured or getattr(_local, "lowered", False):
        return
    _local.lowered = True
    # Linux keeps a niceness per thread; elsewhere the same call would
    # change a whole process (or another one).
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.setpriority(
                os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICENESS
            )
        except OSError:
            pass
