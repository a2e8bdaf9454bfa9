"""
Durable storage: the SQLite database (one writer thread) and the journal of
the message queue (L{chatweb.interfaces.IJournal}) kept in it; and the
journal in memory, for tests; or PostgreSQL, shared by several instances.
"""

from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
from chatweb.store._journal import SQLiteJournal
from chatweb.store._memory import MemoryJournal
from chatweb.store._postgresql import PostgreSQLDatabase
from chatweb.store._sqlite import DatabaseClosed, SQLiteDatabase

__all__ = [
    "DatabaseClosed",
    "JOURNAL_SCHEMA",
    "MemoryJournal",
    "PostgreSQLDatabase",
    "SQLiteDatabase",
    "SQLiteJournal",
]
