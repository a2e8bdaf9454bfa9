"""
Page workers: child processes that read sessions from the SQLite database
and render their pages (L{chatweb.web._pageworker}).

Threads of the reactor's process that read and render hold its GIL: under
a mixed load (bench/table.py's stall row) the reactor's thread waited up
to 11 ms at a time for it, doing about 1 ms of work, even with those
threads at a lower priority.  A process holds a GIL of its own.  When the
reactor is favoured (L{chatweb._priority.favourTheReactor}, as C{twistd
chatweb} does) the workers run at nice +10, as the threads did: on a busy
core the reactor's process gets it first.  (C{SCHED_IDLE} did a little
better for the reactor, but starved pages whenever anything else on the
machine was busy: seconds for a page beside a busy loop, against 0.2 s at
nice +10.)
"""

from __future__ import annotations

import json
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
from chatweb._priority import WORKER_NICENESS
from chatweb.web._pageworker import _LENGTH, ANSWERS_FD, frame

_log = Logger()

#: A worker's program.  First, what the server's process must not share
#: with it: the working directory as a place to import from (C{-c} puts it
#: first on the path), and the signals a terminal or a service manager
#: sends the whole process group (the server stops its workers itself,
#: once they have answered).  With "lower", it runs at a lower priority
#: from the start: importing what it needs takes about half a second of
#: CPU, which the reactor's process should not wait for either.
_BOOT = f"""\
import sys
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
import json, os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
except (ImportError, OSError, AttributeError):
    pass  # not Linux: a worker left alone ends when its stdin does
else:
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed with the server
    if os.getppid() != int(sys.argv[3]):
        os._exit(0)  # the server was gone before that
if sys.argv[1] == "lower":
    os.nice({WORKER_NICENESS})
sys.path[:] = json.loads(sys.argv[2])
from chatweb.web._pageworker import main
main()
"""

#: What a worker's environment keeps of the server's (no keys, no
#: passwords: it needs none).  Its import path is the server's, given on
#: its command line.
_ENVIRONMENT = (
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT",
    "PYTHONHOME", "LD_LIBRARY_PATH",
)

