"""
Sessions and messages in chat.nvim's form: every shape chat.nvim writes is
read and written back with exactly its keys, and its role-less records are
never part of what a model is given.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from chatweb.model import Message, Session

USAGE = {
    "prompt_tokens": 1832,
    "completion_tokens": 57,
    "total_tokens": 1889,
    "prompt_tokens_details": {"cached_tokens": 1664, "audio_tokens": 0},
}

#: Each message shape chat.nvim's writers produce (lua/chat/sessions/*.lua,
#: lua/chat/protocol/*.lua), plus values of unexpected types.
SHAPES = {
    "user": {"role": "user", "content": "hi", "created": 1720475060},
    "assistant": {"role": "assistant", "content": "hello", "created": 1720475061},
    "reasoning": {"role": "assistant", "reasoning_content": "think", "created": 1},
    "tool calls": {
        "role": "assistant",
        "created": 1,
        "tool_calls": [{"id": "call_1", "index": 0, "type": "function",
                        "function": {"name": "read_file", "arguments": "{}"}}],
    },
    "no tool calls": {"role": "assistant", "tool_calls": [], "created": 1},
    "tool result": {
        "role": "tool", "content": "ok", "tool_call_id": "call_1", "created": 2,
        "tool_call_state": {"name": "read_file"},
    },
    "tool error": {
        "role": "tool", "content": "can not run this tool, failed to decode arguments.",
        "tool_call_id": "call_1", "created": 2,
        "tool_call_state": {"name": "read_file", "error": "failed to decode arguments."},
    },
    "completed": {"on_complete": True, "usage": USAGE, "created": 3},
    "completed without usage": {"on_complete": True, "created": 3},
    "error": {"error": "API Error (429): slow down", "created": 4},
    "parse error": {"error": "Tool call parsing failed.", "created": 4, "session": "s"},
    "unknown keys": {"role": "user", "content": "x", "future": {"a": [1]}},
    "wrong types": {"role": "user", "content": None, "created": True, "usage": [],
                    "on_complete": "yes", "error": 5, "tool_calls": {}},
    "nothing": {},
}


class MessageShapeTests(SynchronousTestCase):
    def test_everyShapeRoundTrips(self) -> None:
        """
        Reading then writing a message gives back exactly its keys and
        values: no C{role} or C{content} added to a record, nothing dropped.
        """
        for name, shape in SHAPES.items():
            written = Message.fromDict(shape).asDict()
            self.assertEqual(written, shape, name)
            self.assertEqual(sorted(written), sorted(shape), name)
            # And through JSON, as the default backend stores it.
            stored = json.loads(json.dumps(written))
            self.assertEqual(Message.fromDict(stored), Message.fromDict(shape), name)

    def test_recordsHaveNoRole(self) -> None:
        completed = Message.fromDict(SHAPES["completed"])
        self.assertEqual((completed.role, completed.content), (None, None))
        self.assertTrue(completed.on_complete)
        self.assertEqual(completed.tokenUsage.cached_tokens, 1664)
        self.assertEqual(Message.fromDict(SHAPES["error"]).role, None)
        self.assertEqual(Message(on_complete=True).asDict(), {"on_complete": True})

    def test_wrongTypesAreNotTrusted(self) -> None:
        message = Message.fromDict(SHAPES["wrong types"])
        self.assertEqual(
            (message.content, message.created, message.usage, message.on_complete,
             message.error, message.tool_calls),
            (None, None, None, None, None, None),
        )


class SessionTests(SynchronousTestCase):
    SESSION = {
        "id": "2024-07-08-21-44-05",
        "messages": list(SHAPES.values()),
        "provider": "openai",
        "model": "gpt-4o-mini",
        "cwd": "/home/dev",
        "prompt": "",
        "usage": {"total_tokens": 0, "prompt_tokens": 0, "completion_tokens": 0},
        "title": "",
        "pin": False,
        "last_user_message_time": 1720475260,
        "cleared_at": 1720475000,
        "upload_dir": "/tmp/up",
    }

    def test_roundTrip(self) -> None:
        session = Session.fromDict(self.SESSION)
        self.assertEqual(session.asDict(), self.SESSION)
        self.assertEqual((session.cleared_at, session.pin), (1720475000, False))

    def test_onlyKeysThatWereThere(self) -> None:
        self.assertEqual(
            Session.fromDict({"id": "s", "messages": []}).asDict(),
            {"id": "s", "messages": []},
        )

    def test_conversationLeavesOutRecords(self) -> None:
        """
        What a model may be given: user, assistant and tool messages, never
        chat.nvim's completion and error records (as chat.nvim's own
        get_request_messages does).
        """
        session = Session.fromDict(self.SESSION)
        self.assertEqual(
            [m.role for m in session.conversation()],
            ["user", "assistant", "assistant", "assistant", "assistant", "tool", "tool",
             "user", "user"],
        )
