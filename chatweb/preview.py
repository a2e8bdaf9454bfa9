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
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import attrs
from jinja2 import Environment, PackageLoader, select_autoescape
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup
from pygments import highlight as pygmentize
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.lexers.data import JsonLexer
from pygments.util import ClassNotFound

from chatweb.model import FAILED, ROLES, Message, QueuedMessage, Session, Usage

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


def highlightCode(code: str, language: str = "") -> Markup:
    """
    C{code} as a highlighted, scrollable block; plain (escaped) when the
    language is unknown.  Long lines scroll inside the block, never the page.
    """
    language = language.strip().lower()
    if not _LANGUAGE.fullmatch(language):
        language = ""
    lexer = _lexer(language) if language else None
    body = pygmentize(code, lexer, _formatter) if lexer else html.escape(code)
    label = (
        f'<div class="code-lang">{html.escape(language)}</div>' if language else ""
    )
    return Markup(
        f'<div class="code">{label}<pre class="highlight"><code>{body}</code></pre></div>'
    )


# -- Markdown


def _fence(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    info = token.info.strip().split(maxsplit=1)
    return highlightCode(token.content, info[0] if info else "") + "\n"


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
    return md


_markdown = _makeMarkdown()


def renderMarkdown(text: str) -> Markup:
    """
    Message content as HTML: CommonMark with tables and strikethrough, raw
    HTML shown as text, fenced code highlighted.
    """
    return Markup(_markdown.render(text))


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


def _prettyArguments(arguments: Any) -> Markup:
    """
    Tool-call arguments pretty-printed (and highlighted) when they are JSON,
    shown raw otherwise.
    """
    if arguments is None:
        arguments = ""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return highlightCode(arguments)
    try:
        text = json.dumps(arguments, indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return highlightCode(str(arguments))
    return Markup(
        '<div class="code"><pre class="highlight"><code>'
        + pygmentize(text, _jsonLexer, _formatter)
        + "</code></pre></div>"
    )


_jsonLexer = JsonLexer(stripnl=False, ensurenl=False)


def _toolOutput(content: str) -> Markup:
    """
    A tool's result is program output, not Markdown: shown as is, JSON
    pretty-printed.
    """
    stripped = content.strip()
    if stripped[:1] in ("{", "["):
        try:
            return _prettyArguments(json.loads(stripped))
        except ValueError:
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


def _messageViews(messages: Sequence[Message]) -> list[MessageView]:
    views: list[MessageView] = []
    calls: dict[str, ToolCallView] = {}
    for index, message in enumerate(messages):
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


def _sessionUsage(session: Session) -> UsageView | None:
    # The sum over the messages; chat.nvim's session-level usage otherwise.
    return UsageView.of(session.totalUsage()) or UsageView.of(
        Usage.fromDict(session.usage)
    )


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
    loader=PackageLoader("chatweb", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.globals["pygmentsCss"] = Markup(PYGMENTS_CSS)


def renderSession(session: Session, queued: Sequence[QueuedMessage] = ()) -> str:
    """
    The page for C{session}; C{queued} lists messages not yet delivered,
    shown after the others.
    """
    return _environment.get_template("session.html").render(
        session=session,
        usage=_sessionUsage(session),
        messages=_messageViews(session.messages),
        queued=_queuedViews(queued),
    )


def renderSessionInThread(
    session: Session, queued: Sequence[QueuedMessage] = ()
) -> Deferred[str]:
    """
    L{renderSession} on the reactor's thread pool.  Rendering is pure CPU
    work that grows with the session (about a third of a millisecond per
    message: see bench/render.py), too long for the reactor thread once a
    session has thousands of messages.
    """
    return deferToThread(renderSession, session, tuple(queued))


def renderIndex(sessionIds: Sequence[str], links: Mapping[str, str]) -> str:
    """
    A page listing C{sessionIds}, each linking to C{links[id]} (a session
    without a usable link is listed without one).
    """
    entries = [
        (sessionId, _safeHref(links[sessionId]) if sessionId in links else None)
        for sessionId in sessionIds
    ]
    return _environment.get_template("index.html").render(entries=entries)
