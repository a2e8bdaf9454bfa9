"""
The examples in docs/ work as documented.
"""

from __future__ import annotations

import importlib.util
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from chatweb import ISessionAdapter
from chatweb.testing import startChatWeb

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples", "notes_adapter.py")


def loadExample():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("notes_adapter", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NotesAdapterTests(TestCase):
    async def test_customAdapterServesTheAPI(self) -> None:
        adapter = loadExample().NotesAdapter(reactor)
        verifyObject(ISessionAdapter, adapter)
        chatweb = await startChatWeb(self, adapter=adapter)
        for n in range(3):
            response = await chatweb.post("notes", f"note {n}")
            self.assertEqual(response.code, 204)
        # The adapter is busy for half a second per message: the queue holds
        # the rest and delivers each the moment the session is idle.
        self.assertTrue(adapter.isBusy("notes"))
        await chatweb.service.queue.whenDelivered()
        session = await adapter.getSession("notes")
        self.assertEqual([m.content for m in session.messages], ["note 0", "note 1", "note 2"])
        response = await chatweb.get("/sessions")
        self.assertEqual(await response.json(), ["notes"])
        response = await chatweb.get("/session?id=notes")
        self.assertIn("note 2", await response.text())
