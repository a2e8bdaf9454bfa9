"""
Page workers: child processes that read sessions from the SQLite database
and render their pages (L{chatweb.web._pageworker}).

Threads of the reactor's process that read and render hold its GIL: under
a mixed load (bench/table.py's stall row) the reactor's thread waited up
to 11 ms at a time for it, doing about 1 ms of work, even with those
threads at a lower priority.  A process holds a GIL of its own.  When the
reactor is favoured (L{chatweb._priority.favourTheReactor}, as C{twistd
chatweb} does) the workers run under Linux's C{SCHED_IDLE}: on a busy core
they take only what the reactor leaves.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import chatweb
from chatweb import _priority
from chatweb.web._pageworker import _LENGTH, frame

_log = Logger()

#: A worker's program.  With "idle", it runs under SCHED_IDLE (Linux)
#: from the start: importing what it needs takes about half a second of
#: CPU, which the reactor's process should not wait for either.
_BOOT = """\
import os, sys
if sys.argv[1:] == ["idle"] and hasattr(os, "SCHED_IDLE"):
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass
from chatweb.web._pageworker import main
main()
"""

#: Seconds a worker has to exit once told to, before it is killed.
STOP_TIMEOUT = 5.0


class WorkerFailed(Exception):
    """
    A page worker could not answer: what it raised, or that it exited.
    """


class _Worker(ProcessProtocol):
    """
    One worker process: requests go in order, answers come back in order.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._errors = b""
        #: The Deferreds of requests sent and not answered, oldest first.
        self.waiting: deque[Deferred[Any]] = deque()
        self.alive = True
        self.ended: Deferred[None] = Deferred()

    def send(self, value: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        assert self.transport is not None
        self.transport.write(frame(value))
        return d

    def outReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer)
            if len(buffer) < _LENGTH.size + size:
                return
            body = bytes(buffer[_LENGTH.size : _LENGTH.size + size])
            del buffer[: _LENGTH.size + size]
            status, value = pickle.loads(body)
            d = self.waiting.popleft()
            if status == "ok":
                d.callback(value)
            else:
                d.errback(WorkerFailed(value))

    def errReceived(self, data: bytes) -> None:
        # What it prints (a traceback, say), a line at a time.
        self._errors += data
        lines, _, self._errors = self._errors.rpartition(b"\n")
        if lines:
            _log.warn(
                "chatweb page worker: {output}",
                output=lines.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        waiting, self.waiting = self.waiting, deque()
        if waiting or not reason.check(ProcessDone):
            _log.warn(
                "chatweb page worker exited ({reason}); {n} answers lost",
                reason=reason.getErrorMessage(),
                n=len(waiting),
            )
        for d in waiting:
            d.errback(WorkerFailed(f"the page worker exited: {reason.getErrorMessage()}"))
        self.ended.callback(None)


class PageWorkers:
    """
    Up to C{processes} page workers over the SQLite database at C{path},
    each started when first needed and started again if it exits.

    @ivar shareSecret: called when a worker starts: the secret it signs the
        index's share links with, or None (share links off).
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        processes: int = 1,
        shareSecret: Callable[[], bytes | None] = lambda: None,
    ) -> None:
        if processes < 1:
            raise ValueError("page workers need at least one process")
        self._reactor: IReactorProcess = reactor
        self._clock: IReactorTime = reactor
        self.path = os.path.abspath(path)
        self.processes = processes
        self.shareSecret = shareSecret
        self._workers: list[_Worker] = []
        self._stopped = False

    def start(self) -> None:
        """
        Start the workers now rather than at the first request.
        """
        self._workers = [w for w in self._workers if w.alive]
        while not self._stopped and len(self._workers) < self.processes:
            self._start()

    def run(self, kind: str, *args: Any) -> Deferred[Any]:
        """
        What a worker answers to C{kind} (a L{PageWorker} method) and
        C{args}: the worker with the fewest requests waiting is asked.
        """
        if self._stopped:
            return fail(WorkerFailed("the page workers are stopped"))
        self._workers = [w for w in self._workers if w.alive]
        if len(self._workers) < self.processes:
            worker = self._start()
        else:
            worker = min(self._workers, key=lambda w: len(w.waiting))
        return worker.send((kind, args))

    def _start(self) -> _Worker:
        worker = _Worker()
        # The child imports the same chatweb as this process.
        home = os.path.dirname(os.path.dirname(os.path.abspath(chatweb.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [home] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        self._reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-c", _BOOT] + (["idle"] if _priority.favoured() else []),
            env=env,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        assert worker.transport is not None
        worker.transport.write(
            frame(
                {
                    "path": self.path,
                    "shareSecret": self.shareSecret(),
                }
            )
        )
        self._workers.append(worker)
        return worker

    def stop(self) -> Deferred[None]:
        """
        Tell every worker to exit once it has answered; kill those that
        have not after L{STOP_TIMEOUT} seconds.
        """
        self._stopped = True
        ended = []
        for worker in self._workers:
            if not worker.alive:
                continue
            assert worker.transport is not None
            worker.transport.closeStdin()
            kill = self._clock.callLater(STOP_TIMEOUT, _kill, worker)
            ended.append(worker.ended.addCallback(_cancel, kill))
        if not ended:
            return succeed(None)
        return DeferredList(ended).addCallback(lambda _: None)


def _cancel(result: None, call: IDelayedCall) -> None:
    if call.active():
        call.cancel()


def _kill(worker: _Worker) -> None:
    if worker.alive and worker.transport is not None:
        worker.transport.signalProcess("KILL")
