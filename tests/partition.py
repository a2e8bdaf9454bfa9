"""
A network partition between chatweb and PostgreSQL, for
tests/test_partition.py: run as C{unshare -n python -m tests.partition DIR}
(a network namespace of its own, so that its loopback can be taken down).

PostgreSQL listens on 127.0.0.1 and the real C{twistd chatweb} reaches it
over TCP; chatweb listens on a unix socket, which a partition of the
loopback does not cut.  Prints what it saw as one JSON object.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from chatweb.testing._process import twistdCommand

from .postgres import PASSWORD, Cluster, _binaries

KEY = "partition-key-0123456789"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _request(path: str, method: str, target: str, body: Any = None,
             timeout: float = 120.0) -> dict[str, Any]:
    connection = _UnixConnection(path, timeout)
    started = time.monotonic()
    try:
        connection.request(method, target, None if body is None else json.dumps(body),
                           {"X-API-Key": KEY, "Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        return {"status": response.status, "body": text,
                "seconds": time.monotonic() - started}
    except OSError as e:
        return {"status": None, "body": repr(e), "seconds": time.monotonic() - started}
    finally:
        connection.close()


def _loopback(up: bool) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up" if up else "down"], check=True)


def scenario(server: Cluster, directory: str) -> dict[str, Any]:
    # (A socket's path has at most 107 bytes: not under a test's directory.)
    sockets = tempfile.mkdtemp(prefix="chatweb-")
    sock = os.path.join(sockets, "http.sock")
    data = os.path.join(directory, "data")
    os.makedirs(data)
    log = open(os.path.join(directory, "chatweb.log"), "wb")
    process = subprocess.Popen(
        twistdCommand() + ["-n", "--pidfile=", "chatweb", "--api-key", KEY, "--data-dir", data,
                           "--listen", f"unix:{sock}", "--database", server.tcpDSN()],
        env=dict(os.environ, PGPASSWORD=PASSWORD), stdout=log, stderr=subprocess.STDOUT)
    seen: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while _request(sock, "GET", "/healthz", timeout=5)["status"] != 200:
            if time.monotonic() > deadline or process.poll() is not None:
                with open(log.name, "rb") as f:
                    said = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"chatweb did not start: {said}")
            time.sleep(0.2)
        seen["before"] = _request(sock, "POST", "/", {"session": "s", "content": "before"})
        _loopback(False)
        seen["during"] = _request(sock, "POST", "/", {"session": "s", "content": "during"})
        seen["healthDuring"] = _request(sock, "GET", "/healthz", timeout=10)
        _loopback(True)
        deadline = time.monotonic() + 60
        while True:
            after = _request(sock, "POST", "/", {"session": "s", "content": "after"}, 30)
            if after["status"] == 204 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        seen["after"] = after
        seen["healthAfter"] = _request(sock, "GET", "/healthz", timeout=10)
        seen["messages"] = _request(sock, "GET", "/messages?session=s", timeout=30)
    finally:
        _loopback(True)
        process.terminate()
        process.wait(30)
        log.close()
        shutil.rmtree(sockets, ignore_errors=True)
    return seen


def main(directory: str) -> None:
    _loopback(True)
    bindir = _binaries()
    if bindir is None:
        raise SystemExit("no PostgreSQL here")
    server = Cluster(bindir)
    try:
        result = scenario(server, directory)
    finally:
        server.stop()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
