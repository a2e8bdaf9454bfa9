"""
Model responders: the SSE decoder, the history sent, the providers file,
and answers streamed from a real (local) model server over treq.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.backends import (
    ModelError,
    ModelResponder,
    Provider,
    Stopped,
    loadProviders,
    providerFromOptions,
)
from chatweb.backends._history import anthropicMessages, conversation, openaiMessages
from chatweb.limits import parseRetryAfter as retryAfter
from chatweb.backends._providers import Secret
from chatweb._sse import SSEDecoder, SSEError
from chatweb.config import ConfigError
from chatweb.model import Message, Session

from .modelserver import (
    ModelServer,
    Script,
    anthropicStream,
    openaiStream,
    pieces,
    sse,
    toolCallStream,
)

KEY = "sk-test-very-secret-key-0123456789"


class SSEDecoderTests(SynchronousTestCase):
    def events(self, chunks: list[bytes]) -> list[tuple[str, str]]:
        decoder = SSEDecoder()
        out = []
        for chunk in chunks:
            out += [(e.event, e.data) for e in decoder.feed(chunk)]
        self.assertFalse(decoder.pending)
        return out

    def test_lineLongerThanTheLimitRefused(self) -> None:
        """
        A server that never ends its line cannot make chatweb hold all it
        sends, whether the line comes whole or in pieces; a line within
        the limit is an event.
        """
        decoder = SSEDecoder(maxLine=100)
        self.assertEqual(decoder.feed(b"data: " + b"x" * 90), [])
        self.assertEqual([e.data for e in decoder.feed(b"\n\n")], ["x" * 90])
        for chunks in ([b"data: " + b"x" * 95], [b"data: ", b"x" * 50, b"x" * 45]):
            decoder = SSEDecoder(maxLine=100)
            with self.assertRaises(SSEError):
                for chunk in chunks:
                    decoder.feed(chunk)

    def test_anyBoundary(self) -> None:
        """
        The same events come out wherever the bytes are cut: inside a
        UTF-8 sequence, a CRLF pair, a field name.
        """
        stream = (
            b"".join(openaiStream() + anthropicStream() + [b"data: a\ndata: b\n\n"])
        ).replace(b"\n", b"\r\n")
        whole = self.events([stream])
        self.assertEqual(len(whole), 21)
        self.assertIn("Héllo", whole[3][1])
        self.assertEqual(whole[9][0], "message_start")
        self.assertEqual(whole[-1], ("message", "a\nb"))
        for cut in range(len(stream)):
            self.assertEqual(self.events([stream[:cut], stream[cut:]]), whole, cut)
        self.assertEqual(self.events([bytes([b]) for b in stream]), whole)

    def test_fields(self) -> None:
        """
        Comments are skipped, several data lines join with newlines, the
        event name is kept, CR alone ends a line, one space is dropped.
        """
        stream = b": hi\nevent: ping\ndata:  a\ndata:b\r\rdata: c\n\n"
        self.assertEqual(self.events([stream]), [("ping", " a\nb"), ("message", "c")])

    def test_badUTF8(self) -> None:
        with self.assertRaises(SSEError):
            SSEDecoder().feed(b"data: \xff\xfe\n\n")

    def test_cutShort(self) -> None:
        decoder = SSEDecoder()
        decoder.feed(b"data: {\"a\"")
        self.assertTrue(decoder.pending)


def _session(*messages: Message, **kw: Any) -> Session:
    return Session(id="s", messages=messages, **kw)


class HistoryTests(SynchronousTestCase):
    def test_rolelessDropped(self) -> None:
        """
        chat.nvim's on_complete and error records are never sent; the
        session's prompt is the system message.
        """
        session = _session(
            Message(role="user", content="hi", created=1),
            Message(role="assistant", content="hello", reasoning_content="r", created=2),
            Message(on_complete=True, usage={"total_tokens": 3}, created=2),
            Message(error="API Error (500): boom", created=3),
            Message(role="user", content="again", created=4),
            prompt="Be brief.",
        )
        self.assertEqual(
            openaiMessages(session, "ignored"),
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"},
            ],
        )
        system, messages = anthropicMessages(_session(*session.messages), "Sys")
        self.assertEqual(system, "Sys")
        self.assertEqual([m["role"] for m in messages], ["user", "assistant", "user"])

    def test_answersCutShortNotSent(self) -> None:
        """
        The parts of answers cut short (stopped, timed out, cut: each
        followed by chat.nvim's error record), kept for the user, are not
        sent to the model, nor is an answer that is only reasoning: a
        retried message is asked as the first time, and Anthropic is not
        sent an empty assistant turn or a last turn to continue.
        """
        session = _session(
            Message(role="user", content="q1"),
            Message(role="assistant", content="full answer"),
            Message(on_complete=True, created=2),
            Message(role="user", content="q2"),
            Message(role="assistant", content="kept "),
            Message(error="Operation timeout. The server took too long to respond.", created=3),
            Message(role="assistant", content="kept again "),
            Message(error="Request cancelled: chatweb stopped. It is asked again when"
                    " chatweb starts.", created=4),
            Message(role="assistant", reasoning_content="Thinking about it..."),
            Message(error="Request cancelled by user. Press r to retry.", created=5),
            Message(role="user", content="q3"),
            Message(role="assistant", reasoning_content="only thoughts"),
            Message(on_complete=True, created=6),
            Message(role="user", content="q4"),
        )
        self.assertEqual(
            openaiMessages(session, None),
            [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "full answer"},
             {"role": "user", "content": "q2"}, {"role": "user", "content": "q3"},
             {"role": "user", "content": "q4"}],
        )
        _, anthropic = anthropicMessages(session, None)
        self.assertEqual([m["content"] for m in anthropic], ["q1", "full answer", "q2", "q3", "q4"])

    def test_toolsPaired(self) -> None:
        """
        A tool call is sent only with its result, a result only with its
        call (chatweb runs no tools: its own recorded calls have none).
        """
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        lone = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}
        session = _session(
            Message(role="user", content="q"),
            Message(role="assistant", tool_calls=[call, lone]),
            Message(role="tool", tool_call_id="c1", content="result"),
            Message(role="tool", tool_call_id="zz", content="orphan"),
            Message(role="assistant", content="done"),
            Message(role="user", content="q2"),
            Message(role="assistant", tool_calls=[lone]),
        )
        sent = openaiMessages(session, None)
        self.assertEqual(
            [(m["role"], [c["id"] for c in m.get("tool_calls", [])]) for m in sent],
            [("user", []), ("assistant", ["c1"]), ("tool", []), ("assistant", []), ("user", [])],
        )
        self.assertEqual(sent[2]["tool_call_id"], "c1")
        _, anthropic = anthropicMessages(session, None)
        self.assertEqual(anthropic[1]["content"][0]["type"], "tool_use")
        self.assertEqual(anthropic[2]["content"][0]["tool_use_id"], "c1")

    def test_budget(self) -> None:
        """
        A long session is cut to the budget, oldest first, and starts at a
        user message; the newest message is always sent.
        """
        messages = []
        for i in range(100):
            messages.append(Message(role="user", content=f"u{i} " + "x" * 100))
            messages.append(Message(role="assistant", content=f"a{i} " + "y" * 100))
        messages.append(Message(role="user", content="last"))
        kept = conversation(_session(*messages), budget=1000)
        self.assertLess(sum(len(m.content or "") for m in kept), 1000)
        self.assertEqual(kept[0].role, "user")
        self.assertEqual(kept[-1].content, "last")
        self.assertGreater(len(kept), 3)
        self.assertEqual(conversation(_session(Message(role="user", content="z" * 5000)), 10)[0].content, "z" * 5000)


class ProvidersTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_file(self) -> None:
        path = self.write(
            'default = "cloud"\n'
            '[providers.local]\nbase_url = "http://127.0.0.1:11434/v1"\nmodel = "llama3.2"\n'
            '[providers.cloud]\nprotocol = "anthropic"\nmodel = "claude"\n'
            'models = ["claude", "other"]\nkey_env = "MY_KEY"\ntimeout = 30\n'
        )
        providers, default = loadProviders(path, {"MY_KEY": KEY})
        self.assertEqual(default, "cloud")
        local, cloud = providers
        self.assertEqual((local.protocol, local.baseUrl, local.key), ("openai", "http://127.0.0.1:11434/v1", None))
        self.assertEqual(cloud.baseUrl, "https://api.anthropic.com/v1")
        self.assertEqual(cloud.key.reveal(), KEY)  # type: ignore[union-attr]
        self.assertNotIn(KEY, repr(cloud))
        self.assertNotIn(KEY, repr(providers))

    def test_errors(self) -> None:
        for text, words in [
            ("nope", "not valid TOML"),
            ("[providers.a]\nprotocol = 'x'\n", "protocol"),
            ("[providers.a]\nbase_urll = 'x'\n", "unknown keys base_urll"),
            ("[providers.a]\nkey_env = 'UNSET_VAR_X'\n", "UNSET_VAR_X is not set"),
            ("default = 'b'\n[providers.a]\n", "default 'b'"),
            ("[providers.a]\ntimeout = -1\n", "timeout"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                loadProviders(self.write(text), {})
            self.assertIn(words, str(caught.exception))

    def test_options(self) -> None:
        """
        The command line's key comes from the key file, else the protocol's
        variable.
        """
        keyFile = self.write(KEY + "\n")
        provider = providerFromOptions("openai", keyFile=keyFile, environ={})
        self.assertEqual(provider.key, Secret(KEY))
        provider = providerFromOptions("anthropic", environ={"ANTHROPIC_API_KEY": "k2"})
        self.assertEqual(provider.key, Secret("k2"))
        self.assertIsNone(providerFromOptions("openai", environ={}).key)

    def test_documented(self) -> None:
        """
        docs/models.md's providers file loads as it says, and every option
        it names is one twistd chatweb takes.
        """
        import re

        from chatweb.tap import Options

        docs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "models.md")
        with open(docs, encoding="utf-8") as f:
            text = f.read()
        toml = text.split("```toml\n")[1].split("```")[0]
        providers, default = loadProviders(self.write(toml), {"ANTHROPIC_API_KEY": KEY})
        self.assertEqual(default, "ollama")
        self.assertEqual(
            [p.listing() for p in providers],
            [{"name": "ollama", "protocol": "openai", "models": ["llama3.2", "qwen3"]},
             {"name": "claude", "protocol": "anthropic", "models": ["claude-sonnet-4-5"]}],
        )
        self.assertEqual(providers[1].systemPrompt, "Answer briefly.")
        known = {o[0] for o in Options.optParameters} | {o[0] for o in Options.optFlags}
        for option in set(re.findall(r"`--([a-z-]+)", text)):
            self.assertIn(option, known)

    def test_retryAfter(self) -> None:
        self.assertEqual(retryAfter(b"7", 0), 7.0)
        self.assertEqual(retryAfter(b"Thu, 01 Jan 1970 00:01:40 GMT", 40.0), 60.0)
        self.assertIsNone(retryAfter(b"soon", 0))
        self.assertEqual(retryAfter(b"99999999", 0), 3600.0)


class StreamTests(TestCase):
    """
    A L{ModelResponder} against the local model server.
    """

    timeout = 20

    def setUp(self) -> None:
        self.server = ModelServer()
        self.server.start(self)
        self.clock = task.Clock()
        self.emitted: list[str] = []

    def responder(self, protocol: str = "openai", timeout: float = 30.0, clock: Any = None) -> ModelResponder:
        provider = Provider(
            name=protocol, protocol=protocol, baseUrl=self.server.url,
            model="test-model", key=Secret(KEY), timeout=timeout,
        )
        return ModelResponder([provider], reactor, clock=clock or reactor)

    def ask(self, responder: ModelResponder, content: str = "hi") -> Deferred[list[Message]]:
        session = _session(Message(role="user", content=content))
        return responder.respond(session, session.messages[-1], emit=self.emitted.append)

    async def failure(self, d: Deferred[Any]) -> ModelError:
        try:
            await d
        except ModelError as e:
            return e
        self.fail("no failure")

    async def test_openai(self) -> None:
        """
        Content, reasoning and usage are assembled from a stream cut every
        few bytes; the text is emitted as it arrives; the request carries
        the key, stream and include_usage.
        """
        messages = await self.ask(self.responder())
        answer, done = [m.asDict() for m in messages]
        self.assertEqual(answer["content"], "Héllo, wörld ✓")
        self.assertEqual(answer["reasoning_content"], "Thinking hard")
        self.assertEqual(answer["role"], "assistant")
        self.assertEqual(done["on_complete"], True)
        self.assertEqual(done["usage"]["prompt_tokens_details"], {"cached_tokens": 4})
        self.assertEqual("".join(self.emitted), "Héllo, wörld ✓")
        seen = self.server.requests[0]
        self.assertEqual(seen.headers["authorization"], "Bearer " + KEY)
        self.assertEqual(seen.body["stream"], True)
        self.assertEqual(seen.body["stream_options"], {"include_usage": True})
        self.assertEqual(seen.body["messages"], [{"role": "user", "content": "hi"}])

    async def test_textOfOneReadEmittedOnce(self) -> None:
        """
        The text of the events that arrive together is emitted as one
        piece (each piece is an event in chatweb's log); pieces that arrive
        apart are emitted apart, as they arrive.
        """
        events = openaiStream(content=[f"t{n} " for n in range(200)], reasoning=[])
        script = Script([b"".join(events[:150]), b"".join(events[150:])], pauseAfter=1)
        self.server.then(script)
        d = self.ask(self.responder())
        while not self.emitted:
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.emitted, ["".join(f"t{n} " for n in range(148))])
        script.resume.callback(None)
        messages = await d
        self.assertEqual(self.emitted[1:], ["".join(f"t{n} " for n in range(148, 200))])
        self.assertEqual(messages[0].content, "".join(f"t{n} " for n in range(200)))

    async def test_reasoningField(self) -> None:
        """
        The C{reasoning} field some servers use (Ollama, OpenRouter) is
        reasoning too.
        """
        self.server.then(Script(pieces(openaiStream(reasoningKey="reasoning"), 3)))
        messages = await self.ask(self.responder())
        self.assertEqual(messages[0].reasoning_content, "Thinking hard")

    async def test_toolCalls(self) -> None:
        self.server.then(Script(pieces(toolCallStream(), 11)))
        messages = await self.ask(self.responder())
        self.assertEqual(
            messages[0].tool_calls,
            [{"id": "call_1", "type": "function",
              "function": {"name": "read_file", "arguments": '{"path": "a.txt"}'}}],
        )
        self.assertTrue(messages[1].on_complete)

    async def test_anthropic(self) -> None:
        self.server.then(Script(pieces(anthropicStream(), 5)))
        messages = await self.ask(self.responder("anthropic"))
        self.assertEqual(messages[0].content, "Bonjour à vous")
        self.assertEqual(messages[0].reasoning_content, "Let me see")
        self.assertEqual(
            messages[1].usage,
            {"total_tokens": 26, "prompt_tokens": 20, "completion_tokens": 6,
             "prompt_tokens_details": {"cached_tokens": 8}},
        )
        seen = self.server.requests[0]
        self.assertEqual(seen.headers["x-api-key"], KEY)
        self.assertEqual(seen.body["stream"], True)

    async def test_statuses(self) -> None:
        """
        5xx and 429 are transient (429's Retry-After kept); 401 is
        permanent and its message never quotes the key.
        """
        self.server.then(
            Script([b'{"error": {"message": "boom"}}'], status=500),
            Script([b"{}"], status=429, headers={"Retry-After": "7"}),
            Script([b"{}"], status=500, headers={"Retry-After": "9"}),
            Script(status=401, echo=lambda h: json.dumps(
                {"error": {"message": "Incorrect API key provided: " + h["authorization"],
                           "code": "invalid_api_key"}}).encode()),
        )
        responder = self.responder()
        error = await self.failure(self.ask(responder))
        self.assertEqual((error.transient, str(error)), (True, "API Error (500): boom"))
        error = await self.failure(self.ask(responder))
        self.assertEqual((error.transient, error.retryAfter), (True, 7.0))
        error = await self.failure(self.ask(responder))
        self.assertEqual((error.transient, error.retryAfter), (True, 9.0))
        error = await self.failure(self.ask(responder))
        self.assertFalse(error.transient)
        self.assertIn("API Error (invalid_api_key): Incorrect API key provided: Bearer ***", str(error))
        self.assertNotIn(KEY, str(error))

    async def test_unstreamed(self) -> None:
        """
        A server that ignores "stream" and sends one JSON answer is
        understood (both protocols); an error sent with a 200 is stored as
        an error.
        """
        json200 = {"Content-Type": "application/json"}
        self.server.then(
            Script([json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "Whole", "reasoning_content": "R"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}).encode()],
                headers=json200),
            Script([b'{"error": {"message": "quota", "code": "insufficient_quota"}}'], headers=json200),
            Script([json.dumps({"type": "message", "content": [
                {"type": "thinking", "thinking": "T"}, {"type": "text", "text": "Entier"}],
                "stop_reason": "end_turn", "usage": {"input_tokens": 4, "output_tokens": 5}}).encode()],
                headers=json200),
        )
        messages = await self.ask(self.responder())
        self.assertEqual((messages[0].content, messages[0].reasoning_content), ("Whole", "R"))
        self.assertEqual(messages[1].usage, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
        self.assertEqual(self.emitted, ["Whole"])
        error = await self.failure(self.ask(self.responder()))
        self.assertEqual((error.transient, str(error)), (False, "API Error (insufficient_quota): quota"))
        messages = await self.ask(self.responder("anthropic"))
        self.assertEqual((messages[0].content, messages[0].reasoning_content), ("Entier", "T"))
        self.assertEqual(messages[1].usage["total_tokens"], 9)  # type: ignore[index]

    async def test_errorMidStream(self) -> None:
        """
        An error event mid-stream is permanent; the partial answer is kept.
        """
        events = openaiStream()[:5] + [sse({"error": {"message": "overheated", "code": "x"}})]
        self.server.then(Script(pieces(events, 9), hold=True))
        error = await self.failure(self.ask(self.responder()))
        self.assertFalse(error.transient)
        self.assertEqual(str(error), "API Error (x): overheated")
        self.assertEqual(error.partial[0].content, "Héllo")
        await self.server.requests[0].closed
        # The text that came in the same read as the error is shown live.
        self.emitted.clear()
        self.server.then(Script([b"".join(events)], hold=True))
        error = await self.failure(self.ask(self.responder()))
        self.assertEqual((str(error), self.emitted), ("API Error (x): overheated", ["Héllo"]))

    async def test_dropped(self) -> None:
        """
        A connection dropped mid-stream is a truncated stream: permanent,
        partial kept, no completion record.
        """
        self.server.then(Script(pieces(openaiStream()[:5], 4), drop=True))
        error = await self.failure(self.ask(self.responder()))
        self.assertFalse(error.transient)
        self.assertEqual(
            str(error),
            "the model's stream ended before the answer did (the connection was closed)",
        )
        self.assertEqual([m.content for m in error.partial], ["Héllo"])

    async def test_droppedAfterTheFinishReason(self) -> None:
        """
        A connection dropped after the finish reason (before the usage and
        [DONE]) loses nothing of the answer: it is whole, not an error.
        """
        events = openaiStream()
        finish = next(i for i, e in enumerate(events) if b'"finish_reason": "stop"' in e)
        self.server.then(Script(pieces(events[: finish + 1], 4), drop=True))
        messages = await self.ask(self.responder())
        self.assertEqual(messages[0].content, "Héllo, wörld ✓")
        self.assertTrue(messages[-1].on_complete)

    async def test_redirectNotFollowed(self) -> None:
        """
        A redirect, to another server or the same one, is not followed:
        the key never reaches another server (Twisted would keep an
        x-api-key header there), and the error says what to do.
        """
        elsewhere = ModelServer()
        elsewhere.start(self)
        for protocol, status in (("anthropic", 303), ("openai", 307), ("anthropic", 308)):
            self.server.then(Script(status=status, headers={
                "Location": elsewhere.url + "/messages"}))
            error = await self.failure(self.ask(self.responder(protocol)))
            self.assertFalse(error.transient)
            self.assertEqual(
                str(error),
                f"API Error ({status}): the model server redirects to {elsewhere.url}/messages;"
                " chatweb follows no redirect (a key goes only to its own server): set the"
                " provider's base URL to where it should go",
            )
        self.assertEqual(elsewhere.requests, [])

    async def test_malformed(self) -> None:
        self.server.then(Script([b"data: {not json\n\n"], hold=True))
        error = await self.failure(self.ask(self.responder()))
        self.assertFalse(error.transient)
        self.assertIn("malformed", str(error))

    async def test_refused(self) -> None:
        port = self.server.port.getHost().port
        await self.server.port.stopListening()
        provider = Provider(name="x", protocol="openai", baseUrl=f"http://127.0.0.1:{port}/v1", model="m")
        error = await self.failure(ModelResponder([provider], reactor).respond(
            _session(Message(role="user", content="hi")), Message(role="user", content="hi")))
        self.assertTrue(error.transient)
        self.assertIn("could not reach", str(error))

    async def test_stall(self) -> None:
        """
        A stream that stops sending for the timeout (on the injected
        clock) fails, transient, and its connection is closed.
        """
        script = Script(openaiStream()[:6], hold=True, pauseAfter=5)
        self.server.then(script)
        d = self.ask(self.responder(timeout=30.0, clock=self.clock))
        while not self.emitted:
            await task.deferLater(reactor, 0.01, lambda: None)
        self.clock.advance(20)
        # Data arriving restarts the wait.
        script.resume.callback(None)
        while not self.server.requests[0].written.called or len(self.emitted) < 2:
            await task.deferLater(reactor, 0.01, lambda: None)
        self.clock.advance(29)
        self.assertFalse(d.called)
        self.clock.advance(1)
        error = await self.failure(d)
        self.assertTrue(error.transient)
        self.assertIn("stopped sending for 30 s", str(error))
        await self.server.requests[0].closed

    async def test_stop(self) -> None:
        """
        Cancelling closes the connection to the model and fails with the
        partial answer.
        """
        self.server.then(Script(pieces(openaiStream()[:5], 50), hold=True))
        d = self.ask(self.responder())
        while not self.emitted:
            await task.deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        try:
            await d
        except Stopped as stopped:
            self.assertEqual([m.content for m in stopped.partial], ["Héllo"])
        else:
            self.fail("not stopped")
        await self.server.requests[0].closed

    async def test_unknownProvider(self) -> None:
        responder = self.responder()
        session = Session(id="s", provider="nope", messages=(Message(role="user", content="x"),))
        error = await self.failure(responder.respond(session, session.messages[0]))
        self.assertFalse(error.transient)
        self.assertIn("no provider 'nope'", str(error))
        self.assertEqual(self.server.requests, [])


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class ServiceTests(TestCase):
    """
    The whole path through a real chatweb service: a posted message is
    answered by the local model server.
    """

    timeout = 30

    async def start(self, key: str | None = KEY, **kwargs: Any) -> Any:
        from chatweb.queue import RetryPolicy
        from chatweb.testing import startChatWeb

        self.server = ModelServer()
        self.server.start(self)
        provider = Provider(
            name="local", protocol="openai", baseUrl=self.server.url,
            model="test-model", key=None if key is None else Secret(key), timeout=30,
        )
        kwargs.setdefault("retry", RetryPolicy(initialDelay=0.05, jitter=0))
        self.chatweb = await startChatWeb(
            self, responder=ModelResponder([provider], reactor), **kwargs
        )
        return self.chatweb

    async def messages(self, session: str) -> list[dict[str, Any]]:
        response = await self.chatweb.get("/messages?session=" + session)
        if response.code == 404:
            return []
        self.assertEqual(response.code, 200)
        return list(json.loads(await response.content()))

    async def waitFor(self, session: str, test: Any) -> list[dict[str, Any]]:
        for _ in range(500):
            messages = await self.messages(session)
            if test(messages):
                return messages
            await _sleep(0.01)
        self.fail(f"never happened: {messages}")

    async def test_answered(self) -> None:
        """
        The answer streams into the events stream as it arrives, then is
        stored as chat.nvim stores it (assistant message with reasoning,
        then the on_complete record with usage), and shows in the preview.
        """
        from .test_live import openStream

        chatweb = await self.start()
        events: list[dict[str, Any]] = []

        def done(seen: list[dict[str, Any]]) -> bool:
            events[:] = seen
            return any(e["event"] == "delivery.done" for e in seen)

        _, reader = await openStream(chatweb, "/sessions/ci/events", done)
        self.assertEqual((await chatweb.post("ci", "hello")).code, 204)
        await reader.done
        kinds = [e["event"] for e in events]
        texts = [e["data"]["data"]["text"] for e in events if e["event"] == "delivery.text"]
        self.assertEqual(texts, ["Héllo", ", wörld ", "✓"])
        # The text streamed before the answer was stored.
        self.assertLess(kinds.index("delivery.text"), len(kinds) - 1 - kinds[::-1].index("message.added"))
        messages = await self.messages("ci")
        self.assertEqual([m.get("role") for m in messages], ["user", "assistant", None])
        self.assertEqual(messages[1]["content"], "Héllo, wörld ✓")
        self.assertEqual(messages[1]["reasoning_content"], "Thinking hard")
        self.assertEqual(messages[2]["on_complete"], True)
        self.assertEqual(messages[2]["usage"]["total_tokens"], 17)
        page = await (await chatweb.get("/session?id=ci")).text()
        self.assertIn("Héllo, wörld ✓", page)
        self.assertIn("Thinking hard", page)
        self.assertIn("<b>17</b>", page)

    async def test_backToBack(self) -> None:
        """
        Two messages posted at once: the second is sent only once the first
        answer is stored, with the first exchange as its history.
        """
        chatweb = await self.start()
        self.assertEqual((await chatweb.post("s", "one")).code, 204)
        self.assertEqual((await chatweb.post("s", "two")).code, 204)
        await self.waitFor("s", lambda ms: sum(1 for m in ms if m.get("on_complete")) == 2)
        self.assertEqual(len(self.server.requests), 2)
        self.assertEqual(
            self.server.requests[1].body["messages"],
            [
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "Héllo, wörld ✓"},
                {"role": "user", "content": "two"},
            ],
        )

    async def test_sessionChoosesProviderAndModel(self) -> None:
        """
        GET /providers lists the providers; a session's model (set at
        POST /session/new or by PUT) is the one asked; a provider that is
        not configured is refused with a 400 (as chat.nvim does), by PUT and
        by POST /session/new.
        """
        chatweb = await self.start()
        response = await chatweb.get("/providers")
        self.assertEqual(
            json.loads(await response.content()),
            [{"name": "local", "protocol": "openai", "models": ["test-model"]}],
        )
        created = await chatweb.client.post(
            chatweb.url + "/session/new", json={"model": "other-model"}, headers=chatweb.headers)
        sessionId = json.loads(await created.content())["id"]
        await chatweb.post(sessionId, "hi")
        await self.waitFor(sessionId, lambda ms: any(m.get("on_complete") for m in ms))
        self.assertEqual(self.server.requests[0].body["model"], "other-model")
        refused = "no provider 'elsewhere'; configured: local"
        put = await chatweb.client.put(
            chatweb.url + f"/session/{sessionId}/provider", json={"provider": "elsewhere"},
            headers=chatweb.headers)
        self.assertEqual((put.code, json.loads(await put.content())), (400, {"error": refused}))
        new = await chatweb.client.post(
            chatweb.url + "/session/new", json={"provider": "elsewhere"}, headers=chatweb.headers)
        self.assertEqual((new.code, json.loads(await new.content())), (400, {"error": refused}))
        put = await chatweb.client.put(
            chatweb.url + f"/session/{sessionId}/provider", json={"provider": "local"},
            headers=chatweb.headers)
        self.assertEqual(put.code, 204)
        detail = json.loads(await (await chatweb.get(f"/sessions/{sessionId}")).content())
        self.assertEqual(detail["provider"], "local")

    async def test_500ThenOK(self) -> None:
        """
        A 500 is retried: the message is answered once.
        """
        chatweb = await self.start()
        self.server.then(Script([b'{"error": {"message": "busy"}}'], status=500))
        await chatweb.post("s", "hi")
        messages = await self.waitFor("s", lambda ms: any(m.get("on_complete") for m in ms))
        await _sleep(0.2)
        messages = await self.messages("s")
        self.assertEqual([m.get("role") for m in messages], ["user", "assistant", None])
        self.assertEqual(len(self.server.requests), 2)

    async def test_askedAnswerIsAnError(self) -> None:
        """
        A client that asks (C{chatweb send --wait}) and gets chat.nvim's
        error record as the answer hears it as an error, not an empty
        answer; an attempt cut by a timeout and asked again does not count.
        """
        from chatweb.client import ChatWebError

        chatweb = await self.start()
        self.server.then(Script(status=401, echo=lambda h: json.dumps(
            {"error": {"message": "bad key", "code": "invalid_api_key"}}).encode()))
        with self.assertRaises(ChatWebError) as raised:
            await chatweb.api.ask("s", "hi")
        self.assertEqual(
            str(raised.exception),
            "message 1 was answered with an error: API Error (invalid_api_key): bad key",
        )
        answer = await chatweb.api.ask("s", "again")
        self.assertEqual(answer.texts, ("Héllo, wörld ✓",))

    async def test_permanentErrorStored(self) -> None:
        """
        A 401 is stored as chat.nvim's error record, not retried; the key
        appears in no message, page or log line even when the server
        quotes it.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        logged: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            logged.append(repr(event) + (formatEvent(event) or ""))

        globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, observer)  # type: ignore[arg-type]
        chatweb = await self.start()
        self.server.then(Script(status=401, echo=lambda h: json.dumps(
            {"error": {"message": "bad key " + h["authorization"], "code": "invalid_api_key"}}
        ).encode()))
        await chatweb.post("s", "hi")
        messages = await self.waitFor("s", lambda ms: any(m.get("error") for m in ms))
        self.assertEqual(messages[-1]["error"], "API Error (invalid_api_key): bad key Bearer ***")
        await _sleep(0.2)
        self.assertEqual(len(self.server.requests), 1)
        page = await (await chatweb.get("/session?id=s")).text()
        self.assertIn("bad key Bearer ***", page)
        # Said in the log as well, for an operator who reads no session.
        self.assertTrue(
            any("The model's answer to message 1 of session 's' is an error: API Error"
                " (invalid_api_key): bad key Bearer ***" in line for line in logged),
            logged,
        )
        everything = json.dumps(await self.messages("s")) + page + "".join(logged)
        everything += repr(chatweb.service.adapter.responder)
        self.assertNotIn(KEY, everything)
        self.assertEqual(self.server.requests[0].headers["authorization"], "Bearer " + KEY)

    async def test_stop(self) -> None:
        """
        POST /session/{id}/stop mid-stream closes the model's connection;
        the partial answer is kept, marked stopped; nothing is retried.
        """
        chatweb = await self.start()
        self.server.then(Script(pieces(openaiStream()[:5], 50), hold=True))
        await chatweb.post("s", "hi")
        while not self.server.requests or not self.server.requests[0].written.called:
            await _sleep(0.01)
        response = await chatweb.client.post(chatweb.url + "/session/s/stop", headers=chatweb.headers)
        self.assertEqual(response.code, 204)
        await self.server.requests[0].closed
        messages = await self.waitFor("s", lambda ms: any(m.get("error") for m in ms))
        self.assertEqual(messages[1]["content"], "Héllo")
        self.assertEqual(messages[1]["reasoning_content"], "Thinking hard")
        # chat.nvim's record of a request its HTTP API stopped.
        self.assertEqual(messages[2]["error"], "Request cancelled by user. Press r to retry.")
        await _sleep(0.3)
        self.assertEqual(len(self.server.requests), 1)
        self.assertEqual(len(await self.messages("s")), 3)

    async def test_timeoutKeepsThePartAndAsksAgain(self) -> None:
        """
        An answer cut by the delivery timeout keeps what arrived, marked as
        chat.nvim marks curl's timeout (not as a stop by the user), and the
        model is asked again.
        """
        chatweb = await self.start(deliveryTimeout=0.5)
        self.server.then(Script(pieces(openaiStream()[:5], 50), hold=True),
                         Script(pieces(openaiStream(), 7)))
        # A client that asks gets the answer of the attempt that was whole.
        answer = await chatweb.api.ask("s", "hi")
        self.assertEqual(answer.texts, ("Héllo, wörld ✓",))
        messages = await self.waitFor("s", lambda ms: any(m.get("on_complete") for m in ms))
        self.assertEqual(
            [(m.get("role"), m.get("content"), m.get("error")) for m in messages[:4]],
            [("user", "hi", None), ("assistant", "Héllo", None),
             (None, None, "Operation timeout. The server took too long to respond."),
             ("assistant", "Héllo, wörld ✓", None)])
        self.assertEqual(len(self.server.requests), 2)


class BackendTests(TestCase):
    """
    The default backend with a model responder, below the queue.
    """

    timeout = 20

    async def test_cancelledAnswerIsAskedAgain(self) -> None:
        """
        A cancelled answer (stopped, or cut by the delivery timeout) keeps
        its part, marked stopped, but does not count as the delivery's
        answer: delivered again (the queue's retry), it is asked again.
        """
        from twisted.internet.defer import CancelledError

        from chatweb.backends.local import SCHEMA, LocalBackend
        from chatweb.model import Delivery
        from chatweb.store import JOURNAL_SCHEMA, SQLiteDatabase

        db = SQLiteDatabase(os.path.abspath(self.mktemp()), reactor)
        self.addCleanup(db.close)
        await db.open(JOURNAL_SCHEMA + SCHEMA)
        server = ModelServer()
        server.start(self)
        server.then(Script(pieces(openaiStream()[:5], 50), hold=True))
        provider = Provider(name="p", protocol="openai", baseUrl=server.url, model="m")
        backend = LocalBackend(db, reactor, ModelResponder([provider], reactor))
        emitted: list[str] = []
        # Cut by chatweb stopping, as the queue says.
        delivery = Delivery(3, "s", "hi", 1.0, emit=emitted.append,
                            cancelReason=lambda: "shutdown")
        d = backend.deliver(delivery)
        while not emitted:
            await _sleep(0.01)
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertFalse(backend.isBusy("s"))
        await backend.deliver(delivery)
        session = await backend.getSession("s")
        assert session is not None
        self.assertEqual(
            [(m.role, m.content, m.error is not None) for m in session.messages],
            [("user", "hi", False), ("assistant", "Héllo", False), (None, None, True),
             ("assistant", "Héllo, wörld ✓", False), (None, None, False)],
        )
        self.assertEqual(session.messages[2].error,
                         "Request cancelled: chatweb stopped. It is asked again when"
                         " chatweb starts.")
        self.assertEqual(len(server.requests), 2)


class ProcessTests(TestCase):
    """
    The real C{twistd chatweb --responder openai}.
    """

    timeout = 90

    async def test_twistd(self) -> None:
        """
        Answers come from the model server; the key, taken from
        OPENAI_API_KEY, reaches the server and no line of the log, even
        when the server's error quotes it.
        """
        import treq

        from chatweb.testing import ChatWebProcess

        server = ModelServer()
        server.start(self)
        server.then(
            Script(status=401, echo=lambda h: json.dumps(
                {"error": {"message": "bad key " + h["authorization"]}}).encode()),
            Script(pieces(openaiStream(), 7)),
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OPENAI_API_KEY=KEY, PYTHONPATH=root)
        process = ChatWebProcess(
            os.path.abspath(self.mktemp()),
            # Every line that could carry the key: requests, and each message.
            args=["--responder", "openai", "--base-url", server.url, "--model", "m",
                  "--access-log", "--log-each-message"],
            env=env,
            testCase=self,
        )
        url = await process.start()
        headers = {"X-API-Key": process.apiKey}
        for content in ["one", "two"]:
            response = await treq.post(url + "/", json={"session": "s", "content": content},
                                       headers=headers, persistent=False)
            self.assertEqual(response.code, 204)
        for _ in range(500):
            response = await treq.get(url + "/messages?session=s", headers=headers, persistent=False)
            messages = json.loads(await response.content())
            if any(m.get("on_complete") for m in messages):
                break
            await _sleep(0.02)
        self.assertEqual(
            [m.get("role") or ("error" if "error" in m else "on_complete") for m in messages],
            ["user", "error", "user", "assistant", "on_complete"],
        )
        self.assertEqual(server.requests[0].headers["authorization"], "Bearer " + KEY)
        await process.stop()
        self.assertIn("bad key Bearer ***", json.dumps(messages))
        self.assertNotIn(KEY, process.output)
        self.assertIn("delivered", process.output)
