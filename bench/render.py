"""
How the cost of rendering a session page grows with its length: a 50-message
session and a 5,000-message one, rendered in the same run, from messages of
the realistic fixtures (Markdown, highlighted code, tool calls, thinking).

Prints the time of each, per message, and the ratio of the per-message costs
(1.0 means the cost grows linearly with the number of messages).

Then the hostile messages: the inputs known to take time growing with the
square of their size (Pygments lexers, markdown-it, deep JSON), each
rendered as one message with nothing cached, as a ratio against a plain
message rendered in the same run; and, for the code blocks, what the same
input costs at a quarter of its size with no budget (what the budget saves).

    python bench/render.py [--hostile-only]
"""

from __future__ import annotations

import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from chatweb.importer import readSessionFile  # noqa: E402
from chatweb.model import Message, Session  # noqa: E402
from chatweb.render import _preview as preview  # noqa: E402
from chatweb.render._preview import renderSession  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures")


def sampleMessages() -> list[Message]:
    messages: list[Message] = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.json"))):
        if "hostile" not in path:
            messages.extend(readSessionFile(path).messages)
    return messages


def session(size: int, sample: list[Message]) -> Session:
    template = readSessionFile(os.path.join(FIXTURES, "tools-and-reasoning.json"))
    return Session(
        id=f"bench-{size}",
        provider=template.provider,
        model=template.model,
        cwd=template.cwd,
        prompt=template.prompt,
        messages=tuple(unique(sample[i % len(sample)], i) for i in range(size)),
    )


def unique(m: Message, n: int) -> Message:
    """
    C{m} made different from every other message (nothing is cached).
    """
    return Message(role=m.role, content=(m.content or "") + f"\n\n(message {n})",
                   reasoning_content=m.reasoning_content, tool_calls=m.tool_calls,
                   tool_call_id=m.tool_call_id, created=m.created,
                   tool_call_state=m.tool_call_state, usage=m.usage, error=m.error)


def best(s: Session, repeat: int) -> tuple[float, int]:
    """
    The fastest of C{repeat} renders, in seconds, and the page's size.
    """
    times = []
    for _ in range(repeat):
        preview.fragments.clear()
        start = time.perf_counter()
        page = renderSession(s)
        times.append(time.perf_counter() - start)
    return min(times), len(page.encode("utf-8"))


#: (name, message content, tool output?) of the worst inputs known.
HOSTILE = [
    ("autoit: 8,000 spaces", "```autoit\n" + " " * 8000 + "x\n```", False),
    ("gherkin: 8,000 spaces", "```gherkin\n" + " " * 8000 + "x\n```", False),
    ("typescript: 'a.' * 4,000", "```typescript\n" + "a." * 4000 + "\n```", False),
    ("javascript: '\"\\\\' * 3,000", "```javascript\n" + '"\\' * 3000 + "\n```", False),
    ("python: ' \\n' * 4,000", "```python\n" + " \n" * 4000 + "```", False),
    ("markdown: '[' * 262,144", "[" * 262144, False),
    ("markdown: '[![' * 30,000", "[![" * 30000, False),
    ("markdown: '*_' * 40,000", "*_" * 40000, False),
    ("markdown: 'a\\n' * 45,000", "a\n" * 45000, False),
    ("tool output: JSON 3,000 deep", "[" * 3000 + "]" * 3000, True),
]

PLAIN = (
    "Here is the summary you asked for. The build **passed** on all three"
    " platforms; see [the log](https://example.com/log) for details.\n\n"
    "- tests: 218 passed\n- coverage: 91 %\n"
)


def renderOnce(content: str, tool: bool) -> float:
    preview.fragments.clear()
    start = time.perf_counter()
    if tool:
        preview._toolOutput(content)
    else:
        preview.renderMarkdown(content)
    return time.perf_counter() - start


def hostile() -> None:
    plain = min(renderOnce(PLAIN, False) for _ in range(200))
    print(f"\nplain message: {plain * 1e6:.0f} us (the baseline);"
          f" budget per message {preview.MESSAGE_BUDGET * 1000:.0f} ms of CPU")
    print(f"{'hostile message':36} {'ms':>8} {'x plain':>9}  shown as")
    for name, content, tool in HOSTILE:
        took = max(renderOnce(content, tool) for _ in range(2))
        html = preview.fragments.get(("tool" if tool else "markdown", content)) or ""
        shown = ("plain text" if html.startswith('<pre class="plain">') or "code plain" in html
                 else "rendered")
        print(f"{name:36} {took * 1000:8.1f} {took / plain:9.0f}  {shown}")
    # The same code blocks at a quarter of the size, with no budget.
    budget = preview.MESSAGE_BUDGET
    preview.MESSAGE_BUDGET = 1e9
    try:
        for name, content, tool in HOSTILE[:5]:
            head, _, body = content.partition("\n")
            small = head + "\n" + body[: len(body) // 4] + "\n```"
            took = renderOnce(small, tool)
            print(f"  unbounded, a quarter of {name:28} {took * 1000:8.1f} ms"
                  f" {took / plain:9.0f} x plain")
    finally:
        preview.MESSAGE_BUDGET = budget


def main() -> None:
    if "--hostile-only" in sys.argv:
        hostile()
        return
    sample = sampleMessages()
    small, large = session(50, sample), session(5000, sample)
    renderSession(small)  # warm up: templates compiled, lexers loaded
    smallTime, smallSize = best(small, 20)
    largeTime, largeSize = best(large, 3)
    perSmall = smallTime / 50
    perLarge = largeTime / 5000
    print(f"render    50 messages: {smallTime * 1000:8.1f} ms  "
          f"({perSmall * 1e6:6.0f} us/message, {smallSize / 1024:7.0f} KiB)")
    print(f"render 5,000 messages: {largeTime * 1000:8.1f} ms  "
          f"({perLarge * 1e6:6.0f} us/message, {largeSize / 1024:7.0f} KiB)")
    print(f"per-message cost, 5,000 vs 50: {perLarge / perSmall:.2f}x "
          f"(total time ratio {largeTime / smallTime:.0f}x for 100x the messages)")
    start = time.perf_counter()
    renderSession(large)
    cached = time.perf_counter() - start
    print(f"render 5,000 messages again, fragments cached: {cached * 1000:8.1f} ms"
          f" ({cached / largeTime:.2f}x the first render)")
    hostile()


if __name__ == "__main__":
    main()
