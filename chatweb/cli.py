"""
The client commands of C{chatweb} (send, sessions, show, follow, status,
share), over L{chatweb.client.ChatWebClient}.  C{chatweb.__main__} puts
them beside its own commands (import, ensure-key) in one dispatcher.

Errors are one line on stderr (C{chatweb: ...}) and exit status 1; a usage
error is argparse's, status 2.  The API key never reaches the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Awaitable, Callable, Coroutine, TextIO

from chatweb.client import ChatWebClient, ChatWebError, StreamEvent
from chatweb.config import (
    KEY_FILE_NAME,
    ConfigError,
    checkKey,
    defaultDataDir,
    readKeyFile,
)

DEFAULT_URL = "http://127.0.0.1:7777"

#: A command: the client and the parsed arguments; returns the exit status.
Command = Callable[[ChatWebClient, argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """
    The command cannot run as asked (no key, no text); said in one line.
    """


def addClientCommands(commands: Any) -> None:
    """
    Add the client commands to an argparse sub-parser set; each sets
    C{run} (see L{runCommand}).
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help=f"chatweb's base URL (default: $CHATWEB_URL, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--key-file",
        default=None,
        help="a file holding the API key (default: $CHATWEB_API_KEY, else the"
        f" data directory's {KEY_FILE_NAME} file, as `ensure-key` makes it)",
    )
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")
    common.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each answer"
    )

    def add(
        name: str,
        command: Command,
        help: str,
        prepare: Callable[[argparse.Namespace], None] | None = None,
    ) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, parents=[common], help=help, description=help)
        parser.set_defaults(run=lambda args: runCommand(command, args, prepare=prepare))
        return parser

    send = add(
        "send",
        _send,
        "queue a message for a session; prints its id (with --wait, the answer)",
        prepare=_readText,
    )
    send.add_argument("session")
    send.add_argument(
        "text", nargs="?", default=None, help="the message (default: read from stdin)"
    )
    send.add_argument(
        "--wait",
        action="store_true",
        help="follow the session's events until the message is delivered,"
        " and print the answers it got",
    )
    send.add_argument(
        "--idempotency-key",
        default=None,
        help="makes a repeated send of the same message queue it once"
        " (default: a new key per send, kept across retries)",
    )
    add("sessions", _sessions, "list the sessions' ids")
    show = add("show", _show, "print a session's messages as text")
    show.add_argument("session")
    show.add_argument(
        "--since", type=int, default=None, help="from the N-th message (1-based)"
    )
    follow = add(
        "follow", _follow, "print a session's events as they happen, until Ctrl-C"
    )
    follow.add_argument("session", nargs="?", default=None, help="(default: every session)")
    follow.add_argument(
        "--last-event-id", type=int, default=None, help="start after this event"
    )
    status = add("status", _status, "say where a sent message is")
    status.add_argument("message_id", type=int)
    share = add("share", _share, "print a link that opens a session's page without the key")
    share.add_argument("session")
    share.add_argument(
        "--expires-in", type=int, default=None, help="seconds the link lives (default 3600)"
    )


def _apiKey(args: argparse.Namespace, environ: Any) -> str:
    if args.key_file:
        path = args.key_file
    elif environ.get("CHATWEB_API_KEY"):
        try:
            return checkKey(str(environ["CHATWEB_API_KEY"]).strip(), "$CHATWEB_API_KEY")
        except ConfigError as e:
            raise UsageError(str(e))
    else:
        path = os.path.join(defaultDataDir(), KEY_FILE_NAME)
        if not os.path.exists(path):
            raise UsageError(
                "no API key: set CHATWEB_API_KEY, or pass --key-file FILE"
            )
    try:
        return readKeyFile(path)[0]
    except ConfigError as e:
        raise UsageError(str(e))


