"""
The session page and the index, as HTML: every feature of the page is there
for the fixture sessions, and nothing from a session is ever live markup.
"""

from __future__ import annotations

import html
import json
import os
import re
import threading
from html.parser import HTMLParser

from markupsafe import Markup

from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.importer import readSessionFile
from chatweb.model import FAILED, Message, QueuedMessage, Session
from chatweb.render import _preview as preview
from chatweb.web._pages import renderSessionInThread
from chatweb.render._preview import (
    PYGMENTS_CSS,
    SECURITY_HEADERS,
    highlightCode,
    renderIndex,
    renderMarkdown,
    renderSession,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture(name: str) -> Session:
    return readSessionFile(os.path.join(FIXTURES, name))


class Element:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Element | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [
            e for e in self.iter()
            if e is not self and (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
        ]

    def ancestors(self):
        node = self.parent
        while node is not None:
            yield node
            node = node.parent


VOID = {"meta", "br", "hr", "img", "input", "link"}


class Tree(HTMLParser):
    """
    The page as the browser's parser sees it (tags, attributes, text).
    """

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Element("#document", {}, None)
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs), self.current)
        self.current.children.append(element)
        if tag not in VOID:
            self.current = element

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse(page: str) -> Element:
    return Tree(page).root


#: Every element the page is made of: the template's, and what Markdown
#: makes.  Anything else was injected from a session.
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "header", "p", "h1",
    "ul", "li", "b", "dl", "dt", "dd", "pre", "article", "div", "span", "time",
    "details", "summary", "code", "a",
}
MARKDOWN_TAGS = {
    "strong", "em", "table", "thead", "tbody", "tr", "th", "td", "ol", "blockquote",
    "hr", "br", "h2", "h3", "h4", "h5", "h6", "s",
}
PAGE_ATTRIBUTES = {"lang", "charset", "name", "content", "class", "id", "href",
                   "rel", "datetime", "style"}


_C0_AND_SPACE = "".join(map(chr, range(0x21)))


def schemeOf(href: str) -> str | None:
    """
    The scheme a browser sees in C{href}: it drops tabs and newlines and
    leading spaces and control characters first.
    """
    cleaned = re.sub(r"[\t\n\r]", "", href).lstrip(_C0_AND_SPACE)
    match = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*):", cleaned)
    return match.group(1).lower() if match else None


def messagesOf(tree: Element) -> list[Element]:
    return tree.find("article", "message")


class HostileContentTests(SynchronousTestCase):
    """
    Script tags, attribute breakouts, script links and markup in every field
    of a session: all shown as text, none of it live.
    """

    def setUp(self) -> None:
        self.session = fixture("hostile.json")
        self.page = renderSession(self.session)
        self.tree = parse(self.page)

    def test_noElementFromTheSession(self) -> None:
        tags = {e.tag for e in self.tree.iter()} - {"#document"}
        self.assertEqual(tags - PAGE_TAGS - MARKDOWN_TAGS, set())
        self.assertNotIn("<script", self.page.lower())
        self.assertEqual(len(self.tree.find("style")), 1)
        self.assertEqual([e.parent.tag for e in self.tree.find("style")], ["head"])

    def test_noEventHandlersOrUnknownAttributes(self) -> None:
        for element in self.tree.iter():
            for name in element.attrs:
                self.assertFalse(name.startswith("on"), (element.tag, element.attrs))
                self.assertIn(name, PAGE_ATTRIBUTES, (element.tag, element.attrs))
        for element in self.tree.iter():
            self.assertNotIn("style", element.attrs)

    def test_noScriptLinks(self) -> None:
        hrefs = [e.attrs["href"] for e in self.tree.find("a")]
        for href in hrefs:
            self.assertTrue(href.startswith("#") or schemeOf(href) in ("http", "https"), href)
        # The one safe link of the message stays a link, and cannot break out.
        self.assertIn('https://example.com/%22onmouseover=%22alert(1)', hrefs)

    def test_hostileTextShownAsText(self) -> None:
        """
        What the session holds is what the reader sees, character for
        character: escaped, not dropped.
        """
        text = self.tree.text()
        for shown in [
            self.session.id,
            self.session.model,
            self.session.cwd,
            self.session.prompt,
            "<script>alert('content')</script>",
            "<img src=x onerror=alert(2)>",
            "[click me](javascript:alert('link'))",
            "<a href=\"javascript:alert(3)\">raw anchor</a>",
            "</code></pre><script>alert('fence')</script>",
            "<script>alert('toolerror')</script>",
            "<iframe srcdoc=\"<script>alert('error')</script>\"></iframe>",
            "not json <script>alert('raw')</script>",
            "<img src=x onerror=alert('fn')>",
        ]:
            self.assertIn(shown, text)
        title = self.tree.find("title")[0].text()
        self.assertIn(self.session.title, title)

    def test_roleCannotBreakOut(self) -> None:
        first = messagesOf(self.tree)[0]
        self.assertIn("other", first.classes)
        badge = first.find("span", "badge")[0]
        self.assertEqual(badge.text(), 'user" onclick="alert(1)')

    def test_reasoningStaysClosed(self) -> None:
        [details] = self.tree.find("details")
        self.assertNotIn("open", details.attrs)
        self.assertIn("<details open>", details.text())


