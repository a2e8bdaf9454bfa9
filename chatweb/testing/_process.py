"""
The real C{twistd -n chatweb} as a child process, ended when the test
ends: L{ChatWebProcess}.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
from typing import Any, Sequence
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase



class _ProcessOutput(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()
        self._watchers: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for watcher in list(self._watchers):
            pattern, d = watcher
            match = pattern.search(self.output)
            if match:
                self._watchers.remove(watcher)
                d.callback(match)

    errReceived = outReceived

    def waitFor(self, pattern: bytes) -> Deferred[re.Match[bytes]]:
        d: Deferred[re.Match[bytes]] = Deferred()
        self._watchers.append((re.compile(pattern), d))
        self.outReceived(b"")
        return d

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.ended.callback(code if code is not None else -(signal or 0))
        for _, d in self._watchers:
            d.errback(RuntimeError("chatweb exited: " + self.output.decode("utf-8", "replace")))
        self._watchers = []


def twistdCommand() -> list[str]:
    """
    How to run this environment's twistd.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


#: The processes started and not yet ended, by pid: killed at exit, should a
#: test have left one running.
_running: dict[int, Any] = {}


@atexit.register
def _killLeftovers() -> None:
    for pid in list(_running):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class ChatWebProcess:
    """
    The real C{twistd -n chatweb}, as a child process on 127.0.0.1 (a free
    port), for end-to-end tests.

    Pass the test as C{testCase}: the process is then stopped when the test
    ends, whether or not it called L{stop}.  (A process left running anyway
    is killed when the Python process exits.)

    @ivar url: set by L{start}.
    @ivar output: everything the process printed.
    """

    #: The line that says it listens (whole: a port split across two reads
    #: must not be read as a shorter one).
    LISTENING = rb"chatweb listening on 127\.0\.0\.1:(\d+)\r?\n"

    def __init__(
        self,
        dataDir: str,
        apiKey: str = "test-api-key",
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        testCase: TestCase | None = None,
    ) -> None:
        self.testCase = testCase
        self.dataDir = dataDir
        self.apiKey = apiKey
        self.args = list(args)
        self.env = env
        self.url: str | None = None
        #: The endpoint it listens on.
        self.listen = "tcp:0:interface=127.0.0.1"
        self._protocol: _ProcessOutput | None = None
        self._process: Any = None

    @property
    def pid(self) -> int | None:
        """
        The process id, once started.
        """
        return self._process.pid if self._process is not None else None

    @property
    def output(self) -> str:
        return self._protocol.output.decode("utf-8", "replace") if self._protocol else ""

    async def start(self, timeout: float = 60.0) -> str:
        """
        Start it; fires with its base URL once it listens.
        """
        from twisted.internet import reactor

        env = dict(os.environ if self.env is None else self.env)
        # Its own key, even where the user's shell has one set.
        env["CHATWEB_API_KEY"] = self.apiKey
        command = twistdCommand() + [
            "--nodaemon",
            "--pidfile=",
            "chatweb",
            "--data-dir",
            self.dataDir,
            "--listen",
            self.listen,
            *self.args,
        ]
        self._protocol = _ProcessOutput()
        self._process = reactor.spawnProcess(
            self._protocol, command[0], command, env=env
        )
        pid = self._process.pid
        _running[pid] = self

        def ended(result: object) -> object:
            _running.pop(pid, None)
            return result

        self._protocol.ended.addBoth(ended)
        if self.testCase is not None:
            self.testCase.addCleanup(self.stop)
        listening = self._protocol.waitFor(self.LISTENING)
        listening.addTimeout(timeout, reactor)
        match = await listening
        self.url = f"http://127.0.0.1:{int(match.group(1))}"
        return self.url

    def signal(self, name: str) -> None:
        """
        Send a signal: C{"TERM"} to stop it, C{"KILL"} to crash it.
        """
        if self._protocol is not None and not self._protocol.ended.called:
            self._process.signalProcess(name)

    async def stop(self, timeout: float = 30.0) -> int:
        """
        SIGTERM, then wait for the exit (SIGKILL after C{timeout}).
        """
        from twisted.internet import reactor

        if self._protocol is None:
            return 0
        if self._protocol.ended.called:
            return await self._protocol.ended
        self.signal("TERM")
        kill = reactor.callLater(timeout, self.signal, "KILL")
        code = await self._protocol.ended
        if kill.active():
            kill.cancel()
        return code

    async def exited(self) -> int:
        """
        Wait for the process to end by itself; its exit code (or minus the
        signal that ended it).
        """
        assert self._protocol is not None
        return await self._protocol.ended

    async def crash(self) -> int:
        """
        SIGKILL: no chance to clean up.
        """
        assert self._protocol is not None
        self.signal("KILL")
        return await self._protocol.ended