def runCommand(
    command: Command,
    args: argparse.Namespace,
    environ: Any = os.environ,
    stderr: TextIO | None = None,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """
    Run a client command under the reactor (C{react}); its exit status.
    C{prepare} does what must not run on the reactor (reading stdin).
    """
    stderr = sys.stderr if stderr is None else stderr
    try:
        if prepare is not None:
            prepare(args)
        key = _apiKey(args, environ)
    except UsageError as e:
        return _fail(stderr, str(e))
    url = args.url or environ.get("CHATWEB_URL") or DEFAULT_URL
    status: list[int] = [1]

    async def main(reactor: Any) -> None:
        client = ChatWebClient(url, key, timeout=args.timeout)
        args.reactor = reactor
        try:
            status[0] = await command(client, args)
        except (ChatWebError, UsageError) as e:
            status[0] = _fail(stderr, str(e))
        finally:
            await client.close()

    return runWithReactor(main, status)


def runWithReactor(
    main: Callable[[Any], Coroutine[Any, Any, None]], status: list[int]
) -> int:
    """
    Run C{main(reactor)} under L{react} and return the exit status that
    C{main} left in C{status[0]} (react's own SystemExit when it failed).
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    try:
        react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return status[0]


def _fail(stderr: TextIO, message: str) -> int:
    line = " ".join(message.split()) or "failed"
    print(f"chatweb: {line}", file=stderr)
    return 1


def _print(value: Any) -> None:
    print(value, flush=True)


def _printJSON(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


# -- the commands


def _readText(args: argparse.Namespace) -> None:
    if args.text is None:
        text = sys.stdin.read()
        args.text = text[:-1] if text.endswith("\n") else text
    if not args.text:
        raise UsageError("nothing to send: give TEXT, or pipe it to stdin")


async def _send(client: ChatWebClient, args: argparse.Namespace) -> int:
    text = args.text
    if not args.wait:
        sent = await client.send(args.session, text, args.idempotency_key)
        if args.json:
            _printJSON(
                {"session": sent.session, "message_id": sent.messageId,
                 "idempotency_key": sent.idempotencyKey}
            )
        else:
            _print(sent.messageId)
        return 0
    answer = await client.ask(args.session, text)
    if args.json:
        _printJSON(
            {"session": answer.sent.session, "message_id": answer.sent.messageId,
             "answers": list(answer.texts)}
        )
    else:
        for reply in answer.texts:
            _print(reply)
    return 0


async def _sessions(client: ChatWebClient, args: argparse.Namespace) -> int:
    sessions = await client.sessions()
    if args.json:
        _printJSON(sessions)
    else:
        for session in sessions:
            _print(session)
    return 0


async def _show(client: ChatWebClient, args: argparse.Namespace) -> int:
    messages = await client.messages(args.session, args.since)
    if args.json:
        _printJSON([m.asDict() for m in messages])
        return 0
    for n, message in enumerate(messages):
        if message.role is None:
            if message.error is not None:
                _print(f"[error] {message.error}")
            continue  # chat.nvim's completion marks
        if n:
            _print("")
        _print(f"[{message.role}]")
        if message.content:
            _print(message.content)
    return 0


def _describe(event: StreamEvent) -> str:
    data = event.data
    what = ""
    if event.kind in ("message.added", "delivery.text"):
        message = data.get("message")
        if isinstance(message, dict):
            what = f"[{message.get('role')}] {message.get('content') or ''}"
        else:
            what = str(data.get("text", ""))
    elif "message" in data:
        what = f"message {data['message']}"
        if data.get("error"):
            what += f": {data['error']}"
    line = f"{event.id} {event.session} {event.kind} {what}".rstrip()
    return " ".join(line.split("\n"))


async def _follow(client: ChatWebClient, args: argparse.Namespace) -> int:
    stream = client.events(args.session, args.last_event_id)
    # Ctrl-C stops the reactor: end the stream first, and exit cleanly.
    args.reactor.addSystemEventTrigger("before", "shutdown", stream.close)
    async with stream:
        async for event in stream:
            if args.json:
                _printJSON(
                    {"id": event.id, "kind": event.kind, "session": event.session,
                     "time": event.time, "data": event.data}
                )
            else:
                _print(_describe(event))
    return 0


async def _status(client: ChatWebClient, args: argparse.Namespace) -> int:
    status = await client.status(args.message_id)
    if args.json:
        _printJSON(
            {"id": status.id, "session": status.session, "state": status.state,
             "attempts": status.attempts, "last_error": status.lastError,
             "updated": status.updated, "times": status.times}
        )
        return 0
    line = f"{status.id} {status.state} (session {status.session!r}, attempts {status.attempts})"
    if status.lastError:
        line += f": {status.lastError}"
    _print(line)
    return 0


async def _share(client: ChatWebClient, args: argparse.Namespace) -> int:
    link = await client.share(args.session, args.expires_in)
    if args.json:
        _printJSON({"url": link.url, "expires": link.expires})
    else:
        _print(link.url)
    return 0
