"""
Post a message to a chatweb session and wait for the answer, with Python's
standard library only (http.client): follow the session's events, post,
and read events until the delivery is done.

    python wait_for_answer.py http://127.0.0.1:7777 ci "hello"

(the key comes from $CHATWEB_API_KEY).  tests/test_examples.py runs it
against a chatweb started with --responder echo.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
from typing import Iterator
from urllib.parse import quote, urlsplit


def events(response: http.client.HTTPResponse) -> Iterator[tuple[str, dict]]:
    """
    The (kind, event) pairs of a Server-Sent Events stream.
    """
    kind, data = "", ""
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            data = line[len("data: "):]
        elif not line and data:
            yield kind, json.loads(data)
            kind, data = "", ""


def ask(baseURL: str, key: str, session: str, content: str, timeout: float = 60) -> list[str]:
    """
    Post C{content} to C{session}, and return the answers added to the
    session by its delivery.
    """
    url = urlsplit(baseURL)
    if url.hostname is None:
        raise ValueError(f"not a URL with a host: {baseURL!r}")
    headers = {"X-API-Key": key}
    # 1. Follow the session first, so that no event is missed.
    stream = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    stream.request("GET", f"/sessions/{quote(session, safe='')}/events", headers=headers)
    response = stream.getresponse()
    if response.status != 200:
        raise RuntimeError(f"events: {response.status} {response.read()!r}")
    # 2. Post the message.
    post = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    post.request(
        "POST",
        "/",
        body=json.dumps({"session": session, "content": content}),
        headers=dict(headers, **{"Content-Type": "application/json"}),
    )
    posted = post.getresponse()
    posted.read()
    post.close()
    if posted.status != 204:
        raise RuntimeError(f"post: {posted.status}")
    # 3. Read events until the delivery is done (or failed).
    answers = []
    try:
        for kind, event in events(response):
            if kind == "message.added":
                message = event["data"]["message"]
                if message.get("role") == "assistant":
                    answers.append(message.get("content", ""))
            elif kind == "delivery.done":
                return answers
            elif kind == "delivery.failed" and event["data"].get("final"):
                raise RuntimeError(f"delivery failed: {event['data'].get('error')}")
        raise RuntimeError("the event stream ended before the answer")
    finally:
        stream.close()


if __name__ == "__main__":
    base, session, content = sys.argv[1:4]
    for answer in ask(base, os.environ["CHATWEB_API_KEY"], session, content):
        print(answer)
