"""
A baseline for bench/table.py and bench/post_throughput.py: the smallest
Klein app doing chatweb's work into memory.  POST / checks X-API-Key,
validates the body with chatweb's own parser and keeps the message in a
dict (204); GET /sessions answers the sorted ids as JSON.  No disk.

    python bench/baseline_app.py PORT [SESSIONS]
"""

import hmac
import json
import sys

from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

from chatweb.web._validation import BadRequest, parseMessage

KEY = b"bench"
app = Klein()
sessions: dict = {f"s{n:05}": [] for n in range(int(sys.argv[2]) if len(sys.argv) > 2 else 0)}


def refused(request):
    if hmac.compare_digest(request.getHeader(b"x-api-key") or b"", KEY):
        return None
    request.setResponseCode(401)
    return b'{"error": "missing or wrong X-API-Key"}'


@app.route("/", methods=["POST"])
def post(request):
    answer = refused(request)
    if answer is not None:
        return answer
    try:
        session, content = parseMessage(request.content.read())
    except BadRequest as e:
        request.setResponseCode(400)
        return json.dumps({"error": str(e)}).encode()
    sessions.setdefault(session, []).append(content)
    request.setResponseCode(204)
    return b""


@app.route("/sessions", methods=["GET"])
def listSessions(request):
    answer = refused(request)
    if answer is not None:
        return answer
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(sorted(sessions)).encode()


site = Site(app.resource(), parsePOSTFormSubmission=False)
site.log = lambda request: None
port = reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1", backlog=1024)
print(f"baseline listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
