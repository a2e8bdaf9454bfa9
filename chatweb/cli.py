"""
The client commands of C{chatweb} (send, sessions, show, follow, status,
share), over L{chatweb.client.ChatWebClient}.  C{chatweb.__main__} puts
them beside its own commands (import, ensure-key) in one dispatcher.

Errors are one line on stderr (C{chatweb: ...}) and exit status 1; a usage
error is argparse's, status 2; Ctrl-C is one line and status 130 (0 for
C{follow}, which runs until it).  The API key never reaches the output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from typing import Any, Callable, Coroutine, TextIO

from chatweb.client import ChatWebClient, ChatWebError, StreamEvent
from chatweb.config import (
    KEY_FILE_NAME,
    ConfigError,
    checkKey,
    defaultDataDir,
    readKeyFile,
)

DEFAULT_URL = "http://127.0.0.1:7777"

#: Most bytes of a message read from stdin (far above any server's body
#: limit: it stops an endless input, not a real message).
MAX_STDIN = 64 * 1024 * 1024

#: The exit status of a command that Ctrl-C ended (a shell's, for SIGINT).
INTERRUPTED = 130

#: A command: the client and the parsed arguments; returns the exit status.
Command = Callable[[ChatWebClient, argparse.Namespace], Coroutine[Any, Any, int]]


class UsageError(Exception):
    """
    The command cannot run as asked (no key, no text); said in one line.
    """


def _clientOptions() -> list[tuple[str, dict[str, Any]]]:
    """
    The client commands' own options: C{(flag, argparse keywords)}.
    """
    return [
        ("--url", dict(
            default=None,
            help=f"chatweb's base URL (default: $CHATWEB_URL, else {DEFAULT_URL})",
        )),
        ("--key-file", dict(
            default=None,
            help="a file holding the API key (default: $CHATWEB_API_KEY, else the"
            f" data directory's {KEY_FILE_NAME} file, as `ensure-key` makes it)",
        )),
        ("--json", dict(action="store_true", default=False, help="print JSON, for scripts")),
        ("--timeout", dict(
            type=_seconds, default=30.0,
            help="seconds to wait for each answer to start (default 30)",
        )),
    ]


def addClientOptions(parser: argparse.ArgumentParser) -> None:
    """
    Let the client commands' options come before the command too
    (C{chatweb --url URL send ...}), as well as after it.
    """
    group = parser.add_argument_group("options of the client commands, before or after them")
    for flag, options in _clientOptions():
        group.add_argument(flag, **options)


def clientOptionsGiven(args: argparse.Namespace) -> list[str]:
    """
    The client options in C{args} that differ from their defaults.
    """
    return [
        flag for flag, options in _clientOptions()
        if getattr(args, flag[2:].replace("-", "_"), options["default"]) != options["default"]
    ]


def addClientCommands(commands: Any) -> None:
    """
    Add the client commands to an argparse sub-parser set; each sets
    C{run} (see L{runCommand}).  Their options' defaults come from the
    parent parser (L{addClientOptions}); given after the command, they win
    over the same given before it.
    """
    common = argparse.ArgumentParser(add_help=False)
    for flag, options in _clientOptions():
        # Not a default of its own: it would replace the value given
        # before the command.
        common.add_argument(flag, **dict(options, default=argparse.SUPPRESS))

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
    # (Ctrl-C ends it as it should: see _follow.)
    follow.set_defaults(untilInterrupted=True)
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


def _seconds(value: str) -> float:
    refused = argparse.ArgumentTypeError(f"not a number of seconds above 0: {value!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise refused from None
    if not 0 < seconds < float("inf"):
        raise refused
    return seconds


def _checkURL(url: str) -> str:
    from urllib.parse import urlsplit

    refused = UsageError(f"not an http:// or https:// URL: {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # (raises for one that is not a number, or too large)
    except ValueError as e:
        raise UsageError(f"not an http:// or https:// URL: {url!r} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refused
    if "@" in parts.netloc:
        raise UsageError(
            f"a URL with a user name or password: {parts.scheme}://{parts.netloc.rsplit('@', 1)[1]}"
            " (the API key goes in --key-file or $CHATWEB_API_KEY)"
        )
    if re.search(r"[\s\x00-\x1f\x7f]", parts.netloc):
        raise UsageError(f"not a host name or address in {url!r}: {parts.hostname!r}")
    return url


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
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        # A character the terminal's encoding lacks is written as an
        # escape (\xe9), not a UnicodeEncodeError.
        reconfigure(errors="backslashreplace")
    try:
        if prepare is not None:
            prepare(args)
        key = _apiKey(args, environ)
        url = _checkURL(args.url or environ.get("CHATWEB_URL") or DEFAULT_URL)
    except UsageError as e:
        return _fail(stderr, str(e))
    status: list[int] = [1]

    async def main(reactor: Any) -> None:
        from twisted.internet.defer import Deferred

        client = ChatWebClient(url, key, timeout=args.timeout)
        args.reactor = reactor
        running: Deferred[int] = Deferred.fromCoroutine(command(client, args))
        interrupted: list[bool] = []

        def interrupt() -> None:
            # Ctrl-C (or SIGTERM) stops the reactor: end the command
            # first, and say so.
            interrupted.append(True)
            running.cancel()

        if not getattr(args, "untilInterrupted", False):
            reactor.addSystemEventTrigger("before", "shutdown", interrupt)
        try:
            status[0] = await running
        except Exception as e:
            # (Cancelled, its request may have failed rather than stopped.)
            if interrupted:
                status[0] = _fail(stderr, _interrupted(args), INTERRUPTED)
            elif isinstance(e, BrokenPipeError):
                # The reader stopped reading (| head): nothing more to say.
                status[0] = 0
            elif isinstance(e, (ChatWebError, UsageError)):
                status[0] = _fail(stderr, str(e))
            else:
                raise
        finally:
            await client.close()

    return runWithReactor(main, status)


def _interrupted(args: argparse.Namespace) -> str:
    if getattr(args, "text", None) is not None and args.idempotency_key is None:
        return (
            "interrupted: the message may or may not have been queued (give"
            " --idempotency-key to make sending it again safe)"
        )
    return "interrupted"


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


def _fail(stderr: TextIO, message: str, status: int = 1) -> int:
    line = " ".join(message.split()) or "failed"
    print(f"chatweb: {line}", file=stderr)
    return status


#: What a terminal would take as a command rather than text: control
#: characters but newline and tab.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _shown(text: str) -> str:
    """
    C{text} to print as text: each control character written as an escape
    (C{\\x1b}), so that no message can drive the reader's terminal.
    """
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _print(value: Any) -> None:
    print(value, flush=True)


def _printJSON(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


# -- the commands


def _readText(args: argparse.Namespace) -> None:
    if args.text is None:
        data = sys.stdin.buffer.read(MAX_STDIN + 1)
        if len(data) > MAX_STDIN:
            raise UsageError(f"the message on stdin is larger than {MAX_STDIN} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"the message on stdin is not valid UTF-8 (byte {e.start})")
        # One final line end dropped, as a shell's $(...) would: "\n", or
        # "\r\n" from a Windows program.
        for end in ("\r\n", "\n"):
            if text.endswith(end):
                text = text[: -len(end)]
                break
        args.text = text
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
    answer = await client.ask(args.session, text, args.idempotency_key)
    if args.json:
        _printJSON(
            {"session": answer.sent.session, "message_id": answer.sent.messageId,
             "answers": list(answer.texts)}
        )
    else:
        for reply in answer.texts:
            _print(_shown(reply))
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
                _print(_shown(f"[error] {message.error}"))
            continue  # chat.nvim's completion marks
        if n:
            _print("")
        _print(_shown(f"[{message.role}]"))
        if message.content:
            _print(_shown(message.content))
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
    # Quoted as a shell would (only when it must be): an id with a space
    # is still one field of the line.
    line = f"{event.id} {shlex.quote(event.session)} {event.kind} {what}".rstrip()
    return _shown(" ".join(line.split("\n")))


async def _follow(client: ChatWebClient, args: argparse.Namespace) -> int:
    stream = client.events(args.session, args.last_event_id)
    # It follows until Ctrl-C, whatever a restart of the server takes.
    stream.maxFailedReconnects = None
    interrupted: list[bool] = []

    def interrupt() -> None:
        # Ctrl-C stops the reactor: end the stream first, and exit cleanly.
        interrupted.append(True)
        stream.close()

    args.reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    try:
        async with stream:
            async for event in stream:
                if args.json:
                    _printJSON(
                        {"id": event.id, "kind": event.kind, "session": event.session,
                         "time": event.time, "data": event.data}
                    )
                else:
                    _print(_describe(event))
    except ChatWebError:
        if interrupted:
            return 0  # Ctrl-C while it connected
        raise
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