#: Seconds a worker has to exit once told to, before it is killed.
STOP_TIMEOUT = 5.0
#: Seconds a worker may take to be ready (to import what it needs and
#: open the database) before it is killed, as one that could not start.
READY_TIMEOUT = 60.0
#: Seconds before a worker that exited before it was ready is started
#: again: the first time, then twice as long each time, up to the last.
#: A worker that exits unasked once it was ready counts too, except that
#: the first of a row is replaced at once.
RESTART_DELAYS = (0.5, 30.0)
#: Failures further apart than this are not in a row: the next is the
#: first again (more than the longest delay, so a worker that keeps
#: exiting stays at it).
FAILURES_APART = 2 * RESTART_DELAYS[1]


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
        self._output: dict[int, bytes] = {}
        #: The Deferreds of requests sent and not answered, oldest first.
        self.waiting: deque[Deferred[Any]] = deque()
        self.alive = True
        #: It has said it can answer; C{readied} fires then (or when it
        #: ends without).
        self.ready = False
        self.readied: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def send(self, value: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        assert self.transport is not None
        self.transport.write(frame(value))
        return d

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == ANSWERS_FD:
            self._answers(data)
        else:
            self._printed(childFD, data)

    def _answers(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer)
            if len(buffer) < _LENGTH.size + size:
                return
            # Unpickled from the buffer itself: a large answer (an export)
            # is copied once on the reactor's thread, not three times.
            with memoryview(buffer) as view:
                status, value = pickle.loads(view[_LENGTH.size : _LENGTH.size + size])
            del buffer[: _LENGTH.size + size]
            if status == "ready":
                self.ready = True
                self.readied.callback(None)
                continue
            d = self.waiting.popleft()
            if status == "ok":
                d.callback(value)
            else:
                d.errback(WorkerFailed(value))

    def _printed(self, childFD: int, data: bytes) -> None:
        # What it prints (a traceback, say), a line at a time.
        text = self._output.get(childFD, b"") + data
        lines, _, self._output[childFD] = text.rpartition(b"\n")
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
        if not self.ready:
            self.readied.callback(None)
        self.ended.callback(None)


class PageWorkers:
    """
    Up to C{processes} page workers over the SQLite database at C{path}
    (a relative path is taken from the working directory when the first
    worker starts, as the database's own is when it opens), started by
    L{start} or at the first request, and started again if one exits.

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
        self.path = path
        self.processes = processes
        self.shareSecret = shareSecret
        self._workers: list[_Worker] = []
        self._stopped = False
        #: Workers in a row that could not start or exited unasked, when
        #: the last did, and when the next may start.
        self._failures = 0
        self._lastFailure = float("-inf")
        self._nextStart = 0.0
        #: C{path} made absolute when the first worker starts.
        self._path: str | None = None

    def start(self) -> Deferred[None]:
        """
        Start the workers now rather than at the first request; fires once
        each is ready (or has failed to start: see the log).
        """
        self._workers = [w for w in self._workers if w.alive]
        while not self._stopped and len(self._workers) < self.processes:
            if self._startOne() is None:
                break
        return DeferredList([w.readied for w in self._workers]).addCallback(lambda _: None)

    def run(self, kind: str, *args: Any) -> Deferred[Any]:
        """
        What a worker answers to C{kind} (a L{PageWorker} method) and
        C{args}: of the ready workers (those still starting if none is),
        the one with the fewest requests waiting is asked.
        """
        if self._stopped:
            return fail(WorkerFailed("the page workers are stopped"))
        self._workers = [w for w in self._workers if w.alive]
        if len(self._workers) < self.processes and self._clock.seconds() >= self._nextStart:
            self._startOne()
        if not self._workers:
            return fail(WorkerFailed("no page worker could start or stay up; see the log"))
        candidates = [w for w in self._workers if w.ready] or self._workers
        return min(candidates, key=lambda w: len(w.waiting)).send((kind, args))

    def _startOne(self) -> _Worker | None:
        """
        A new worker; None if the system would not start one (no file
        descriptor or process left, say), which counts as a failed start.
        """
        try:
            return self._start()
        except OSError as e:
            _log.warn("chatweb cannot start a page worker: {error}", error=str(e))
            self._failed(wasReady=False)
            return None

    def _start(self) -> _Worker:
        worker = _Worker()
        if self._path is None:
            # Once: a worker started again later opens the same file.
            self._path = os.path.abspath(self.path)
        # The child imports what this process imports, from where it does
        # (but not from the working directory, unless chatweb came from it).
        home = os.path.dirname(os.path.dirname(os.path.abspath(chatweb.__file__)))
        path = [entry for entry in sys.path if entry not in ("", ".")]
        if home not in path:
            path.insert(0, home)
        env = {name: os.environ[name] for name in _ENVIRONMENT if name in os.environ}
        self._reactor.spawnProcess(
            worker,
            sys.executable,
            [
                sys.executable, "-c", _BOOT,
                "lower" if _priority.favoured() else "normal", json.dumps(path),
                str(os.getpid()),
            ],
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", ANSWERS_FD: "r"},
        )
        assert worker.transport is not None
        worker.transport.write(frame({"path": self._path, "shareSecret": self.shareSecret()}))
        tooLong = self._clock.callLater(READY_TIMEOUT, _kill, worker)
        worker.readied.addCallback(_cancel, tooLong)
        worker.readied.addCallback(self._started, worker)
        worker.ended.addCallback(self._ended, worker)
        self._workers.append(worker)
        return worker

    def _started(self, _: None, worker: _Worker) -> None:
        if not worker.ready:
            self._failed(wasReady=False)

    def _ended(self, _: None, worker: _Worker) -> None:
        if worker.ready and not self._stopped:
            self._failed(wasReady=True)

    def _failed(self, wasReady: bool) -> None:
        # A worker that could not start (a broken install, a missing
        # database) or that keeps exiting (killed for its memory on every
        # view of one page, say) is not started again at every request:
        # starting one costs about half a second of CPU.
        now = self._clock.seconds()
        if now - self._lastFailure > FAILURES_APART:
            self._failures = 0
        self._lastFailure = now
        first, longest = RESTART_DELAYS
        if wasReady and self._failures == 0:
            delay = 0.0
        else:
            delay = min(longest, first * 2**self._failures)
        self._failures += 1
        self._nextStart = now + delay

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
