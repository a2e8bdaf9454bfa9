"""
The seed's HTTP contract, black-box, against the real `twistd -n chatweb`:
status codes, JSON error bodies, escaping, ordering and unicode, as a
client sees them over the wire.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from chatweb.testing import ChatWebProcess

KEY = "conformance-key"


class ConformanceTests(TestCase):
    timeout = 120

    async def test_seedContract(self) -> None:
        process = ChatWebProcess(os.path.abspath(self.mktemp()), KEY)
        self.addCleanup(process.stop)
        url = await process.start()
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        auth = {"X-API-Key": KEY}

        async def call(method: str, path: str, body: bytes | None = None, headers=auth):  # type: ignore[no-untyped-def]
            response = await client.request(method, url + path, data=body, headers=headers)
            return response.code, response.headers, await response.content()

        def error(code: int, answer: tuple) -> str:  # type: ignore[type-arg]
            self.assertEqual(answer[0], code, answer)
            self.assertEqual(answer[1].getRawHeaders("content-type"), ["application/json"])
            return json.loads(answer[2])["error"]

        # POST / : 204, 400 (with what was wrong), 401.
        sessions = {"ci": [], "python-script": [], "2024-01-15-10-30-00": [], "日本語 セッション": []}
        for n in range(12):
            for session in sessions:
                content = f"{n}: <script>&amp;</script> \"quoted\" 'single' 🎉 {session}"
                sessions[session].append(content)
                answer = await call("POST", "/", json.dumps({"session": session, "content": content}).encode())
                self.assertEqual((answer[0], answer[2]), (204, b""))
        self.assertIn("not valid JSON", error(400, await call("POST", "/", b"{nope")))
        self.assertIn("'content'", error(400, await call("POST", "/", b'{"session": "ci"}')))
        self.assertIn("string", error(400, await call("POST", "/", b'{"session": "ci", "content": 1}')))
        self.assertIn("object", error(400, await call("POST", "/", b"[]")))
        self.assertIn("X-API-Key", error(401, await call("POST", "/", b'{"session": "a", "content": "b"}', headers={})))
        self.assertIn("X-API-Key", error(401, await call("POST", "/", b'{"session": "a", "content": "b"}', headers={"X-API-Key": "nope"})))

        # GET /sessions : the ids, JSON.
        code, headers, body = await call("GET", "/sessions")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), sorted(sessions))
        error(401, await call("GET", "/sessions", headers={}))

        # GET /session?id= : HTML, every message escaped and in order.
        for session, contents in sessions.items():
            code, headers, body = await call("GET", "/session?id=" + quote(session))
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
            page = body.decode("utf-8")
            self.assertNotIn("<script", page)
            positions = [page.index(f"{n}: &lt;script&gt;") for n in range(12)]
            self.assertEqual(positions, sorted(positions))
            self.assertIn(session.split()[0], page)
        self.assertIn("'id'", error(400, await call("GET", "/session")))
        self.assertIn("nope", error(404, await call("GET", "/session?id=nope")))
        error(401, await call("GET", "/session?id=ci", headers={}))

        # Everything else: 404.
        for method, path in [("GET", "/"), ("PUT", "/"), ("DELETE", "/sessions"),
                             ("POST", "/sessions"), ("GET", "/nope"), ("PATCH", "/session?id=ci")]:
            error(404, await call(method, path))
        code, _, _ = await call("HEAD", "/sessions")
        self.assertEqual(code, 404)
