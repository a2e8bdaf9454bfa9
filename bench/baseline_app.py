"""
The baseline for bench/post_throughput.py: the smallest Klein app that takes
the same POST (parse JSON, keep the message in memory, answer 204), with no
auth, no validation and no disk.  Usage: python baseline_app.py PORT
"""

import json
import sys

from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

app = Klein()
messages = []


@app.route("/", methods=["POST"])
def post(request):
    data = json.loads(request.content.read())
    messages.append((data["session"], data["content"]))
    request.setResponseCode(204)
    return b""


site = Site(app.resource())
site.log = lambda request: None
port = reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
print(f"baseline listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
