"""
The floor of a durable POST / in Twisted on CPython, for bench/NOTES.md:
what is left when everything chatweb does beyond storing and recording a
message is taken away.  Not chatweb: a hand-written HTTP/1.1 parser that
takes one plain request per read, X-API-Key, chatweb's own parseMessage,
and SQLite group commit (WAL, synchronous=FULL, one writer thread, one
transaction for all that waits, executemany); each 204 once its group has
committed.  MODE=store writes the queue row; MODE=deliver (the default)
also what a delivery to an idle session writes: the session's message row,
three event rows and the queue row's state.  PARSER=twisted.web puts
twisted.web's own HTTP server (a bare Resource, as bench/baseline_bare.py
has) in place of the hand-written parser: the floor of a durable POST that
Twisted's HTTP server answers.

    MODE=deliver python bench/floor.py PORT
    MODE=deliver PARSER=twisted.web python bench/floor.py PORT

then, as bench/table.py runs its servers (taskset -c 0 for this one):

    BENCH_KEY=bench BENCH_METHOD=POST taskset -c 1 wrk -t1 -c16 -d4s \\
        -s bench/wrk.lua http://127.0.0.1:PORT/
"""

import hmac
import json
import os
import sqlite3
import sys
import tempfile

from twisted.internet import protocol, reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from chatweb.web._validation import BadRequest, parseMessage

KEY = b"bench"
MODE = os.environ.get("MODE", "deliver")
PARSER = os.environ.get("PARSER", "hand-written")
OK = b"HTTP/1.1 204 No Content\r\nServer: floor\r\nX-Message-Id: %d\r\n\r\n"
REFUSED = b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n"

directory = tempfile.mkdtemp()
db = sqlite3.connect(os.path.join(directory, "floor.sqlite3"), check_same_thread=False,
                     isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT,"
           " content TEXT, received REAL, state TEXT DEFAULT 'pending')")
db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT,"
           " data TEXT)")
db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT,"
           " session TEXT, time REAL, data TEXT)")
writer = ThreadPool(1, 1, "writer")
waiting: list = []
writing = False


def write(batch: list) -> list:
    cursor = db.cursor()
    cursor.execute("BEGIN IMMEDIATE")
    ids = []
    for session, content, when in batch:
        cursor.execute("INSERT INTO queue (session, content, received) VALUES (?, ?, ?)",
                       (session, content, when))
        ids.append(cursor.lastrowid)
    if MODE == "deliver":
        cursor.executemany("INSERT INTO messages (session, data) VALUES (?, ?)", [
            (s, json.dumps({"role": "user", "content": c, "created": w}))
            for s, c, w in batch])
        cursor.executemany("INSERT INTO events (kind, session, time, data) VALUES (?, ?, ?, ?)", [
            (kind, s, w, '{"message": %d}' % i) for (s, c, w), i in zip(batch, ids)
            for kind in ("message.queued", "delivery.started", "delivery.done")])
        cursor.executemany("UPDATE queue SET state = 'delivered' WHERE id = ?",
                           [(i,) for i in ids])
    cursor.execute("COMMIT")
    return ids


def flush() -> None:
    global writing, waiting
    if writing or not waiting:
        return
    writing = True
    batch, waiting = waiting, []

    def committed(ids: list) -> None:
        global writing
        writing = False
        for (answer, _, _, _), i in zip(batch, ids):
            answer(i)
        flush()

    deferToThreadPool(reactor, writer, write, [entry[1:] for entry in batch]).addCallback(
        committed)


class Floor(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        end = data.find(b"\r\n\r\n")
        headers = {}
        for line in data[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = data[end + 4:end + 4 + int(headers.get(b"content-length", b"0"))]
        if not hmac.compare_digest(headers.get(b"x-api-key", b""), KEY):
            self.transport.write(REFUSED % 401)
            return
        try:
            session, content = parseMessage(body)
        except BadRequest:
            self.transport.write(REFUSED % 400)
            return
        waiting.append((self.answer, session, content, reactor.seconds()))
        flush()

    def answer(self, i: int) -> None:
        self.transport.write(OK % i)


class BareFloor(Resource):
    """The same, behind twisted.web: its parser, Request and Site."""

    isLeaf = True

    def render_POST(self, request):
        if not hmac.compare_digest(request.getHeader(b"x-api-key") or b"", KEY):
            request.setResponseCode(401)
            return b""
        try:
            session, content = parseMessage(request.content.read())
        except BadRequest:
            request.setResponseCode(400)
            return b""

        def answer(i: int) -> None:
            request.setResponseCode(204)
            request.setHeader(b"X-Message-Id", b"%d" % i)
            request.finish()

        waiting.append((answer, session, content, reactor.seconds()))
        flush()
        return NOT_DONE_YET


if PARSER == "twisted.web":
    factory = Site(BareFloor(), parsePOSTFormSubmission=False)
    factory.log = lambda request: None
else:
    factory = protocol.Factory.forProtocol(Floor)
port = reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1", backlog=1024)
writer.start()
reactor.addSystemEventTrigger("during", "shutdown", writer.stop)
print(f"floor listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