class SessionPageTests(SynchronousTestCase):
    """
    The features of the page, on a realistic session with tool calls.
    """

    def setUp(self) -> None:
        self.session = fixture("tools-and-reasoning.json")
        self.tree = parse(renderSession(self.session))
        self.messages = messagesOf(self.tree)

    def metadata(self) -> dict[str, Element]:
        dl = self.tree.find("dl", "meta")[0]
        terms = dl.find("dt")
        values = dl.find("dd")
        return {t.text(): v for t, v in zip(terms, values)}

    def test_metadata(self) -> None:
        meta = self.metadata()
        self.assertEqual(meta["ID"].text(), "2024-05-20-14-03-11")
        self.assertEqual(meta["Provider"].text(), "deepseek")
        self.assertEqual(meta["Model"].text(), "deepseek-reasoner")
        self.assertEqual(meta["Directory"].text(), "/home/dev/src/inventory-service")
        [prompt] = meta["System prompt"].find("pre", "prompt")
        self.assertEqual(prompt.text(), self.session.prompt)
        self.assertEqual(
            self.tree.find("h1")[0].text(), "Fix the pagination bug in api/items.py"
        )

    def test_everyMessageHasRoleBadgeAndTime(self) -> None:
        self.assertEqual(len(self.messages), len(self.session.messages))
        for article, message in zip(self.messages, self.session.messages):
            if message.role is None:
                # chat.nvim's completion and error records have no role.
                self.assertEqual(article.find("span", "badge"), [])
                self.assertIn("record", article.classes)
            else:
                [badge] = article.find("span", "badge")
                self.assertEqual(badge.text(), message.role)
                self.assertIn(message.role, badge.classes)
                self.assertIn(message.role, article.classes)
            [time] = article.find("time")
            self.assertRegex(time.text(), r"^2024-05-20 14:\d\d:\d\d UTC$")
        self.assertEqual(self.messages[0].find("time")[0].text(), "2024-05-20 14:03:11 UTC")

    def test_toolCallArgumentsPrettyPrinted(self) -> None:
        [call] = self.messages[1].find("div", "tool-call")
        self.assertEqual(call.find("span", "name")[0].text(), "read_file")
        self.assertIn("call_01HZX3K9", call.text())
        arguments = call.find("pre")[0].text()
        self.assertEqual(
            json.loads(arguments),
            {"path": "api/items.py", "line_start": 1, "line_to": 80},
        )
        self.assertIn('\n  "path": "api/items.py",\n', arguments)

    def test_toolCallArgumentsNotJSONShownRaw(self) -> None:
        [call] = self.messages[4].find("div", "tool-call")
        self.assertEqual(call.find("pre")[0].text(), "pattern=decode( path=api/ --regex")

    def test_toolResultLinksToItsCall(self) -> None:
        result = self.messages[3]
        self.assertIn("tool", result.classes)
        self.assertIn("read_file", result.find("span", "tool-name")[0].text())
        [link] = [a for a in result.find("a") if a.text() == "call_01HZX3K9"]
        target = link.attrs["href"][1:]
        [call] = [e for e in self.tree.iter() if e.attrs.get("id") == target]
        self.assertIn(call, self.messages[1].find("div", "tool-call"))
        self.assertIn("def list_items(db, cursor=None, limit=50):", result.text())

    def test_toolErrorSetApart(self) -> None:
        failed = self.messages[6]
        [error] = failed.find("div", "tool-error")
        self.assertIn("Tool error", error.text())
        self.assertIn("search_text", error.text())
        self.assertIn("failed to decode arguments.", error.text())
        # Only the failed tool result has one.
        self.assertEqual(len(self.tree.find("div", "tool-error")), 1)

    def test_reasoningCollapsedByDefault(self) -> None:
        details = self.tree.find("details", "reasoning")
        self.assertEqual(len(details), 2)
        for d in details:
            self.assertNotIn("open", d.attrs)
            self.assertEqual(d.find("summary")[0].text(), "Thinking")
        self.assertIn("Likely the cursor is computed", details[0].text())

    def test_errorRecordsInErrorBoxes(self) -> None:
        """
        chat.nvim's role-less C{{error, created}} records (a timeout with
        its retry, a cancellation) each show in an error box.
        """
        timeout, cancelled = self.messages[10], self.messages[11]
        [error] = timeout.find("div", "error")
        self.assertIn(
            "Operation timeout. The server took too long to respond.\n"
            "Auto-retry 1/3 (2 remaining).",
            error.find("pre")[0].text(),
        )
        self.assertIn("Press r to retry", cancelled.find("div", "error")[0].text())
        self.assertEqual(timeout.find("time")[0].text(), "2024-05-20 14:08:12 UTC")
        self.assertEqual(len(self.tree.find("div", "error")), 2)

    def test_completedLineWithUsage(self) -> None:
        """
        chat.nvim's C{{on_complete, usage}} record after each answer: a
        "Completed" line with the usage as chat.nvim's preview words it.
        """
        completed = self.messages[2]
        self.assertEqual(completed.find("span", "completed")[0].text(), "Completed")
        usage = " ".join(completed.find("div", "usage")[0].text().split())
        # 1792 of 2310 prompt tokens came from the cache.
        self.assertEqual(usage, "Tokens: 2452 (2310↑/142↓)Cached: 1792 tokens (77%)")
        self.assertEqual(
            [n for n, m in enumerate(self.messages) if m.find("span", "completed")],
            [2, 5, 8],
        )
        for n in (0, 1, 3, 4, 6, 7, 9, 10, 11):
            self.assertEqual(self.messages[n].find("div", "usage"), [])

    def test_sessionTotalInHeader(self) -> None:
        [total] = self.tree.find("li", "session-usage")
        text = " ".join(total.text().split())
        self.assertEqual(
            text,
            "9,131 tokens · prompt 8,023 · completion 1,108 · cached 6,912 (86%)",
        )
        self.assertIn(total, list(self.tree.find("header")[0].iter()))

    def test_markdown(self) -> None:
        answer = self.messages[7]
        [table] = answer.find("table")
        self.assertEqual([th.text() for th in table.find("th")], ["line", "problem", "effect"])
        self.assertEqual(len(table.find("tr")), 3)
        self.assertIn("table-wrap", table.parent.classes)
        self.assertEqual(len(answer.find("ol")[0].find("li")), 5)
        self.assertEqual([s.text() for s in answer.find("strong")][:1], ["two"])
        self.assertEqual(len(answer.find("blockquote")), 1)
        self.assertIn("pytest tests/test_items.py -q", [c.text() for c in answer.find("code")])

    def test_fencedCodeHighlighted(self) -> None:
        answer = self.messages[7]
        [pre] = answer.find("pre", "highlight")
        self.assertEqual(pre.parent.find("div", "code-lang")[0].text(), "python")
        keywords = {s.text() for s in pre.find("span", "k")}
        self.assertIn("def", keywords)
        self.assertIn("if", keywords)
        self.assertIn("batch[-1].id", pre.text())
        # The long line is kept whole: it scrolls inside the block.
        self.assertTrue(any(len(line) > 250 for line in pre.text().split("\n")))
        style = self.tree.find("style")[0].text()
        self.assertIn(".highlight .k {", style)
        self.assertIn(PYGMENTS_CSS.splitlines()[-1], style)

    def test_selfContained(self) -> None:
        for element in self.tree.iter():
            self.assertNotIn(element.tag, ("script", "link", "img", "iframe"))
            self.assertNotIn("src", element.attrs)
        style = self.tree.find("style")[0].text()
        self.assertNotIn("@import", style)
        self.assertNotIn("url(", style)
        self.assertIn(b"default-src 'none'", SECURITY_HEADERS[b"Content-Security-Policy"])


