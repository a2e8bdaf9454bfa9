"""
twistd chatweb puts the reactor's thread before the threads that read the
store and render pages (chatweb._priority).
"""

from __future__ import annotations

import os
import sys
import threading

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from chatweb import _priority
from chatweb.store._sqlite import SQLiteDatabase


def _niceness(cursor: object) -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class PriorityTests(TestCase):
    if not sys.platform.startswith("linux"):
        skip = "threads have a niceness of their own on Linux only"

    def setUp(self) -> None:
        interval = sys.getswitchinterval()

        def restore() -> None:
            _priority._favoured = False
            sys.setswitchinterval(interval)

        self.addCleanup(restore)
        self.base = os.getpriority(os.PRIO_PROCESS, 0)

    async def niceness(self) -> tuple[int, int]:
        """
        The niceness of a reading thread and of the writing thread of a new
        database.
        """
        db = SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)
        self.addCleanup(db.close)
        await db.open([])
        return await db.read(_niceness), await db.write(_niceness)

    async def test_readersYieldToTheReactor(self) -> None:
        _priority.favourTheReactor()
        reading, writing = await self.niceness()
        self.assertEqual(reading, self.base + _priority.WORKER_NICENESS)
        # POSTs wait for the writer's commits: it keeps its priority.
        self.assertEqual(writing, self.base)
        self.assertEqual(sys.getswitchinterval(), _priority.SWITCH_INTERVAL)

    async def test_onlyWhenAsked(self) -> None:
        """
        A program that embeds chatweb keeps its threads' priorities.
        """
        self.assertEqual(await self.niceness(), (self.base, self.base))
