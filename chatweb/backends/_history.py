"""
A session's history in the form a model's protocol wants: the system
prompt, then the messages, with tool calls paired with their results and
chat.nvim's role-less records left out, trimmed to a budget.

An answer cut short (a stop, a timeout, a stream that ended early: chatweb
keeps the part that arrived, followed by chat.nvim's error record) is shown,
never sent: chat.nvim keeps no such part, and a model given one would take
it for its own last turn (Anthropic continues it; a retry would be sent
every earlier attempt's part).  Nor is an answer with neither text nor
tool calls (only reasoning), which Anthropic refuses.
"""

from __future__ import annotations

import json
from typing import Any

from chatweb.model._values import Message, Session

#: Characters of history sent at most (roughly four per token).
DEFAULT_BUDGET = 200_000


def _callId(call: Any) -> str | None:
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        return str(call["id"])
    return None


def _cost(message: Message) -> int:
    cost = len(message.content or "")
    if message.tool_calls:
        cost += len(json.dumps(message.tool_calls, ensure_ascii=False))
    return cost + 16


def conversation(session: Session, budget: int = DEFAULT_BUDGET) -> list[Message]:
    """
    The messages of C{session} a model is given, oldest first: only user,
    assistant and tool messages, not answers cut short or without text or
    tool calls; the newest ones that fit in C{budget} characters (the last
    one always), starting at a user message; an assistant's tool calls
    kept only with their results, results only with their calls (chatweb
    runs no tools: a call it recorded has no result).
    """
    messages = [
        m
        for m in session.conversation()
        if not (m.role == "assistant" and not m.content and not m.tool_calls)
    ]
    kept: list[Message] = []
    spent = 0
    for message in reversed(messages):
        spent += _cost(message)
        if kept and spent > budget:
            break
        kept.append(message)
    kept.reverse()
    while kept and kept[0].role != "user":
        kept.pop(0)
    answered = {m.tool_call_id for m in kept if m.role == "tool" and m.tool_call_id}
    out: list[Message] = []
    called: set[str] = set()
    for message in kept:
        if message.role == "assistant" and message.tool_calls:
            calls = [c for c in message.tool_calls if _callId(c) in answered]
            called.update(c["id"] for c in calls)
            if not calls and not message.content:
                continue
            out.append(_with(message, calls or None))
        elif message.role == "tool":
            if message.tool_call_id in called:
                out.append(message)
        else:
            out.append(message)
    return out


def _with(message: Message, calls: list[Any] | None) -> Message:
    import attrs

    return attrs.evolve(message, tool_calls=calls)


def openaiMessages(
    session: Session, systemPrompt: str | None, budget: int = DEFAULT_BUDGET
) -> list[dict[str, Any]]:
    """
    Chat-completions C{messages}: a system message with the session's
    prompt (else the provider's), then the conversation.
    """
    prompt = session.prompt if session.prompt else systemPrompt
    out: list[dict[str, Any]] = []
    if prompt:
        out.append({"role": "system", "content": prompt})
    for message in conversation(session, budget):
        item: dict[str, Any] = {"role": message.role, "content": message.content or ""}
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {
                        "name": (c.get("function") or {}).get("name", ""),
                        "arguments": (c.get("function") or {}).get("arguments", ""),
                    },
                }
                for c in message.tool_calls
            ]
            if not message.content:
                item["content"] = None
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


def _arguments(call: dict[str, Any]) -> Any:
    text = (call.get("function") or {}).get("arguments") or "{}"
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def anthropicMessages(
    session: Session, systemPrompt: str | None, budget: int = DEFAULT_BUDGET
) -> tuple[str | None, list[dict[str, Any]]]:
    """
    The Messages API's C{system} and C{messages}: tool calls become
    C{tool_use} blocks, their results C{tool_result} blocks of a user turn.
    """
    prompt = session.prompt if session.prompt else systemPrompt
    out: list[dict[str, Any]] = []
    for message in conversation(session, budget):
        if message.role == "tool":
            out.append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": message.tool_call_id,
                            "content": message.content or "",
                        }
                    ],
                }
            )
        elif message.role == "assistant" and message.tool_calls:
            blocks: list[dict[str, Any]] = []
            if message.content:
                blocks.append({"type": "text", "text": message.content})
            for call in message.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call["id"],
                        "name": (call.get("function") or {}).get("name", ""),
                        "input": _arguments(call),
                    }
                )
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": str(message.role), "content": message.content or ""})
    return prompt or None, out
