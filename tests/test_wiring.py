"""
Building a ChatWebService wires objects together and does nothing more: the
files of the data directory are read or created when the service starts,
and an embedder's own adapter gets no tables of the local backend.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.trial.unittest import TestCase

from chatweb.config import DATABASE_NAME, SHARE_SECRET_FILE_NAME
from chatweb.service import ChatWebService
from chatweb.testing import MemoryAdapter

KEY = "k" * 32


class WiringTests(TestCase):
    def dataDir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    async def test_filesWhenStarted(self) -> None:
        """
        The database and the share secret are created when the service
        starts, not when it is built: a service built and never started
        leaves its data directory as it was.
        """
        dataDir = self.dataDir()
        service = ChatWebService(apiKeys=[KEY], dataDir=dataDir, endpoint=None)
        self.assertEqual(os.listdir(dataDir), [])
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        for name in (DATABASE_NAME, SHARE_SECRET_FILE_NAME):
            self.assertTrue(os.path.exists(os.path.join(dataDir, name)), name)

    async def test_ownAdapterNoLocalTables(self) -> None:
        """
        With the embedder's own adapter, the database holds the queue's
        tables and none of the local backend's (no sessions table).
        """
        dataDir = self.dataDir()
        service = ChatWebService(
            apiKeys=[KEY], dataDir=dataDir, endpoint=None, adapter=MemoryAdapter()
        )
        service.startService()
        await service.ready
        await service.stopService()
        with sqlite3.connect(os.path.join(dataDir, DATABASE_NAME)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertIn("queue", tables)
        self.assertNotIn("sessions", tables)
        self.assertNotIn("messages", tables)


class OneServicePerDataDirTests(TestCase):
    """
    Two services on one data directory's SQLite store would each deliver
    every message: the second is refused while the first runs.
    """

    timeout = 20

    def dataDir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    async def test_secondServiceRefused(self) -> None:
        from chatweb._datalock import DataDirInUse

        dataDir = self.dataDir()
        first = ChatWebService(apiKeys=[KEY], dataDir=dataDir, endpoint=None)
        first.startService()
        self.addCleanup(lambda: first.running and first.stopService())
        await first.ready
        second = ChatWebService(apiKeys=[KEY], dataDir=dataDir, endpoint=None)
        second.startService()
        self.addCleanup(lambda: second.running and second.stopService())
        failure = await self.assertFailure(second.ready, DataDirInUse)
        self.assertIn(f"{dataDir} is in use by another chatweb (process {os.getpid()})",
                      str(failure))
        await second.stopService()
        self.flushLoggedErrors(DataDirInUse)
        # The first still runs and delivers; once it stops, a new one starts.
        await first.queue.post("s", "hello")
        await first.stopService()
        third = ChatWebService(apiKeys=[KEY], dataDir=dataDir, endpoint=None)
        third.startService()
        self.addCleanup(third.stopService)
        await third.ready
        self.assertEqual([m.content for m in (await third.adapter.getSession("s")).messages],
                         ["hello"])

    async def test_readyFailsWhenTheDataDirectoryCannotBeUsed(self) -> None:
        """
        A data directory that cannot be used fails C{ready} (whoever waits
        for it is told), as well as C{startService}.
        """
        path = os.path.join(self.dataDir(), "a-file")
        with open(path, "w"):
            pass
        service = ChatWebService(apiKeys=[KEY], dataDir=os.path.join(path, "data"),
                                 endpoint=None)
        ready = service.ready
        self.assertRaises(Exception, service.startService)
        await self.assertFailure(ready, Exception)
