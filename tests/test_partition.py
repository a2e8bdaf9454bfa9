"""
A network partition between chatweb and PostgreSQL: a write under way
fails with a 503 in seconds, not after TCP's 15 minutes, and chatweb is
back once the network is.  The real C{twistd chatweb} and PostgreSQL run in
a network namespace of their own (tests/partition.py), whose loopback is
taken down; Linux and root only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .postgres import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _namespaceProblem() -> str | None:
    """
    Why this machine cannot run the partition, or None.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.getuid() != 0:
        return "a network namespace needs root"
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "needs unshare (util-linux) and ip (iproute2)"
    tried = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True)
    if tried.returncode:
        return f"cannot make a network namespace: {tried.stderr.strip()}"
    return None


class PartitionTests(SynchronousTestCase):
    def test_writeDuringAPartitionFailsInSeconds(self) -> None:
        """
        With the loopback between chatweb and PostgreSQL down, a POST under
        way gets a 503 with a JSON error within about 20 s (chatweb's TCP
        settings; a connection that timed out is not replaced by one that
        would wait as long again) and /healthz says the database is
        unreachable; once the loopback is up, POSTs are stored again and
        what was acknowledged is there once.
        """
        cluster()  # PostgreSQL here, or skip (or fail, as CI requires it)
        problem = _namespaceProblem()
        if problem:
            raise SkipTest(problem)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        finished = subprocess.run(
            ["unshare", "-n", sys.executable, "-m", "tests.partition", directory],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        self.assertEqual(finished.returncode, 0, finished.stderr[-2000:])
        seen = json.loads(finished.stdout.splitlines()[-1])
        self.assertEqual(seen["before"]["status"], 204)
        during = seen["during"]
        self.assertEqual(during["status"], 503, during)
        self.assertIn("error", json.loads(during["body"]))
        self.assertLess(during["seconds"], 30)
        self.assertEqual((seen["healthDuring"]["status"], json.loads(seen["healthDuring"]["body"])),
                         (503, {"status": "database unreachable"}))
        self.assertEqual(seen["after"]["status"], 204, seen["after"])
        self.assertEqual(seen["healthAfter"]["status"], 200)
        contents = [m["content"] for m in json.loads(seen["messages"]["body"])]
        self.assertEqual([c for c in contents if c != "during"], ["before", "after"])
        self.assertLessEqual(contents.count("during"), 1)
