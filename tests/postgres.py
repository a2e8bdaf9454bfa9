"""
A real PostgreSQL server for the tests: one cluster per test run, made with
Debian's C{initdb} and C{pg_ctl} in a temporary directory, listening on a
unix socket there and on a free loopback port, stopped at exit.

Without PostgreSQL the tests that need it skip, saying why; with
C{CHATWEB_REQUIRE_POSTGRES=1} (as in CI) they fail instead.

PostgreSQL refuses to run as root: run as root (as CI does), the cluster
belongs to the C{postgres} user (or C{nobody}) and its programs run as that
user through C{setpriv}.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Any

from twisted.trial.unittest import SkipTest

#: The role the tests connect as, and its password (TCP connections ask
#: for it; the unix socket trusts).
USER = "chatweb"
PASSWORD = "s3cret-Pg-Passw0rd"

_cluster: "Cluster | None" = None
_failure: str | None = None
_names = itertools.count(1)


def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(initdb)) if initdb else None


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """
    A running PostgreSQL cluster.
    """

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.directory = tempfile.mkdtemp(prefix="chatweb-pg-")
        self.data = os.path.join(self.directory, "data")
        self.socketDir = self.directory
        self.port = _freePort()
        self._prefix: list[str] = []
        if os.getuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            else:
                raise RuntimeError("no unprivileged user to run PostgreSQL as")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._prefix = ["setpriv", f"--reuid={user.pw_uid}",
                            f"--regid={user.pw_gid}", "--clear-groups", "--"]
        passwordFile = os.path.join(self.directory, "pw")
        with open(passwordFile, "w") as f:
            f.write(PASSWORD)
        if os.getuid() == 0:
            os.chown(passwordFile, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", self.data, "-U", USER, "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
                  f"--pwfile={passwordFile}", "--no-sync")
        self.running = True
        self._run(
            "pg_ctl", "-D", self.data, "-w", "-t", "60", "-l",
            os.path.join(self.directory, "log"), "start", "-o",
            f"-c listen_addresses=127.0.0.1 -p {self.port}"
            f" -k {self.socketDir} -c fsync=off -c synchronous_commit=off"
            " -c full_page_writes=off -c max_connections=200",
        )

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._prefix, os.path.join(self.bindir, program), *args],
            check=True, capture_output=True, cwd=self.directory,
        )

    def stop(self) -> None:
        if self.running:
            self.running = False
            try:
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "stop")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        """
        The DSN of C{database} over the unix socket (no password asked).
        """
        return f"postgresql://{USER}@/{database}?host={self.socketDir}&port={self.port}"

    def tcpDSN(self, database: str = "postgres") -> str:
        """
        The DSN of C{database} over TCP on 127.0.0.1 (a password is asked).
        """
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def createDatabase(self) -> str:
        """
        A new empty database's name.
        """
        import psycopg

        name = f"test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name

    def dropDatabase(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cluster() -> Cluster:
    """
    The test run's cluster, started on first use.

    @raise SkipTest: there is no PostgreSQL here (unless
        C{CHATWEB_REQUIRE_POSTGRES=1}: then the error is raised).
    """
    global _cluster, _failure
    if _cluster is None and _failure is None:
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as e:
            _failure = f"psycopg is not installed ({e})"
        else:
            bindir = _binaries()
            if bindir is None:
                _failure = ("PostgreSQL is not installed (no initdb; Debian:"
                            " apt-get install postgresql)")
            else:
                try:
                    _cluster = Cluster(bindir)
                except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                    detail = getattr(e, "stderr", b"") or b""
                    _failure = f"PostgreSQL did not start: {e} {detail.decode(errors='replace')[-500:]}"
                else:
                    atexit.register(_cluster.stop)
    if _cluster is not None:
        return _cluster
    assert _failure is not None
    if os.environ.get("CHATWEB_REQUIRE_POSTGRES") == "1":
        raise RuntimeError(f"CHATWEB_REQUIRE_POSTGRES=1, but {_failure}")
    raise SkipTest(_failure)


def freshDatabase(testCase: Any) -> str:
    """
    The DSN (unix socket) of a new empty database, dropped when
    C{testCase} ends.
    """
    server = cluster()
    name = server.createDatabase()
    testCase.addCleanup(server.dropDatabase, name)
    return server.dsn(name)
