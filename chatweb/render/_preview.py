"""
The HTML preview of a session, and the index of sessions.

Each page is self-contained (inline CSS, no scripts, nothing loaded from
elsewhere) so that it passes the strict Content-Security-Policy below and
can be saved as one file.  Nothing from a session is ever live markup:
Jinja2 autoescapes every value, and message content goes through
markdown-it-py with raw HTML off and its default link validation (no
C{javascript:}, C{vbscript:}, C{file:} or non-image C{data:} links).
"""

from __future__ import annotations

import datetime
import functools
import html
import json
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import attrs
from jinja2 import Environment, PackageLoader, select_autoescape
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.lexers.data import JsonLexer
from pygments.util import ClassNotFound

from chatweb._priority import asWorker
from chatweb.model._values import (
    FAILED,
    ROLES,
    Message,
    QueuedMessage,
    Session,
    SessionPage,
    Usage,
)

#: Headers of every HTML page: no scripts, nothing loaded from elsewhere.
SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}

# -- code highlighting

_PYGMENTS_STYLE = "github-dark"
_formatter = HtmlFormatter(nowrap=True)
#: Pygments' token colours, inlined in every page (no stylesheet to fetch).
PYGMENTS_CSS = HtmlFormatter(style=_PYGMENTS_STYLE).get_style_defs(".highlight")
_LANGUAGE = re.compile(r"[A-Za-z0-9_+#.-]{1,40}")


