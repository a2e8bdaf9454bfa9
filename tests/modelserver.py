"""
A model server for the tests, on 127.0.0.1 port 0: it speaks OpenAI's
chat-completions stream and Anthropic's Messages stream as real servers
send them, and misbehaves on request (odd chunk boundaries, an error
mid-stream, a stall, a dropped connection, error statuses).

Each POST takes the next L{Script} queued with L{ModelServer.then} (the
default script when none is queued) and is recorded in C{requests}.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


def sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return (head + f"data: {text}\n\n").encode("utf-8")


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 4},
}


def openaiStream(
    content: list[str] = ["Héllo", ", wörld ", "✓"],
    reasoning: list[str] = ["Thinking", " hard"],
    reasoningKey: str = "reasoning_content",
    done: bool = True,
) -> list[bytes]:
    """
    The events of a streamed answer, as OpenAI (and Ollama, llama.cpp,
    vLLM, DeepSeek...) send them: the role chunk, reasoning deltas, content
    deltas, the finish reason, the usage chunk, C{[DONE]}.
    """
    events = [b": keep-alive\n\n", sse(_chunk({"role": "assistant", "content": ""}))]
    events += [sse(_chunk({reasoningKey: r})) for r in reasoning]
    events += [sse(_chunk({"content": c})) for c in content]
    events.append(sse(_chunk({}, "stop")))
    events.append(sse({**_chunk({}), "choices": [], "usage": USAGE}))
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


def toolCallStream() -> list[bytes]:
    """
    A streamed answer that asks for a tool: its call in deltas.
    """
    first = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "read_file", "arguments": ""},
    }
    return [
        sse(_chunk({"role": "assistant", "content": None, "tool_calls": [first]})),
        sse(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path":'}}]})),
        sse(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "a.txt"}'}}]})),
        sse(_chunk({}, "tool_calls")),
        sse({**_chunk({}), "choices": [], "usage": USAGE}),
        b"data: [DONE]\n\n",
    ]


def anthropicStream() -> list[bytes]:
    """
    A streamed Messages answer: thinking, text, usage with cached input.
    """
    def event(name: str, data: dict[str, Any]) -> bytes:
        return sse({"type": name, **data}, event=name)

    return [
        event("message_start", {"message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-test", "stop_reason": None,
            "usage": {"input_tokens": 20, "output_tokens": 1, "cache_read_input_tokens": 8},
        }}),
        event("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me see"}}),
        event("content_block_stop", {"index": 0}),
        event("ping", {}),
        event("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "Bonjour"}}),
        event("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": " à vous"}}),
        event("content_block_stop", {"index": 1}),
        event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 6}}),
        event("message_stop", {}),
    ]


def pieces(events: list[bytes], size: int) -> list[bytes]:
    """
    The stream cut every C{size} bytes, whatever it cuts (a UTF-8 sequence,
    a line end).
    """
    data = b"".join(events)
    return [data[i : i + size] for i in range(0, len(data), size)]


@attrs.define
class Script:
    """
    What the server does with one request: a status and headers, then the
    body C{parts} written one per reactor turn; then it ends the response,
    or C{hold}s it open (a stall) or C{drop}s the connection.
    """

    parts: list[bytes] = attrs.field(factory=list)
    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)
    hold: bool = False
    drop: bool = False
    #: Called with the request's headers; returns extra parts (to echo).
    echo: Callable[[Any], bytes] | None = None
    #: Write this many parts, then wait for C{resume} to fire.
    pauseAfter: int | None = None
    resume: Deferred[None] = attrs.field(factory=Deferred)


@attrs.define
class Seen:
    body: Any
    headers: dict[str, str]
    #: Fires when the connection closes before the response ended.
    closed: Deferred[None]
    #: Fires when all the parts were written.
    written: Deferred[None]


class _Endpoint(Resource):
    isLeaf = True

    def __init__(self, server: ModelServer) -> None:
        super().__init__()
        self.model = server

    def render_POST(self, request: Any) -> Any:
        server = self.model
        script = server.scripts.pop(0) if server.scripts else server.default()
        headers = {
            k.decode().lower(): v[0].decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        seen = Seen(json.loads(request.content.read()), headers, Deferred(), Deferred())
        server.requests.append(seen)
        finished = request.notifyFinish()
        state = {"open": True, "sent": 0}

        def lost(_: object) -> None:
            state["open"] = False
            seen.closed.callback(None)

        finished.addErrback(lost)
        request.setResponseCode(script.status)
        contentType = "text/event-stream" if script.status == 200 else "application/json"
        request.setHeader("content-type", contentType)
        for name, value in script.headers.items():
            request.setHeader(name, value)
        parts = list(script.parts)
        if script.echo is not None:
            parts.append(script.echo(headers))

        def step() -> None:
            if not state["open"]:
                return
            if parts:
                request.write(parts.pop(0))
                state["sent"] += 1
                if state["sent"] == script.pauseAfter:
                    script.resume.addCallback(lambda _: step())
                else:
                    reactor.callLater(0, step)
                return
            seen.written.callback(None)
            if script.drop:
                request.channel.transport.abortConnection()
            elif not script.hold:
                request.finish()

        step()
        return NOT_DONE_YET


class ModelServer:
    """
    The server: C{url} is its base URL (as C{--base-url} takes it).
    """

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.requests: list[Seen] = []
        self.default: Callable[[], Script] = lambda: Script(pieces(openaiStream(), 7))
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        endpoint = _Endpoint(self)
        v1.putChild(b"chat", Resource())
        v1.children[b"chat"].putChild(b"completions", endpoint)
        v1.putChild(b"messages", endpoint)
        self.site = Site(root)
        self.port: Any = None

    def then(self, *scripts: Script) -> ModelServer:
        self.scripts.extend(scripts)
        return self

    def start(self, testCase: Any) -> str:
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[arg-type]
        testCase.addCleanup(self.stop)
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/v1"

    async def stop(self) -> None:
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped


def main(argv: list[str]) -> None:
    """
    C{python -m tests.modelserver [PORT]}: serve canned streamed answers on
    127.0.0.1 (OpenAI's C{/v1/chat/completions}, Anthropic's
    C{/v1/messages}), to try chatweb without a model.
    """
    server = ModelServer()

    # The script is chosen before the request is recorded: choose by path.
    server.default = lambda: Script(pieces(openaiStream(), 7))
    anthropic = _Endpoint(server)
    anthropic.render_POST = _anthropicFirst(anthropic.render_POST, server)  # type: ignore[method-assign]
    server.site.resource.children[b"v1"].putChild(b"messages", anthropic)
    port = reactor.listenTCP(int(argv[0]) if argv else 0, server.site, interface="127.0.0.1")  # type: ignore[arg-type]
    print(f"model server on http://127.0.0.1:{port.getHost().port}/v1", flush=True)
    reactor.run()  # type: ignore[attr-defined]


def _anthropicFirst(render: Any, server: ModelServer) -> Any:
    def renderAnthropic(request: Any) -> Any:
        server.scripts.insert(0, Script(pieces(anthropicStream(), 7)))
        return render(request)

    return renderAnthropic


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