class MarkdownTests(SynchronousTestCase):
    def render(self, content: str, role: str = "assistant") -> Element:
        session = Session(id="s", messages=(Message(role=role, content=content, created=1.0),))
        return messagesOf(parse(renderSession(session)))[0].find("div", "content")[0]

    def test_rawHtmlIsText(self) -> None:
        content = self.render("<b>bold?</b> <div>x</div>")
        self.assertEqual(content.find("b"), [])
        self.assertEqual(content.find("div"), [])
        self.assertIn("<b>bold?</b>", content.text())

    def test_unsafeLinkSchemesAreNotLinks(self) -> None:
        for link in [
            "[a](javascript:alert(1))",
            "[a](JaVaScRiPt:alert(1))",
            "[a](  javascript:alert(1))",
            "[a](java&#x09;script:alert(1))",
            "[a](vbscript:msgbox)",
            "[a](data:text/html,<script>alert(1)</script>)",
            "[a](file:///etc/passwd)",
            "<javascript:alert(1)>",
            "[a][r]\n\n[r]: javascript:alert(1)",
            "![a](javascript:alert(1))",
        ]:
            content = self.render(link)
            for a in content.find("a"):
                self.assertIn(schemeOf(a.attrs["href"]), (None, "http", "https"), link)

    def test_safeLinksAreLinks(self) -> None:
        content = self.render("see [docs](https://example.com/a?b=1&c=2) and <https://example.org>")
        links = content.find("a")
        self.assertEqual(
            [(a.attrs["href"], a.text()) for a in links],
            [("https://example.com/a?b=1&c=2", "docs"), ("https://example.org", "https://example.org")],
        )
        for a in links:
            self.assertIn("noopener", a.attrs["rel"])

    def test_imagesAreNeverLoaded(self) -> None:
        content = self.render("![a cat](https://example.com/cat.png)")
        self.assertEqual(content.find("img"), [])
        [a] = content.find("a")
        self.assertEqual(a.attrs["href"], "https://example.com/cat.png")
        self.assertIn("a cat", a.text())

    def test_listsAndLineBreaks(self) -> None:
        content = self.render("- one\n- two\n\n1. first\n2. second\n\nline one\nline two")
        self.assertEqual([li.text() for li in content.find("ul")[0].find("li")], ["one", "two"])
        self.assertEqual([li.text() for li in content.find("ol")[0].find("li")], ["first", "second"])
        self.assertEqual(len(content.find("br")), 1)

    def test_unknownLanguageIsPlainCode(self) -> None:
        content = self.render("```no-such-language\na < b && c\n```")
        [pre] = content.find("pre")
        self.assertEqual(pre.text(), "a < b && c\n")
        self.assertEqual(pre.find("span"), [])

    def test_toolOutputIsNotMarkdown(self) -> None:
        """
        A tool's output is shown as it came: no Markdown emphasis, no
        headings made of comment lines.
        """
        content = self.render("# not a heading\n*stars*", role="tool")
        self.assertEqual(content.find("h1") + content.find("em"), [])
        self.assertEqual(content.find("pre")[0].text(), "# not a heading\n*stars*")


