"""
How the cost of rendering a session page grows with its length: a 50-message
session and a 5,000-message one, rendered in the same run, from messages of
the realistic fixtures (Markdown, highlighted code, tool calls, thinking).

Prints the time of each, per message, and the ratio of the per-message costs
(1.0 means the cost grows linearly with the number of messages).
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
from chatweb.preview import renderSession  # noqa: E402

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
        messages=tuple(sample[i % len(sample)] for i in range(size)),
    )


def best(s: Session, repeat: int) -> tuple[float, int]:
    """
    The fastest of C{repeat} renders, in seconds, and the page's size.
    """
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        page = renderSession(s)
        times.append(time.perf_counter() - start)
    return min(times), len(page.encode("utf-8"))


def main() -> None:
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


if __name__ == "__main__":
    main()
