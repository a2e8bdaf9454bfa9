"""
Responders that ask a model server, streaming its answer over treq: the
OpenAI chat-completions protocol (OpenAI, Ollama, llama.cpp's server, vLLM,
...) and Anthropic's Messages API.

Failures are sorted for the queue: a L{ModelError} that is C{transient}
(refused connection, timeout, stall, 429, 5xx) fails the delivery, and the
queue retries it; a permanent one (400, 401, 403, 404, a malformed or cut
stream) is stored in the session as chat.nvim stores errors, and the queue
moves on.  Cancelling an answer (C{POST /session/{id}/stop}) closes the
connection to the model and fails with L{Stopped}, carrying the partial
answer.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from chatweb.backends._history import DEFAULT_BUDGET, anthropicMessages, openaiMessages
from chatweb.backends._providers import Provider
from chatweb._sse import SSEDecoder, SSEError, SSEvent
from chatweb.interfaces import IResponder
from chatweb._httpclient import quietPool
from chatweb.limits import parseRetryAfter
from chatweb.model._values import Message, Session

_log = Logger()

#: The most of an error response's (or an unstreamed answer's) body read.
MAX_ERROR_BODY = 1024 * 1024


class ModelError(Exception):
    """
    The model did not answer.  C{transient}: worth retrying (the delivery
    fails and the queue retries, after C{retryAfter} seconds at least if
    set); else the error is stored in the session with the C{partial}
    answer.
    """

    def __init__(
        self,
        message: str,
        transient: bool,
        retryAfter: float | None = None,
        partial: list[Message] | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retryAfter = retryAfter
        self.partial = partial or []


class Stopped(CancelledError):
    """
    The answer was cancelled; C{partial} is what had arrived.
    """

    def __init__(self, partial: list[Message]) -> None:
        super().__init__("stopped")
        self.partial = partial


@attrs.define
class Answer:
    """
    A streamed answer as it is assembled.
    """

    content: list[str] = attrs.field(factory=list)
    reasoning: list[str] = attrs.field(factory=list)
    #: Tool calls by their stream index, as chat.nvim assembles them.
    toolCalls: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    finishReason: str | None = None
    usage: dict[str, Any] | None = None
    #: The stream said it is over ([DONE], message_stop).
    done: bool = False

    def addToolCall(self, index: int, delta: dict[str, Any]) -> None:
        call = self.toolCalls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if isinstance(delta.get("id"), str) and delta["id"]:
            call["id"] = delta["id"]
        function = delta.get("function")
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                call["function"]["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                call["function"]["arguments"] += function["arguments"]

    def messages(self, now: float, complete: bool) -> list[Message]:
        """
        What to store: the assistant message (if anything arrived), then,
        if C{complete}, chat.nvim's C{{on_complete, usage, created}}.
        """
        out: list[Message] = []
        content = "".join(self.content)
        reasoning = "".join(self.reasoning)
        calls = [self.toolCalls[i] for i in sorted(self.toolCalls)]
        if content or reasoning or calls:
            out.append(
                Message(
                    role="assistant",
                    content=content or None,
                    reasoning_content=reasoning or None,
                    tool_calls=calls or None,
                    created=int(now),
                )
            )
        if complete:
            out.append(Message(on_complete=True, usage=self.usage, created=int(now)))
        return out


def _json(event: SSEvent) -> Any:
    try:
        return json.loads(event.data)
    except ValueError:
        raise ModelError(f"the model sent malformed JSON: {event.data[:200]!r}", False) from None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class OpenAIProtocol:
    """
    Chat completions, streamed (C{stream: true}, usage included).
    """

    name = "openai"

    def request(
        self, provider: Provider, model: str, session: Session, budget: int
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if provider.key is not None:
            headers["Authorization"] = "Bearer " + provider.key.reveal()
        body = {
            "model": model,
            "messages": openaiMessages(session, provider.systemPrompt, budget),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return provider.baseUrl + "/chat/completions", headers, body

    def whole(self, answer: Answer, data: dict[str, Any]) -> None:
        _openaiWhole(answer, data)

    def event(self, answer: Answer, event: SSEvent) -> str | None:
        """
        Take one event into C{answer}; the content text it adds, if any.
        """
        if event.data.strip() == "[DONE]":
            answer.done = True
            return None
        chunk = _json(event)
        if not isinstance(chunk, dict):
            raise ModelError("the model sent a chunk that is not an object", False)
        if isinstance(chunk.get("error"), dict):
            raise ModelError(_apiError(chunk["error"], "stream"), False)
        if isinstance(chunk.get("usage"), dict):
            answer.usage = chunk["usage"]
        text = None
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    for call in calls:
                        if isinstance(call, dict):
                            index = call.get("index", 0)
                            answer.addToolCall(index if isinstance(index, int) else 0, call)
                reasoning = _text(delta.get("reasoning_content")) or _text(
                    delta.get("reasoning")
                )
                if reasoning:
                    answer.reasoning.append(reasoning)
                text = _text(delta.get("content"))
                if text:
                    answer.content.append(text)
            if isinstance(choice.get("finish_reason"), str):
                answer.finishReason = choice["finish_reason"]
        return text


def _openaiWhole(answer: Answer, data: dict[str, Any]) -> None:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ModelError("the model's answer has no choices", False)
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ModelError("the model's answer has no message", False)
    if _text(message.get("content")):
        answer.content.append(message["content"])
    reasoning = _text(message.get("reasoning_content")) or _text(message.get("reasoning"))
    if reasoning:
        answer.reasoning.append(reasoning)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for i, call in enumerate(calls):
            if isinstance(call, dict):
                answer.addToolCall(i, call)
    if isinstance(data.get("usage"), dict):
        answer.usage = data["usage"]
    answer.finishReason = choices[0].get("finish_reason") or "stop"
    answer.done = True


class AnthropicProtocol:
    """
    Anthropic's Messages API, streamed.
    """

    name = "anthropic"
    version = "2023-06-01"

    def request(
        self, provider: Provider, model: str, session: Session, budget: int
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "anthropic-version": self.version,
        }
        if provider.key is not None:
            headers["x-api-key"] = provider.key.reveal()
        system, messages = anthropicMessages(session, provider.systemPrompt, budget)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": provider.maxTokens,
            "messages": messages,
            "stream": True,
        }
        if system:
            body["system"] = system
        return provider.baseUrl + "/messages", headers, body

    def whole(self, answer: Answer, data: dict[str, Any]) -> None:
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise ModelError("the model's answer has no content", False)
        for index, block in enumerate(blocks):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and _text(block.get("text")):
                answer.content.append(block["text"])
            elif block.get("type") == "thinking" and _text(block.get("thinking")):
                answer.reasoning.append(block["thinking"])
            elif block.get("type") == "tool_use":
                answer.addToolCall(index, {
                    "id": block.get("id"),
                    "function": {
                        "name": block.get("name", ""),
                        "arguments": json.dumps(block.get("input", {})),
                    },
                })
        if isinstance(data.get("usage"), dict):
            self._usage(answer, data["usage"])
        answer.finishReason = data.get("stop_reason") or "stop"
        answer.done = True

    def event(self, answer: Answer, event: SSEvent) -> str | None:
        chunk = _json(event)
        if not isinstance(chunk, dict):
            raise ModelError("the model sent an event that is not an object", False)
        kind = chunk.get("type", event.event)
        if kind == "error":
            error: dict[str, Any] = chunk["error"] if isinstance(chunk.get("error"), dict) else {}
            transient = error.get("type") == "overloaded_error"
            raise ModelError(_apiError(error, "stream"), transient)
        if kind == "message_start":
            usage = (chunk.get("message") or {}).get("usage")
            if isinstance(usage, dict):
                self._usage(answer, usage)
        elif kind == "content_block_start":
            block = chunk.get("content_block") or {}
            if block.get("type") == "tool_use":
                answer.addToolCall(
                    chunk.get("index", 0),
                    {"id": block.get("id"), "function": {"name": block.get("name", "")}},
                )
        elif kind == "content_block_delta":
            delta = chunk.get("delta") or {}
            if delta.get("type") == "text_delta" and _text(delta.get("text")):
                answer.content.append(delta["text"])
                return str(delta["text"])
            if delta.get("type") == "thinking_delta" and _text(delta.get("thinking")):
                answer.reasoning.append(delta["thinking"])
            if delta.get("type") == "input_json_delta" and isinstance(
                delta.get("partial_json"), str
            ):
                answer.addToolCall(
                    chunk.get("index", 0), {"function": {"arguments": delta["partial_json"]}}
                )
        elif kind == "message_delta":
            delta = chunk.get("delta") or {}
            if isinstance(delta.get("stop_reason"), str):
                answer.finishReason = delta["stop_reason"]
            if isinstance(chunk.get("usage"), dict):
                self._usage(answer, chunk["usage"])
        elif kind == "message_stop":
            answer.done = True
            answer.finishReason = answer.finishReason or "stop"
        return None

    def _usage(self, answer: Answer, usage: dict[str, Any]) -> None:
        # Normalised to OpenAI's names, as chat.nvim does; cached input too.
        old = answer.usage or {}

        def count(key: str, oldKey: str) -> int:
            value = usage.get(key)
            return value if isinstance(value, int) else int(old.get(oldKey, 0))

        prompt = count("input_tokens", "prompt_tokens")
        completion = count("output_tokens", "completion_tokens")
        cached = usage.get("cache_read_input_tokens")
        if not isinstance(cached, int):
            cached = (old.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        answer.usage = {
            "total_tokens": prompt + completion,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


PROTOCOL_CLASSES: dict[str, Any] = {"openai": OpenAIProtocol, "anthropic": AnthropicProtocol}


def _apiError(error: Any, code: Any) -> str:
    """
    chat.nvim's form of an API error: C{API Error (CODE): MESSAGE}.
    """
    if not isinstance(error, dict):
        return f"API Error ({code}): {str(error)[:500]}"
    message = error.get("message") or "Unknown error"
    code = error.get("code") or error.get("type") or code
    return f"API Error ({code}): {str(message)[:500]}"


#: Statuses worth retrying; any other error status is permanent.
TRANSIENT_STATUSES = {408, 409, 425, 429}


class _Body(Protocol):
    def __init__(self, call: _Call, streaming: bool) -> None:
        self.call = call
        self.streaming = streaming
        self.received: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.call._bytesArrived(self, data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.call._bodyEnded(self, reason)


class _Call:
    """
    One request to a model: its answer, its timer, its connection.
    """

    def __init__(
        self,
        responder: ModelResponder,
        protocol: Any,
        provider: Provider,
        emit: Callable[[str], Any] | None,
    ) -> None:
        self._responder = responder
        self._clock = responder.clock
        self._protocol = protocol
        self._provider = provider
        self._emit = emit
        self._decoder = SSEDecoder()
        self.answer = Answer()
        self.result: Deferred[list[Message]] = Deferred(self._cancel)
        self._timer: IDelayedCall | None = None
        self._request: Deferred[Any] | None = None
        self._body: _Body | None = None
        self._response: Any = None
        self._finished = False

    # -- the request

    def start(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        self._arm()
        # No redirect is followed: a key goes only to the server it was
        # configured for (Twisted would keep an x-api-key header on the way
        # to another origin).
        d = self._responder.client.post(
            url, data=json.dumps(body).encode("utf-8"), headers=headers, allow_redirects=False
        )
        self._request = d
        d.addCallbacks(self._gotResponse, self._requestFailed)

    def _arm(self) -> None:
        self._disarm()
        self._timer = self._clock.callLater(self._provider.timeout, self._timedOut)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        what = "stopped sending" if self._body is not None else "did not answer"
        self._fail(
            ModelError(
                f"the model {what} for {self._provider.timeout:g} s", transient=True
            )
        )

    def _gotResponse(self, response: Any) -> None:
        self._request = None
        if self._finished:
            response.deliverBody(_Discard())
            return
        self._response = response
        self._arm()
        contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        # A server that ignores "stream" answers with one JSON document.
        streaming = response.code == 200 and not contentType.lower().startswith(
            b"application/json"
        )
        self._body = _Body(self, streaming=streaming)
        response.deliverBody(self._body)

    def _requestFailed(self, failure: Failure) -> None:
        self._request = None
        if self._finished:
            return
        self._fail(
            ModelError(
                f"could not reach the model at {self._provider.baseUrl}:"
                f" {failure.getErrorMessage() or failure.type.__name__}",
                transient=True,
            )
        )

    # -- the body

    def _bytesArrived(self, body: _Body, data: bytes) -> None:
        if self._finished:
            return
        self._arm()
        if not body.streaming:
            if body.size < MAX_ERROR_BODY:
                body.received.append(data[: MAX_ERROR_BODY - body.size])
            body.size += len(data)
            return
        # The text of one read is emitted at once: a server sends a token
        # an event, and each emitted piece is an event of chatweb's log.
        texts: list[str] = []
        try:
            for event in self._decoder.feed(data):
                text = self._protocol.event(self.answer, event)
                if text:
                    texts.append(text)
        except SSEError as e:
            self._emitAll(texts)
            self._fail(ModelError(f"the model sent a malformed stream: {e}", False))
            return
        except ModelError as e:
            self._emitAll(texts)
            self._fail(e)
            return
        self._emitAll(texts)

    def _emitAll(self, texts: list[str]) -> None:
        if texts and self._emit is not None:
            self._emit("".join(texts))

    def _bodyEnded(self, body: _Body, reason: Failure) -> None:
        if self._finished:
            return
        if not body.streaming:
            if self._response.code == 200 and body.size <= MAX_ERROR_BODY:
                self._whole(b"".join(body.received))
            else:
                self._fail(self._statusError(b"".join(body.received)))
            return
        # An answer whose finish reason came is whole, even if the
        # connection then broke before the end of the stream ([DONE], or
        # the usage that follows the finish reason).
        if self.answer.done or (
            self.answer.finishReason is not None and not self._decoder.pending
        ):
            self._succeed()
            return
        if reason.check(ResponseDone, PotentialDataLoss, ResponseFailed):
            # (ResponseFailed's own text is a list of Failures' reprs.)
            why = "the connection was closed"
        else:
            why = reason.getErrorMessage() or "the connection was closed"
        self._fail(
            ModelError(f"the model's stream ended before the answer did ({why})", False)
        )

    def _whole(self, body: bytes) -> None:
        """
        An answer sent as one JSON document (the server ignored "stream"),
        or an error sent with a 200 (as some providers do).
        """
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._fail(ModelError("the model sent a malformed answer", False))
            return
        if data.get("error") is not None:
            self._fail(ModelError(_apiError(data["error"], 200), False))
            return
        if "code" in data and "msg" in data:
            self._fail(ModelError(f"API Error ({data['code']}): {data['msg']}", False))
            return
        try:
            self._protocol.whole(self.answer, data)
        except ModelError as e:
            self._fail(e)
            return
        text = "".join(self.answer.content)
        if text and self._emit is not None:
            self._emit(text)
        self._succeed()

    def _statusError(self, body: bytes) -> ModelError:
        code = self._response.code
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        if 300 <= code < 400:
            location = (self._response.headers.getRawHeaders(b"location") or [b""])[0]
            target = location.decode("utf-8", "replace")[:300] or "nowhere"
            return ModelError(
                f"API Error ({code}): the model server redirects to {target}; chatweb"
                " follows no redirect (a key goes only to its own server): set the"
                " provider's base URL to where it should go",
                False,
            )
        if error is None:
            text = body.decode("utf-8", "replace").strip()[:500]
            message = f"API Error ({code}): {text or 'HTTP ' + str(code)}"
        else:
            message = _apiError(error, code)
        # (Anthropic's 529, overloaded, is one of the 5xx.)
        transient = code in TRANSIENT_STATUSES or code >= 500
        after = None
        if transient:
            values = self._response.headers.getRawHeaders(b"retry-after") or [None]
            after = parseRetryAfter(values[0], self._clock.seconds())
        return ModelError(message, transient, retryAfter=after)

    # -- ending

    def _succeed(self) -> None:
        self._finished = True
        self._disarm()
        self.result.callback(self.answer.messages(self._clock.seconds(), True))

    def _fail(self, error: ModelError) -> None:
        self._finished = True
        self._disarm()
        self._abort()
        error.partial = self.answer.messages(self._clock.seconds(), False)
        error.args = (self._responder.scrub(str(error)),)
        self.result.errback(Failure(error))

    def _abort(self) -> None:
        """
        Close the connection to the model, whatever state it is in.
        """
        if self._request is not None:
            request, self._request = self._request, None
            request.cancel()
        transport: Any = self._body.transport if self._body is not None else None
        if transport is not None:
            # The response body's producer: stopping it closes the
            # connection.
            transport.stopProducing()

    def _cancel(self, d: Deferred[list[Message]]) -> None:
        if self._finished:
            return
        self._finished = True
        self._disarm()
        self._abort()
        d.errback(Failure(Stopped(self.answer.messages(self._clock.seconds(), False))))


class _Discard(Protocol):
    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        pass


@implementer(IResponder)
class ModelResponder:
    """
    Answer with a model: the session's C{provider} (one of C{providers},
    else the default one) and C{model} (else the provider's) choose which;
    the answer streams through C{emit} as it arrives.

    @ivar clock: times the request and the stream (no byte for a provider's
        timeout is a failure).
    """

    answers = True
    streams = True

    def __init__(
        self,
        providers: list[Provider],
        reactor: Any,
        default: str | None = None,
        clock: IReactorTime | None = None,
        historyBudget: int = DEFAULT_BUDGET,
        client: Any = None,
    ) -> None:
        if not providers:
            raise ValueError("no providers")
        self._providers = {p.name: p for p in providers}
        self._default = default if default is not None else providers[0].name
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.historyBudget = historyBudget
        if client is None:
            import treq.client

            client = treq.client.HTTPClient(
                Agent(reactor, pool=quietPool(reactor, persistent=False))
            )
        self.client = client
        self._secrets = [p.key.reveal() for p in providers if p.key is not None]

    @property
    def name(self) -> str:
        return self._providers[self._default].protocol

    def __repr__(self) -> str:
        return f"<ModelResponder providers={sorted(self._providers)!r}>"

    def providers(self) -> list[dict[str, Any]]:
        """
        What C{GET /providers} lists: each provider, the default first.
        """
        ordered = [self._providers[self._default]] + [
            p for n, p in self._providers.items() if n != self._default
        ]
        return [p.listing() for p in ordered]

    def providerProblem(self, name: str) -> str | None:
        """
        What is wrong with C{name} as a session's provider, or None: it
        must be one of the configured providers.
        """
        if name in self._providers:
            return None
        return f"no provider {name!r}; configured: {', '.join(sorted(self._providers))}"

    def scrub(self, text: str) -> str:
        """
        C{text} with every configured key replaced: error messages may
        quote what the server was sent.
        """
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def respond(
        self,
        session: Session,
        message: Message,
        emit: Callable[[str], Any] | None = None,
    ) -> Deferred[list[Message]]:
        name = session.provider or self._default
        problem = self.providerProblem(name)
        if problem is not None:
            return fail(ModelError(problem, transient=False))
        provider = self._providers[name]
        model = session.model or provider.model
        if not model:
            return fail(
                ModelError(
                    f"no model chosen: set the session's model or the provider"
                    f" {provider.name!r}'s model",
                    transient=False,
                )
            )
        protocol = PROTOCOL_CLASSES[provider.protocol]()
        url, headers, body = protocol.request(provider, model, session, self.historyBudget)
        call = _Call(self, protocol, provider, emit)
        call.start(url, headers, body)
        return call.result