class OtherSessionTests(SynchronousTestCase):
    def test_cjkText(self) -> None:
        session = fixture("cjk-markdown.json")
        tree = parse(renderSession(session))
        text = tree.text()
        self.assertIn("请比较一下 Python 和 Go 在并发方面的区别，用表格表示。", text)
        self.assertIn("你是一个乐于助人的助手。", tree.find("pre", "prompt")[0].text())
        [table] = tree.find("table")
        self.assertEqual([th.text() for th in table.find("th")], ["方面", "Python", "Go"])
        self.assertIn("// 每个任务结果翻倍", text)
        # No cache hit: the cached share is not shown for that answer.
        first = messagesOf(tree)[2].find("div", "usage")[0].text()
        self.assertNotIn("Cached", first)
        second = messagesOf(tree)[5].find("div", "usage")[0].text()
        self.assertIn("Cached: 768 tokens (92%)", second)

    def test_oldFormSession(self) -> None:
        session = fixture("2024-01-15-10-30-00.json")
        tree = parse(renderSession(session))
        self.assertEqual(tree.find("h1")[0].text(), "2024-01-15-10-30-00")
        self.assertEqual(len(messagesOf(tree)), 4)
        # No cached-token detail at all: no share shown.
        self.assertNotIn("cached", tree.find("li", "session-usage")[0].text())
        self.assertIn("Tokens: 72 (58↑/14↓)", messagesOf(tree)[2].text())
        self.assertEqual(len(messagesOf(tree)[3].find("br")), 1)

    def test_emptySession(self) -> None:
        tree = parse(renderSession(Session(id="new")))
        self.assertEqual(messagesOf(tree), [])
        self.assertIn("No messages yet.", tree.text())
        self.assertEqual(tree.find("li", "session-usage"), [])

    def test_queuedShownLastAndMarked(self) -> None:
        session = fixture("2024-01-15-10-30-00.json")
        queued = [
            QueuedMessage(1, session.id, "waiting *here*", 1705315000.0),
            QueuedMessage(2, session.id, "given up", 1705315001.0, state=FAILED,
                          attempts=10, lastError="backend unreachable"),
        ]
        tree = parse(renderSession(session, queued))
        articles = messagesOf(tree)
        self.assertEqual(len(articles), 6)
        self.assertEqual([("queued" in a.classes) for a in articles],
                         [False, False, False, False, True, True])
        waiting, failed = articles[4], articles[5]
        self.assertEqual(waiting.find("span", "tag")[0].text(), "queued")
        self.assertEqual(waiting.find("em")[0].text(), "here")
        self.assertEqual(failed.find("span", "tag")[0].text(), "failed")
        self.assertIn("backend unreachable", failed.find("div", "error")[0].text())
        self.assertIn("2 queued", tree.find("ul", "stats")[0].text())

    def test_sessionUsageUsedWhenMessagesHaveNone(self) -> None:
        session = Session(
            id="s",
            messages=(Message(role="user", content="hi"),),
            usage={"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                   "prompt_tokens_details": {"cached_tokens": 50}},
        )
        tree = parse(renderSession(session))
        text = " ".join(tree.find("li", "session-usage")[0].text().split())
        self.assertEqual(text, "120 tokens · prompt 100 · completion 20 · cached 50 (50%)")


class RecordTests(SynchronousTestCase):
    """
    chat.nvim's role-less records: C{{on_complete, usage, created}} shown as
    a "Completed" line, C{{error, created}} in an error box.
    """

    def test_errorsAndRetries(self) -> None:
        session = fixture("errors-and-retries.json")
        articles = messagesOf(parse(renderSession(session)))
        self.assertEqual(len(articles), len(session.messages))
        kinds = [
            "error" if a.find("div", "error") else
            "completed" if a.find("span", "completed") else
            a.find("span", "badge")[0].text()
            for a in articles
        ]
        self.assertEqual(kinds, ["user", "error", "error", "assistant", "completed", "user",
                                 "error", "assistant", "completed", "user", "error"])
        self.assertIn("Rate limit reached for gpt-4o-mini", articles[1].text())
        self.assertIn("Auto-retry 1/3 (2 remaining).", articles[2].text())
        usage = " ".join(articles[4].find("div", "usage")[0].text().split())
        self.assertEqual(usage, "Tokens: 1889 (1832↑/57↓)Cached: 1664 tokens (90%)")
        # A completion without usage (the tool-call parsing failure): the line alone.
        self.assertEqual(articles[8].find("div", "usage"), [])
        for n in (1, 2, 4, 6, 8, 10):
            self.assertEqual(articles[n].find("span", "badge"), [], n)
            self.assertIn("record", articles[n].classes)

    def test_usageOfUnexpectedTypes(self) -> None:
        session = Session.fromDict({"id": "s", "messages": [
            {"on_complete": True, "usage": {"total_tokens": "<b>1</b>", "prompt_tokens": -5}},
            {"on_complete": True, "usage": "lots"},
        ]})
        for article in messagesOf(parse(renderSession(session))):
            self.assertEqual(article.find("span", "completed")[0].text(), "Completed")
            self.assertEqual(article.find("div", "usage"), [])


class IndexTests(SynchronousTestCase):
    def test_sessionsLinkToTheirPages(self) -> None:
        ids = ["ci", 'b"><script>x</script>', "日本"]
        links = {
            "ci": "/session?id=ci&token=abc",
            ids[1]: "/session?id=b%22%3E%3Cscript%3Ex%3C%2Fscript%3E",
            "日本": "/session?id=%E6%97%A5%E6%9C%AC",
        }
        page = renderIndex(ids, links)
        tree = parse(page)
        self.assertNotIn("<script", page)
        anchors = [(a.attrs["href"], a.text()) for a in tree.find("ul", "sessions")[0].find("a")]
        self.assertEqual(anchors, [(links[i], i) for i in ids])

    def test_unsafeOrMissingLinksAreNotLinks(self) -> None:
        tree = parse(renderIndex(["a", "b", "c"], {"a": "javascript:alert(1)", "b": "/ok"}))
        items = tree.find("ul", "sessions")[0].find("li")
        self.assertEqual([li.text() for li in items], ["a", "b", "c"])
        self.assertEqual([a.attrs["href"] for a in tree.find("a")], ["/ok"])

    def test_empty(self) -> None:
        tree = parse(renderIndex([], {}))
        self.assertIn("No sessions yet.", tree.text())


class ThreadTests(TestCase):
    async def test_renderInThreadIsTheSamePage(self) -> None:
        session = fixture("tools-and-reasoning.json")
        queued = [QueuedMessage(1, session.id, "later", 1.0)]
        page = await renderSessionInThread(session, queued)
        self.assertEqual(page, renderSession(session, queued))


class BoundedCostTests(SynchronousTestCase):
    """
    Inputs that take time growing with the square of their length (some
    Pygments lexers, markdown-it on some text) are cut off by a CPU budget
    per message, and shown as plain text past it.
    """

    def setUp(self) -> None:
        self.patch(preview, "fragments", preview._FragmentCache(1_000_000))

    def test_quadraticLexersFallBackToPlainText(self) -> None:
        # Each took seconds (autoit: 21 s) before the budget.
        for language, code in [
            ("autoit", " " * 8000 + "x\n"),
            ("gherkin", " " * 8000 + "x\n"),
            ("typescript", "a." * 4000 + "\n"),
            ("javascript", '"\\' * 3000 + "\n"),
        ]:
            page = str(renderMarkdown(f"```{language}\n{code}```"))
            self.assertIn('<div class="code plain">', page, language)
            self.assertIn(html.escape(code.strip()), page, language)

    def test_budgetPassedMeansPlainText(self) -> None:
        """
        Highlighting stops when the thread's CPU clock passes the budget.
        """
        now = [0.0]

        def clock() -> float:
            now[0] += 0.01  # every reading: a hundredth of the budget
            return now[0]

        self.patch(preview, "_cpuTime", clock)
        self.patch(preview, "MESSAGE_BUDGET", 1.0)
        small = str(highlightCode("x = 1\n" * 10, "python"))
        self.assertIn("code", small)
        self.assertNotIn("code plain", small)
        self.assertIn('<span class="n">x</span>', small)
        # 8 tokens per reading of the clock: over 100 readings is past it.
        large = str(highlightCode("x = 1\n" * 2000, "python"))
        self.assertIn('<div class="code plain">', large)
        self.assertNotIn("<span", large)

    def test_inlinePageGivesUpPastItsBudget(self) -> None:
        """
        A page rendered on the reactor's thread gives up (for a thread to
        render it) past its small budget, and caches no plain-text stand-in.
        """
        now = [0.0]
        me = threading.get_ident()
        advancing = [True]

        def clock() -> float:
            # Only this thread's readings advance it: a render thread left
            # running by another test reads the same patched clock.
            if threading.get_ident() == me and advancing[0]:
                now[0] += 0.001
            return now[0]

        self.patch(preview, "_cpuTime", clock)
        self.patch(preview, "MESSAGE_BUDGET", 10.0)
        content = "```python\n" + "x = 1\n" * 500 + "```"
        session = Session(id="s", messages=(Message(role="user", content=content),))
        self.assertIsNone(preview.renderSessionInline(session))
        self.assertIsNone(preview.fragments.get(("markdown", content)))
        # Nothing of the page that gave up is left over: the next page
        # renders inline.  (With the clock still at a millisecond a reading,
        # how often markdown-it's rules read it depends on how many rule
        # calls earlier tests made: the rules read it every 64 calls.)
        small = _numbered(3)
        advancing[0] = False
        self.assertEqual(preview.renderSessionInline(small), renderSession(small))
        advancing[0] = True
        # Off the reactor, the same message gets its full budget.
        self.assertIn('<span class="n">x</span>', renderSession(session))

    def test_markdownPastTheBudgetIsPlainText(self) -> None:
        # "[" * 262144 took 6.2 s; over MAX_MARKDOWN it is not parsed at all.
        for text in ["[" * 262144, "[![" * 30000, "*_" * 40000]:
            page = str(renderMarkdown(text))
            self.assertTrue(page.startswith('<pre class="plain">'), text[:10])
            self.assertIn(html.escape(text[:1000]), page)

    def test_longCodeNotHighlighted(self) -> None:
        code = "x = 1\n" * (preview.MAX_HIGHLIGHT // 6 + 1)
        self.assertIn('<div class="code plain">', highlightCode(code, "python"))

    def test_hostilePageRenders(self) -> None:
        session = Session(
            id="hostile",
            messages=(
                Message(role="assistant", content="```autoit\n" + " " * 8000 + "x\n```"),
                Message(role="user", content="[" * 262144),
            ),
        )
        tree = Tree(renderSession(session))
        self.assertEqual(len(tree.root.find("article")), 2)


class DeepJSONTests(SynchronousTestCase):
    """
    JSON nested deeper than Python's recursion limit is shown as text.
    """

    deep = "[" * 3000 + "]" * 3000

    def test_deepToolOutputAndArguments(self) -> None:
        session = Session(
            id="deep",
            messages=(
                Message(
                    role="assistant",
                    tool_calls=(
                        {"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": self.deep}},
                    ),
                ),
                Message(role="tool", tool_call_id="c1", content=self.deep),
                Message(role="tool", tool_call_id="c1", content="{" * 3000),
            ),
        )
        tree = Tree(renderSession(session))
        texts = [e.text() for e in tree.root.find("code")]
        self.assertEqual(texts.count(self.deep), 2)
        self.assertIn("{" * 3000, texts)

    def test_deepParsedArguments(self) -> None:
        nested: list = []
        for _ in range(3000):
            nested = [nested]
        arguments = str(preview._prettyArguments(nested))
        self.assertIn("too deeply nested", arguments)


class FragmentCacheTests(SynchronousTestCase):
    def test_leastRecentlyUsedDroppedPastTheBound(self) -> None:
        cache = preview._FragmentCache(1000)
        for n in range(10):
            cache.put(("markdown", f"{n:050}"), Markup("x" * 50))
        cache.get(("markdown", f"{0:050}"))
        cache.put(("markdown", "new" * 10), Markup("y" * 70))
        self.assertIsNotNone(cache.get(("markdown", f"{0:050}")))
        self.assertIsNone(cache.get(("markdown", f"{1:050}")))
        self.assertIsNotNone(cache.get(("markdown", "new" * 10)))

    def test_renderedOnce(self) -> None:
        self.patch(preview, "fragments", preview._FragmentCache(1_000_000))
        calls = []
        real = preview._renderMarkdown
        self.patch(preview, "_renderMarkdown", lambda text: calls.append(text) or real(text))
        self.assertEqual(renderMarkdown("*a*"), renderMarkdown("*a*"))
        self.assertEqual(calls, ["*a*"])


def _numbered(count: int) -> Session:
    return Session(
        id="long",
        messages=tuple(Message(role="user", content=f"message {n}") for n in range(count)),
    )


class PagingTests(SynchronousTestCase):
    def url(self, before: int | None) -> str:
        return "/session?id=long" + ("" if before is None else f"&before={before}")

    def page(self, session: Session, before: int | None = None, queued=()) -> Element:  # type: ignore[no-untyped-def]
        return Tree(renderSession(session, queued, before, self.url)).root

    def shown(self, root: Element) -> list[str]:
        return [a.find(cls="content")[0].text().strip() for a in root.find("article")]

    def links(self, root: Element) -> dict[str, str]:
        nav = root.find("nav", "pages")[0]
        return {a.text().strip(): a.attrs["href"] or "" for a in nav.find("a")}

    def test_newestPageFirst(self) -> None:
        session = _numbered(250)
        root = self.page(session, queued=[QueuedMessage(1, "long", "waiting", 1.0)])
        shown = self.shown(root)
        self.assertEqual(shown[0], "message 150")
        self.assertEqual(shown[-2:], ["message 249", "waiting"])
        self.assertEqual(
            self.links(root), {"← Earlier messages": "/session?id=long&before=150"}
        )
        self.assertIn("messages 151–250 of 250", root.find("nav", "pages")[0].text())

    def test_earlierPages(self) -> None:
        session = _numbered(250)
        root = self.page(session, 150, queued=[QueuedMessage(1, "long", "waiting", 1.0)])
        self.assertEqual(self.shown(root)[0], "message 50")
        self.assertEqual(self.shown(root)[-1], "message 149")  # no queued here
        self.assertEqual(
            self.links(root),
            {
                "← Earlier messages": "/session?id=long&before=50",
                "Later messages →": "/session?id=long&before=250",
                "Newest": "/session?id=long",
            },
        )
        first = self.page(session, 50)
        self.assertEqual(self.shown(first), [f"message {n}" for n in range(50)])
        self.assertNotIn("← Earlier messages", self.links(first))

    def test_beforePastTheEndIsTheNewestPage(self) -> None:
        session = _numbered(30)
        self.assertEqual(len(self.page(session, 10**9).find("article")), 30)
        self.assertEqual(self.page(session, 10**9).find("nav"), [])

    def test_pageBoundedByCharacters(self) -> None:
        big = "x" * (preview.PAGE_CHARACTERS // 3)
        session = Session(
            id="long", messages=tuple(Message(role="user", content=big) for _ in range(10))
        )
        self.assertEqual(preview.pageBounds(session.messages, None), (7, 10))
        huge = Session(id="long", messages=(Message(role="user", content=big * 4),) * 2)
        self.assertEqual(preview.pageBounds(huge.messages, None), (1, 2))

    def test_toolCallAnchorsKeepTheirIndex(self) -> None:
        messages = [Message(role="user", content="hi")] * 150 + [
            Message(
                role="assistant",
                tool_calls=({"id": "c", "function": {"name": "f", "arguments": "{}"}},),
            )
        ]
        root = self.page(Session(id="long", messages=tuple(messages)))
        self.assertEqual(
            [e.attrs["id"] for e in root.find(cls="tool-call")], ["m150-call0"]
        )


class RacingThreadsTests(SynchronousTestCase):
    """
    markdown-it builds its rule caches on first use: renders racing on
    fresh threads give the same page as one thread does.
    """

    def test_racingFirstRendersAgree(self) -> None:
        import sys
        import threading

        # Switch threads as often as possible, to make the race likely.
        self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
        sys.setswitchinterval(1e-6)
        # Switching that often costs CPU time: keep the per-message budget
        # from turning a slow (not wrong) render into plain text.
        self.patch(preview, "MESSAGE_BUDGET", 60.0)

        text = (
            "# Title\n\n| a | b |\n|---|---|\n| *x* | ~~y~~ |\n\n- one\n- two\n\n"
            "> quote with [a link](https://example.com) and `code`\n\n"
            "```python\nprint('hi')\n```\n"
        )
        expected = str(renderMarkdown(text))
        wrong: list[str] = []
        for _ in range(100):
            # Nothing rendered before, nothing cached: every thread starts cold.
            self.patch(preview, "_local", type(preview._local)())
            self.patch(preview, "fragments", preview._FragmentCache(0))
            barrier = threading.Barrier(4)

            def race() -> None:
                barrier.wait()
                try:
                    page = str(renderMarkdown(text))
                except Exception as e:  # markdown-it's "none of the block rules matched"
                    page = repr(e)
                if page != expected:
                    wrong.append(page)

            threads = [threading.Thread(target=race) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.assertEqual([page[:300] for page in wrong], [])


class LocalPagedViewTests(TestCase):
    """
    GET /session of a long session in the local backend's database, which
    reads only the page's part of it: the same page as the whole session
    gives.
    """

    async def test_pagesAsOfTheWholeSession(self) -> None:
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.server import Site
        from treq.client import HTTPClient

        from chatweb.backends.local import SCHEMA as SESSIONS_SCHEMA
        from chatweb.backends.local import LocalBackend
        from chatweb.queue import MessageQueue
        from chatweb.store._journal import SCHEMA as JOURNAL_SCHEMA
        from chatweb.store._journal import SQLiteJournal
        from chatweb.store._sqlite import SQLiteDatabase
        from chatweb.web._api import ChatWebAPI

        db = SQLiteDatabase(self.mktemp() + ".sqlite3", reactor)
        self.addCleanup(db.close)
        await db.open(JOURNAL_SCHEMA + SESSIONS_SCHEMA)
        backend = LocalBackend(db, reactor)
        messages = tuple(
            Message(role="assistant", content=f"message {n}",
                    usage={"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2})
            if n % 2 else Message(role="user", content=f"message {n}")
            for n in range(250)
        )
        await backend.importSession(Session(id="long", title="Long", messages=messages))
        whole = await backend.getSession("long")
        assert whole is not None
        journal = SQLiteJournal(db)
        queue = MessageQueue(journal, backend, reactor)
        api = ChatWebAPI(queue, backend, ["k" * 32], shareSecret=b"s" * 32)
        port = reactor.listenTCP(0, Site(api.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

        def url(before: int | None) -> str:
            return "/session?id=long" + ("" if before is None else f"&before={before}")

        for before in [None, 250, 200, 150, 101, 100, 37, 1]:
            response = await client.get(
                f"http://127.0.0.1:{port.getHost().port}{url(before)}",
                headers={"X-API-Key": "k" * 32},
            )
            self.assertEqual(response.code, 200)
            body = (await response.content()).decode("utf-8")
            self.assertEqual(body, renderSession(whole, (), before, url), before)
            self.assertIn("<b>250</b> messages", body)


class PagedViewTests(TestCase):
    """
    GET /session over a real port: long sessions are paged, and page
    renders run on a few threads while the reactor answers other requests.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.server import Site
        from treq.client import HTTPClient

        from chatweb.web._api import ChatWebAPI
        from chatweb.queue import MessageQueue
        from chatweb.testing import MemoryAdapter, MemoryJournal

        self.adapter = MemoryAdapter()
        self.adapter.sessions["long"] = _numbered(50_000)
        self.adapter.sessions["small"] = _numbered(3)
        queue = MessageQueue(MemoryJournal(), self.adapter, reactor)
        self.api = ChatWebAPI(queue, self.adapter, ["k" * 32], shareSecret=b"s" * 32)
        port = reactor.listenTCP(0, Site(self.api.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    async def get(self, path: str, key: bool = True) -> tuple[int, bytes]:
        headers = {"X-API-Key": "k" * 32} if key else {}
        response = await self.client.get(self.base + path, headers=headers)
        return response.code, await response.content()

    async def test_longSessionPaged(self) -> None:
        code, body = await self.get("/session?id=long")
        self.assertEqual(code, 200)
        self.assertLess(len(body), 200_000)
        page = body.decode()
        self.assertIn("messages <b>49,901–50,000</b> of 50,000", page)
        self.assertIn('href="/session?id=long&amp;before=49900"', page)
        code, body = await self.get("/session?id=long&before=49900")
        self.assertIn("messages <b>49,801–49,900</b>", body.decode())

    async def test_badBeforeIs400(self) -> None:
        for value in ["abc", "0", "-1", "1.5", "", "1&before=2", "9" * 30]:
            code, body = await self.get("/session?id=long&before=" + value)
            self.assertEqual(code, 400, value)
            self.assertIn("'before'", json.loads(body)["error"])

    async def test_shareLinkPagesKeepTheToken(self) -> None:
        token, _ = self.api._shareLinks.issue("long", 600)
        code, body = await self.get(f"/session?id=long&token={token}", key=False)
        self.assertEqual(code, 200)
        earlier = f"/session?id=long&token={token}&before=49900"
        self.assertIn(earlier.replace("&", "&amp;"), body.decode())
        code, body = await self.get(earlier, key=False)
        self.assertEqual(code, 200)
        self.assertIn("49,801–49,900", body.decode())

    async def test_rendersBoundedAndReactorFree(self) -> None:
        """
        While every render thread is busy, other requests are answered, and
        views past the waiting limit get a 503 at once.
        """
        import threading

        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        from twisted.internet.defer import ensureDeferred, gatherResults

        from chatweb.web import _pages as pages

        release = threading.Event()
        self.addCleanup(release.set)
        running = []

        def slowRender(*args, **kwargs):  # type: ignore[no-untyped-def]
            running.append(1)
            release.wait(30)
            return "<p>page</p>"

        self.patch(pages, "renderSession", slowRender)
        views = [
            ensureDeferred(self.get("/session?id=long"))
            for _ in range(pages.RENDER_THREADS + pages.RENDER_WAITING)
        ]
        while len(self.api._renders.waiting) < pages.RENDER_WAITING:
            await deferLater(reactor, 0.01)
        code, body = await self.get("/session?id=long")
        self.assertEqual((code, json.loads(body)["error"][:8]), (503, "too many"))
        code, body = await self.get("/sessions")
        self.assertEqual((code, json.loads(body)), (200, ["long", "small"]))
        self.assertLessEqual(len(running), pages.RENDER_THREADS)
        release.set()
        results = await gatherResults(views)
        self.assertEqual([c for c, _ in results], [200] * len(views))

    async def test_bigIndexAndExportOnThreads(self) -> None:
        """
        The HTML index of many sessions (a share token each) and the export
        of a long session are made on threads, and are whole.
        """
        for n in range(300):
            self.adapter.sessions[f"s{n:03}"] = _numbered(1)
        response = await self.client.get(
            self.base + "/sessions",
            headers={"X-API-Key": "k" * 32, "Accept": "text/html"},
        )
        self.assertEqual(response.code, 200)
        links = re.findall(r'href="([^"]+)"', (await response.content()).decode())
        self.assertEqual(len(links), 302)
        code, _ = await self.get(html.unescape(links[-1]), key=False)
        self.assertEqual(code, 200)
        code, body = await self.get("/session/raw?id=long")
        self.assertEqual(code, 200)
        self.assertEqual(len(json.loads(body)["messages"]), 50_000)
