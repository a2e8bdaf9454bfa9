"""
The PostgreSQL engine on a real server (see L{tests.postgres}): the local
backend's session storage, the schema made by instances starting at once,
the password never shown, and the service wired to it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
from chatweb.backends.local import LocalBackend
from chatweb.backends.responders import EchoResponder
from chatweb.model import Delivery
from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.store._journal import SQLiteJournal
from chatweb.store._postgresql import PostgreSQLDatabase, redact, translate
from chatweb.tap import Options

from . import test_sessionapi, test_storage
from .postgres import PASSWORD, USER, cluster, freshDatabase

SCHEMA = JOURNAL_SCHEMA + SESSIONS_SCHEMA


class PostgreSQLStorageMixin:
    """
    Runs a L{test_storage} TestCase on a fresh PostgreSQL database.
    """

    def setUp(self) -> Any:
        self.dsn = freshDatabase(self)
        self.db = self.openDatabase()
        return self.db.open(SCHEMA)

    def openDatabase(self) -> Any:
        db = PostgreSQLDatabase(self.dsn, reactor)
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        return db


class PostgreSQLJournalTests(PostgreSQLStorageMixin, test_storage.JournalTests):
    async def test_appendIsDurable(self) -> None:  # type: ignore[override]
        """
        An appended message is there for another connection once its
        append has fired.
        """
        import psycopg

        journal = SQLiteJournal(self.db)
        first = await journal.append("ci", "one", 1.0)
        await journal.append("ci", "two", 2.0)
        with psycopg.connect(self.dsn) as other:
            rows = other.execute("SELECT content FROM queue ORDER BY id").fetchall()
        self.assertEqual(rows, [("one",), ("two",)])
        await journal.markDelivered(first.id)
        self.assertEqual([m.content for m in await journal.pending()], ["two"])


class PostgreSQLLocalBackendTests(PostgreSQLStorageMixin, test_storage.LocalBackendTests):
    pass


class PostgreSQLIdempotencyTests(PostgreSQLStorageMixin, test_storage.IdempotencyJournalTests):
    pass


class ServiceTests(TestCase):
    async def test_chatNvimExamplesOnPostgreSQL(self) -> None:
        """
        chat.nvim's documented requests, over HTTP, with sessions and the
        queue in PostgreSQL (C{database=}): the same answers as on SQLite.
        """
        dsn = freshDatabase(self)
        import chatweb.testing

        original = chatweb.testing.startChatWeb

        async def onPostgreSQL(testCase: Any, **kwargs: Any) -> Any:
            return await original(testCase, database=dsn, **kwargs)

        self.patch(chatweb.testing, "startChatWeb", onPostgreSQL)
        await test_sessionapi.LocalBackendTests.test_chatNvimExamples(self)  # type: ignore[arg-type]
        import psycopg

        with psycopg.connect(dsn) as connection:
            count = connection.execute("SELECT COUNT(*) FROM events").fetchone()
        self.assertTrue(count[0] > 10)


class SchemaTests(TestCase):
    async def test_instancesStartingAtOnce(self) -> None:
        """
        Eight instances opening one empty database at once all start (the
        schema is made once, under an advisory lock) and share it.
        """
        dsn = freshDatabase(self)
        dbs = [PostgreSQLDatabase(dsn, reactor) for _ in range(8)]
        for db in dbs:
            self.addCleanup(db.close)
        await gatherResults([db.open(SCHEMA) for db in dbs])
        message = await SQLiteJournal(dbs[0]).append("s", "x", 1.0)
        self.assertEqual(await SQLiteJournal(dbs[4]).pending(), [message])

    async def test_newerSchemaRefused(self) -> None:
        dsn = freshDatabase(self)
        db = PostgreSQLDatabase(dsn, reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        import psycopg

        with psycopg.connect(dsn) as connection:
            connection.execute("UPDATE chatweb_schema SET version = 99")
        again = PostgreSQLDatabase(dsn, reactor)
        self.addCleanup(again.close)
        failure = await self.assertFailure(again.open(SCHEMA), RuntimeError)
        self.assertIn("newer", str(failure))

    def test_translation(self) -> None:
        self.assertEqual(
            translate("INSERT OR IGNORE INTO sessions (id, created) VALUES (?, ?)")[0],
            "INSERT INTO sessions (id, created) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        )
        self.assertEqual(
            translate("INSERT OR REPLACE INTO t (k, a, b) VALUES (?, ?, ?)")[0],
            "INSERT INTO t (k, a, b) VALUES (%s, %s, %s)"
            " ON CONFLICT (k) DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b",
        )


class PasswordTests(TestCase):
    """
    The password reaches PostgreSQL (over TCP, which asks for it) from a
    file, $PGPASSWORD or the DSN, and is never shown.
    """

    def setUp(self) -> None:
        self.server = cluster()
        self.name = self.server.createDatabase()
        self.addCleanup(self.server.dropDatabase, self.name)
        self.logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            from twisted.logger import formatEvent

            self.logged.append(formatEvent(event) + repr(event.get("log_failure", "")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def opens(self, dsn: str, password: str | None = None) -> None:
        db = PostgreSQLDatabase(dsn, reactor, password)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        await SQLiteJournal(db).append("s", "x", 1.0)

    async def test_passwordFromFileOption(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(PASSWORD + "\n")
        options = Options()
        options.parseOptions([
            "--api-key", "k" * 32, "--database", self.server.tcpDSN(self.name),
            "--database-password-file", path,
        ])
        self.assertEqual(options["database-password"], PASSWORD)
        await self.opens(options["database"], options["database-password"])

    async def test_passwordFromEnvironment(self) -> None:
        os.environ["PGPASSWORD"] = PASSWORD
        self.addCleanup(os.environ.pop, "PGPASSWORD")
        await self.opens(self.server.tcpDSN(self.name))

    async def test_passwordInDSNNeverShown(self) -> None:
        dsn = self.server.tcpDSN(self.name).replace(f"{USER}@", f"{USER}:{PASSWORD}@")
        await self.opens(dsn)
        db = PostgreSQLDatabase(dsn, reactor)
        self.assertNotIn(PASSWORD, db.path)
        self.assertNotIn(PASSWORD, redact(f"host=x password={PASSWORD} user=y"))

    async def test_wrongPasswordFailsWithoutShowingIt(self) -> None:
        """
        A wrong password: the service does not start, and neither the log
        nor the error holds the password (or the right one).
        """
        from chatweb.service import ChatWebService

        wrong = "Wr0ng-pass-w0rd-xyz"
        dsn = self.server.tcpDSN(self.name).replace(f"{USER}@", f"{USER}:{wrong}@")
        service = ChatWebService(
            ["k" * 32], os.path.abspath(self.mktemp()), endpoint=None, database=dsn
        )
        os.makedirs(service.dataDir)
        service.startService()
        self.addCleanup(service.stopService)
        failure = await self.assertFailure(service.ready, Exception)
        self.assertIn("password authentication failed", str(failure))
        self.assertNotIn(wrong, str(failure))
        text = "\n".join(self.logged)
        self.assertIn("cannot start on the database postgresql://", text)
        self.assertIn(":***@127.0.0.1", text)
        self.assertNotIn(wrong, text)
        self.assertNotIn(PASSWORD, text)
        import psycopg

        self.assertEqual(len(self.flushLoggedErrors(psycopg.OperationalError)), 1)


class RoundTripTests(TestCase):
    async def test_echoAnswersStored(self) -> None:
        """
        The local backend on PostgreSQL answers once per delivery id, even
        when the delivery comes again (a crash before it was recorded).
        """
        db = PostgreSQLDatabase(freshDatabase(self), reactor)
        self.addCleanup(db.close)
        await db.open(SCHEMA)
        backend = LocalBackend(db, reactor, EchoResponder(reactor), eventSink=lambda e: None)
        await backend.deliver(Delivery(1, "ci", "a\x00b", 1.0))
        await backend.deliver(Delivery(1, "ci", "a\x00b", 1.0))
        session = await backend.getSession("ci")
        self.assertEqual(
            [(m.role, m.content) for m in session.messages],
            [("user", "a\x00b"), ("assistant", "a\x00b")],
        )
        events = await SQLiteJournal(db).eventsSince(0)
        self.assertEqual(
            [e.kind.value for e in events],
            ["session.created", "message.added", "message.added"],
        )
        self.assertEqual(json.loads(json.dumps(events[1].data))["delivery"], 1)