@functools.lru_cache(maxsize=128)
def _lexer(language: str) -> Lexer | None:
    # Looking a lexer up by name walks Pygments' whole registry: cache it.
    try:
        return get_lexer_by_name(language, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


#: Characters of code above which a block is not highlighted at all.
MAX_HIGHLIGHT = 50_000
#: Seconds of CPU that the highlighting and Markdown of one message may
#: take; past it, the message (or code block) is shown as plain text.  Many
#: Pygments lexers, and markdown-it on some inputs, take time that grows with
#: the square of the input (bench/render.py): a work budget bounds
#: them all, where an allow-list of "linear" lexers would hold almost none.
MESSAGE_BUDGET = 0.1
#: The CPU clock of the current thread (patched by tests).
_cpuTime: Callable[[], float] = time.thread_time
#: Per thread: the markdown-it instance, and the deadline of the message
#: being rendered.
_local = threading.local()


#: On a background thread, seconds of work between pauses, and the pause.
PAUSE_EVERY = 0.002
PAUSE_FOR = 0.0002


def pause() -> None:
    """
    On a thread running L{inBackground}, let the other threads (the
    reactor's) take the GIL every L{PAUSE_EVERY} seconds of work: a thread
    that computes without pause makes the reactor wait up to the
    interpreter's switch interval (5 ms) at every step of every request.
    Does nothing on other threads.
    """
    last: float | None = getattr(_local, "lastPause", None)
    if last is None:
        return
    now = time.perf_counter()
    if now - last > PAUSE_EVERY:
        time.sleep(PAUSE_FOR)
        _local.lastPause = time.perf_counter()


def inBackground(work: Callable[..., Any], *args: Any) -> Any:
    """
    C{work(*args)}, pausing (L{pause}) to let the reactor's thread run: for
    work on a thread of its own.
    """
    asWorker()
    _local.lastPause = time.perf_counter()
    try:
        return work(*args)
    finally:
        _local.lastPause = None


class _OverBudget(Exception):
    """
    The message's rendering took more than its budget.
    """


class _NotInline(Exception):
    """
    The page is taking longer than L{renderSessionInline} allows.
    """


def _deadline() -> float:
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        deadline = _cpuTime() + MESSAGE_BUDGET
    inline: float | None = getattr(_local, "inlineDeadline", None)
    return deadline if inline is None else min(deadline, inline)


def _overBudget() -> None:
    """
    Raise L{_NotInline} if the budget of an inline page is what ran out.
    """
    inline: float | None = getattr(_local, "inlineDeadline", None)
    if inline is not None and _cpuTime() > inline:
        raise _NotInline()


def _highlighted(code: str, lexer: Lexer, deadline: float) -> str:
    """
    C{code} highlighted by C{lexer}.

    @raise _OverBudget: if the CPU clock passes C{deadline} first.
    """
    tokens = []
    for n, token in enumerate(lexer.get_tokens(code)):
        tokens.append(token)
        # Some lexers take a millisecond per token on hostile input.
        if not n & 7:
            pause()
            if _cpuTime() > deadline:
                raise _OverBudget()
    if _cpuTime() > deadline:
        raise _OverBudget()
    output = _Output()
    _formatter.format(tokens, output)
    return str(output)


class _Output(list[str]):
    """
    A file-like sink for the formatter that gives back what was written.
    """

    def write(self, text: str) -> None:
        self.append(text)

    def __str__(self) -> str:
        return "".join(self)


def highlightCode(code: str, language: str = "", lexer: Lexer | None = None) -> Markup:
    """
    C{code} as a highlighted, scrollable block; plain (escaped) when the
    language is unknown, the code longer than L{MAX_HIGHLIGHT}, or its
    highlighting over the message's budget (L{MESSAGE_BUDGET}).  Long lines
    scroll inside the block, never the page.
    """
    language = language.strip().lower()
    if not _LANGUAGE.fullmatch(language):
        language = ""
    if lexer is None and language:
        lexer = _lexer(language)
    body = None
    if lexer is not None and len(code) <= MAX_HIGHLIGHT:
        try:
            body = _highlighted(code, lexer, _deadline())
        except _OverBudget:
            _overBudget()
    label = (
        f'<div class="code-lang">{html.escape(language)}</div>' if language else ""
    )
    classes = "code" if body is not None or lexer is None else "code plain"
    if body is None:
        body = html.escape(code)
    return Markup(
        f'<div class="{classes}">{label}<pre class="highlight"><code>{body}</code></pre></div>'
    )


# -- Markdown


def _fence(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    info = token.info.strip().split(maxsplit=1)
    return highlightCode(token.content, info[0] if info else "") + "\n"


def _budgeted(rule: Callable[..., Any]) -> Callable[..., Any]:
    """
    C{rule}, raising L{_OverBudget} once the message's deadline has passed
    (markdown-it calls its rules about once per special character, so the
    clock is read every 64 calls).
    """
    calls = [0]

    def checked(*args: Any) -> Any:
        calls[0] += 1
        if not calls[0] & 63:
            pause()
            deadline = getattr(_local, "deadline", None)
            if deadline is not None and _cpuTime() > deadline:
                raise _OverBudget()
        return rule(*args)

    return checked


def _tableOpen(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    # A wide table scrolls inside its own box, not the page.
    return '<div class="table-wrap">' + self.renderToken(tokens, idx, options, env)


def _tableClose(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    return self.renderToken(tokens, idx, options, env) + "</div>"


def _linkOpen(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    tokens[idx].attrSet("rel", "nofollow noopener noreferrer")
    return self.renderToken(tokens, idx, options, env)


def _image(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    # The page loads nothing from elsewhere: an image becomes a link to it
    # (its URL already passed markdown-it's link validation).
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env) or "image"
    src = html.escape(str(token.attrGet("src") or ""))
    return (
        f'<a class="image" href="{src}" rel="nofollow noopener noreferrer">'
        f"image: {html.escape(alt)}</a>"
    )


def _makeMarkdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    md.add_render_rule("fence", _fence)
    md.add_render_rule("code_block", _fence)
    md.add_render_rule("table_open", _tableOpen)
    md.add_render_rule("table_close", _tableClose)
    md.add_render_rule("link_open", _linkOpen)
    md.add_render_rule("image", _image)
    for ruler in (md.block.ruler, md.inline.ruler):
        for rule in ruler.__rules__:
            rule.fn = _budgeted(rule.fn)
        ruler.__cache__ = None
    return md


def _markdown() -> MarkdownIt:
    """
    This thread's markdown-it: an instance builds its rule caches lazily,
    so one shared by threads gives wrong output.
    """
    md: MarkdownIt | None = getattr(_local, "markdown", None)
    if md is None:
        md = _local.markdown = _makeMarkdown()
    return md


#: Characters of a message above which it is shown as plain text, not
#: Markdown (bench/render.py measures the cost of both).
MAX_MARKDOWN = 100_000


def plainText(text: str) -> Markup:
    """
    C{text} shown as it is: escaped, preformatted, wrapped.
    """
    return Markup('<pre class="plain">' + html.escape(text) + "</pre>")


class _FragmentCache:
    """
    Rendered fragments by what they were rendered from, least recently used
    dropped first, at most C{maxCharacters} of source and HTML in all;
    shared by threads.
    """

    def __init__(self, maxCharacters: int) -> None:
        self._maxCharacters = maxCharacters
        self._items: OrderedDict[tuple[str, str], Markup] = OrderedDict()
        self._characters = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Markup | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: Markup) -> None:
        size = len(key[1]) + len(value)
        if size > self._maxCharacters // 8:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._characters -= len(key[1]) + len(old)
            self._items[key] = value
            self._characters += size
            while self._characters > self._maxCharacters:
                oldKey, oldValue = self._items.popitem(last=False)
                self._characters -= len(oldKey[1]) + len(oldValue)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._characters = 0


#: Fragments already rendered: a page viewed again (or the next page of a
#: session) costs little.
fragments = _FragmentCache(8_000_000)


def _cached(kind: str, text: str, render: Callable[[str], Markup]) -> Markup:
    """
    C{render(text)}, from L{fragments} when it was rendered before, within
    the budget of one message (L{MESSAGE_BUDGET}), as plain text when it
    cannot be rendered otherwise.
    """
    pause()
    key = (kind, text)
    fragment = fragments.get(key)
    if fragment is not None:
        return fragment
    outer = getattr(_local, "deadline", None)
    _local.deadline = _deadline()
    try:
        fragment = render(text)
    except (_OverBudget, RecursionError):
        _overBudget()
        fragment = plainText(text)
    finally:
        _local.deadline = outer
    fragments.put(key, fragment)
    return fragment


def _renderMarkdown(text: str) -> Markup:
    if len(text) > MAX_MARKDOWN:
        return plainText(text)
    return Markup(_markdown().render(text))


def renderMarkdown(text: str) -> Markup:
    """
    Message content as HTML: CommonMark with tables and strikethrough, raw
    HTML shown as text, fenced code highlighted.  Content longer than
    L{MAX_MARKDOWN}, or that takes longer than L{MESSAGE_BUDGET} to render,
    is shown as plain text.
    """
    return _cached("markdown", text, _renderMarkdown)


# -- values shown on the page


def _utc(value: Any) -> datetime.datetime | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def _timestamp(value: Any) -> str:
    when = _utc(value)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else ""


def _isoTimestamp(value: Any) -> str:
    when = _utc(value)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else ""


def _prettyJSON(value: Any) -> Markup:
    # RecursionError: nested too deep for json (or repr) to walk.
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        try:
            return highlightCode(str(value))
        except RecursionError:
            return highlightCode("(too deeply nested to show)")
    return highlightCode(text, lexer=_jsonLexer)


def _prettyText(text: str) -> Markup:
    """
    Text pretty-printed (and highlighted) when it is JSON, shown raw
    otherwise.
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return highlightCode(text)
    return _prettyJSON(value)


def _prettyArguments(arguments: Any) -> Markup:
    """
    Tool-call arguments pretty-printed (and highlighted) when they are JSON,
    shown raw otherwise.
    """
    if arguments is None:
        arguments = ""
    if isinstance(arguments, str):
        return _cached("arguments", arguments, _prettyText)
    return _prettyJSON(arguments)


_jsonLexer = JsonLexer(stripnl=False, ensurenl=False)


def _toolOutput(content: str) -> Markup:
    """
    A tool's result is program output, not Markdown: shown as is, JSON
    pretty-printed.
    """
    return _cached("tool", content, _renderToolOutput)


def _renderToolOutput(content: str) -> Markup:
    stripped = content.strip()
    if stripped[:1] in ("{", "["):
        try:
            return _prettyJSON(json.loads(stripped))
        except (ValueError, RecursionError):
            pass
    return highlightCode(content)


@attrs.frozen
class UsageView:
    """
    Token counts as shown: cached tokens also as a share of the prompt.
    """

    total: int
    prompt: int
    completion: int
    cached: int

    @property
    def cachedPercent(self) -> int | None:
        if not self.prompt:
            return None
        return min(100, self.cached * 100 // self.prompt)

    @classmethod
    def of(cls, usage: Usage | None) -> UsageView | None:
        if usage is None or not (
            usage.total_tokens or usage.prompt_tokens or usage.completion_tokens
        ):
            return None
        total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        return cls(total, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)


@attrs.frozen
class ToolCallView:
    name: str
    callId: str | None
    anchor: str
    arguments: Markup


@attrs.frozen
class MessageView:
    """
    One message, prepared for the template.
    """

    #: C{None} for chat.nvim's role-less records (completed, error).
    role: str | None
    roleClass: str
    created: str
    createdIso: str
    content: Markup | None
    reasoning: Markup | None
    toolCalls: list[ToolCallView]
    resultOf: ToolCallView | None
    toolCallId: str | None
    toolName: str | None
    toolError: str | None
    error: str | None
    usage: UsageView | None
    queued: str | None = None
    #: chat.nvim's C{on_complete} mark: shown as a "Completed" line with
    #: C{usage} in chat.nvim's form.
    completed: bool = False


def _toolCalls(message: Message, index: int) -> list[ToolCallView]:
    views = []
    for n, call in enumerate(message.tool_calls or ()):
        if not isinstance(call, Mapping):
            continue
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        name = function.get("name")
        callId = call.get("id")
        views.append(
            ToolCallView(
                name=name if isinstance(name, str) and name else "(unnamed tool)",
                callId=callId if isinstance(callId, str) else None,
                anchor=f"m{index}-call{n}",
                arguments=_prettyArguments(function.get("arguments")),
            )
        )
    return views


def _messageViews(messages: Sequence[Message], first: int = 0) -> list[MessageView]:
    views: list[MessageView] = []
    calls: dict[str, ToolCallView] = {}
    for index, message in enumerate(messages, first):
        toolCalls = _toolCalls(message, index)
        for call in toolCalls:
            if call.callId is not None:
                calls[call.callId] = call
        state = message.tool_call_state or {}
        toolName = state.get("name")
        toolError = state.get("error")
        isTool = message.role == "tool"
        content = None
        if message.content:
            content = (
                _toolOutput(message.content) if isTool else renderMarkdown(message.content)
            )
        views.append(
            MessageView(
                role=message.role,
                roleClass=(
                    message.role
                    if message.role in ROLES
                    else "record" if message.role is None else "other"
                ),
                created=_timestamp(message.created),
                createdIso=_isoTimestamp(message.created),
                content=content,
                reasoning=(
                    renderMarkdown(message.reasoning_content)
                    if message.reasoning_content
                    else None
                ),
                toolCalls=toolCalls,
                resultOf=calls.get(message.tool_call_id or ""),
                toolCallId=message.tool_call_id,
                toolName=toolName if isinstance(toolName, str) else None,
                toolError=str(toolError) if toolError not in (None, "", False) else None,
                error=message.error or None,
                usage=UsageView.of(message.tokenUsage),
                completed=message.on_complete is True,
            )
        )
    return views


def _queuedViews(queued: Sequence[QueuedMessage]) -> list[MessageView]:
    return [
        MessageView(
            role="user",
            roleClass="user",
            created=_timestamp(item.received),
            createdIso=_isoTimestamp(item.received),
            content=renderMarkdown(item.content) if item.content else None,
            reasoning=None,
            toolCalls=[],
            resultOf=None,
            toolCallId=None,
            toolName=None,
            toolError=None,
            error=(item.lastError or "delivery failed") if item.state == FAILED else None,
            usage=None,
            queued="failed" if item.state == FAILED else "queued",
        )
        for item in queued
    ]


def _sessionUsage(page: SessionPage) -> UsageView | None:
    # The sum over the messages; chat.nvim's session-level usage otherwise.
    return UsageView.of(page.usage) or UsageView.of(Usage.fromDict(page.session.usage))


def _safeHref(url: str) -> str | None:
    """
    Only links to this server or over http(s): never a script URL.
    """
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return None
    return url if scheme in ("", "http", "https") else None


# -- pages

_environment = Environment(
    loader=PackageLoader("chatweb.render", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,
)
_environment.globals["pygmentsCss"] = Markup(PYGMENTS_CSS)


def _pauseInTemplate() -> str:
    pause()
    return ""


_environment.globals["pause"] = _pauseInTemplate


#: Messages on one page of a session, at most.
PAGE_MESSAGES = 100
#: Characters of message text on one page, at most (past it, a page holds
#: fewer messages, and at least one).
PAGE_CHARACTERS = 1_000_000


def messageSize(message: Message) -> int:
    """
    About how many characters C{message} puts on a page.
    """
    size = len(message.content or "") + len(message.reasoning_content or "")
    for call in message.tool_calls or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        arguments = function.get("arguments") if isinstance(function, Mapping) else None
        size += len(arguments) if isinstance(arguments, str) else 100
    return size


def pageBounds(messages: Sequence[Message], before: int | None) -> tuple[int, int]:
    """
    The page of C{messages} that ends before index C{before} (the newest
    page when None): the indexes of its first message and one past its
    last.  A page holds at most L{PAGE_MESSAGES} messages and
    L{PAGE_CHARACTERS} characters (but at least one message).
    """
    end = len(messages) if before is None else max(0, min(before, len(messages)))
    start, size = end, 0
    while start > 0 and end - start < PAGE_MESSAGES:
        size += messageSize(messages[start - 1])
        if size > PAGE_CHARACTERS and start < end:
            break
        start -= 1
    return start, end


def _laterEnd(messages: Sequence[Message], start: int) -> int:
    # The end of the page that starts at start: the "later" link.
    end, size = start, 0
    while end < len(messages) and end - start < PAGE_MESSAGES:
        size += messageSize(messages[end])
        if size > PAGE_CHARACTERS and end > start:
            break
        end += 1
    return end


class _Window(Sequence[Message]):
    """
    The messages of a L{SessionPage} by their index in the whole session:
    as long as the session, though only the page's part can be read.
    """

    def __init__(self, page: SessionPage) -> None:
        self._messages = page.session.messages
        self._first = page.first
        self._total = page.total

    def __len__(self) -> int:
        return self._total

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._total)
            return tuple(self[n] for n in range(start, stop, step))
        at = index - self._first
        if not 0 <= at < len(self._messages):
            raise IndexError(f"message {index} is not on this page")
        return self._messages[at]


@attrs.frozen
class PageView:
    """
    Which messages a page shows, and the links to the pages around it.
    """

    start: int
    end: int
    total: int
    earlier: str | None
    later: str | None
    newest: str | None


def renderSession(
    session: Session | SessionPage,
    queued: Sequence[QueuedMessage] = (),
    before: int | None = None,
    pageURL: Callable[[int | None], str] | None = None,
) -> str:
    """
    The page for C{session} (or the part of it a L{SessionPage} holds,
    which must include the page's messages and those of the next page);
    C{queued} lists messages not yet delivered, shown after the others.

    With C{pageURL}, the page holds only the messages before index
    C{before} that fit on a page (L{pageBounds}; the newest when C{before}
    is None), and links to the pages around it: C{pageURL(n)} is the URL of
    the page that ends before index n, C{pageURL(None)} the newest.  The
    queued messages are shown on the newest page only.
    """
    part = session if isinstance(session, SessionPage) else SessionPage.whole(session)
    messages: Sequence[Message] = part.session.messages
    first = part.first
    page = None
    if pageURL is not None:
        messages = _Window(part)
        start, end = pageBounds(messages, before)
        newest = end >= len(messages)
        page = PageView(
            start=start,
            end=end,
            total=len(messages),
            earlier=pageURL(start) if start > 0 else None,
            later=None if newest else pageURL(_laterEnd(messages, end)),
            newest=None if newest else pageURL(None),
        )
        messages, first = messages[start:end], start
        if not newest:
            queued = ()
    return _environment.get_template("session.html").render(
        session=part.session,
        total=part.total,
        usage=_sessionUsage(part),
        messages=_messageViews(messages, first),
        queued=_queuedViews(queued),
        page=page if page and (page.earlier or page.later) else None,
    )


#: Seconds of CPU a page may take on the reactor's thread (see
#: L{renderSessionInline}).
INLINE_BUDGET = 0.005


def renderSessionInline(
    session: Session | SessionPage,
    queued: Sequence[QueuedMessage] = (),
    before: int | None = None,
    pageURL: Callable[[int | None], str] | None = None,
) -> str | None:
    """
    L{renderSession}, or None if its fragments take more than
    L{INLINE_BUDGET} seconds of CPU (what was rendered so far is kept in
    L{fragments}): for the reactor's thread, which renders small pages
    itself and hands the others to a thread.
    """
    _local.inlineDeadline = _cpuTime() + INLINE_BUDGET
    try:
        return renderSession(session, queued, before, pageURL)
    except _NotInline:
        return None
    finally:
        _local.inlineDeadline = None


def renderIndex(sessionIds: Sequence[str], links: Mapping[str, str]) -> str:
    """
    A page listing C{sessionIds}, each linking to C{links[id]} (a session
    without a usable link is listed without one).
    """
    entries = []
    for n, sessionId in enumerate(sessionIds):
        if not n & 63:
            pause()
        entries.append(
            (sessionId, _safeHref(links[sessionId]) if sessionId in links else None)
        )
    return _environment.get_template("index.html").render(entries=entries)
