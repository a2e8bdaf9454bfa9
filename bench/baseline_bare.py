"""
A baseline for bench/table.py: a bare twisted.web Resource doing the same
work as bench/baseline_app.py (X-API-Key, chatweb's body validation, the
message kept in a dict; GET /sessions as JSON), with no framework between
twisted.web and the handler.

    python bench/baseline_bare.py PORT [SESSIONS]
"""

import hmac
import json
import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from chatweb.web._validation import BadRequest, parseMessage

KEY = b"bench"
sessions: dict = {f"s{n:05}": [] for n in range(int(sys.argv[2]) if len(sys.argv) > 2 else 0)}


class Bare(Resource):
    isLeaf = True

    def render(self, request):
        if not hmac.compare_digest(request.getHeader(b"x-api-key") or b"", KEY):
            request.setResponseCode(401)
            return b'{"error": "missing or wrong X-API-Key"}'
        if request.method == b"POST" and request.path == b"/":
            try:
                session, content = parseMessage(request.content.read())
            except BadRequest as e:
                request.setResponseCode(400)
                return json.dumps({"error": str(e)}).encode()
            sessions.setdefault(session, []).append(content)
            request.setResponseCode(204)
            return b""
        if request.method == b"GET" and request.path == b"/sessions":
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(sorted(sessions)).encode()
        request.setResponseCode(404)
        return b'{"error": "not found"}'


site = Site(Bare(), parsePOSTFormSubmission=False)
site.log = lambda request: None
port = reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1", backlog=1024)
print(f"baseline listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
