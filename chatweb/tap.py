"""
The twistd plugin's options and service maker: C{twistd -n chatweb ...}.
"""

from __future__ import annotations


from typing import Any

from twisted.python import usage

from chatweb.backends.responders import RESPONDERS
from chatweb.config import ConfigError, defaultDataDir, ensureDataDir, resolveKey


def _exit(message: str) -> None:
    """
    Stop with a one-line message and a non-zero exit, no traceback.
    """
    raise SystemExit(f"chatweb: {message}")


def _positive(name: str, kind: type) -> Any:
    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"--{name} must be a number, not {value!r}")
        if number <= 0:
            raise ValueError(f"--{name} must be greater than 0, not {value!r}")
        return number

    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Push messages into chat sessions over HTTP (chat.nvim's HTTP API). "
        "The API key comes from --api-key-file, $CHATWEB_API_KEY or --api-key."
    )

    optParameters = [
        ["port", "p", 7777, "TCP port to listen on.", None],
        ["host", None, "127.0.0.1", "Interface to listen on."],
        ["listen", "l", None, "Twisted endpoint to listen on (overrides --port"
         " and --host), e.g. tcp:7777:interface=::1, unix:/run/chatweb.sock, ssl:..."],
        ["api-key", None, None, "The API key (visible in ps: prefer the file or"
         " $CHATWEB_API_KEY)."],
        ["api-key-file", None, None, "A file holding the API key."],
        ["data-dir", "d", None, "Where sessions and the queue are kept"
         " [default: $XDG_DATA_HOME/chatweb or ~/.local/share/chatweb]."],
        ["interval", None, 5.0, "Seconds between sweeps of the queue.", None],
        ["responder", None, "none", "What answers in a session of the default"
         f" backend: {' or '.join(RESPONDERS)}."],
    ]
    optFlags = [
        ["access-log", None, "Log every request (method, path, status; never"
         " the query string)."],
    ]
    compData = usage.Completions(
        optActions={
            "responder": usage.CompleteList(list(RESPONDERS)),
            "data-dir": usage.CompleteDirs(),
            "api-key-file": usage.CompleteFiles(),
        }
    )

    def opt_port(self, value: str) -> None:
        try:
            port = int(value)
        except ValueError:
            raise usage.UsageError(f"--port must be a number, not {value!r}")
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--port must be between 0 and 65535, not {port}")
        self["port"] = port

    opt_p = opt_port

    def opt_interval(self, value: str) -> None:
        try:
            self["interval"] = _positive("interval", float)(value)
        except ValueError as e:
            raise usage.UsageError(str(e))

    def opt_responder(self, value: str) -> None:
        if value not in RESPONDERS:
            raise usage.UsageError(
                f"--responder must be one of {', '.join(RESPONDERS)}, not {value!r}"
            )
        self["responder"] = value

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            _exit(f"{e} (see twistd chatweb --help)")

    def postOptions(self) -> None:
        try:
            self["key"] = resolveKey(self["api-key"], self["api-key-file"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        if self["data-dir"] is None:
            self["data-dir"] = defaultDataDir()
        if self["listen"] is None:
            from twisted.internet.endpoints import quoteStringArgument

            self["listen"] = "tcp:%d:interface=%s" % (
                self["port"],
                quoteStringArgument(self["host"]),
            )


def makeService(options: Options) -> Any:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from chatweb.service import ChatWebService

    try:
        ensureDataDir(options["data-dir"])
    except ConfigError as e:
        _exit(str(e))
    try:
        serverFromString(reactor, options["listen"])
    except Exception as e:
        _exit(f"bad --listen endpoint {options['listen']!r}: {e}")
    return ChatWebService(
        apiKeys=[options["key"]],
        dataDir=options["data-dir"],
        endpoint=options["listen"],
        responder=options["responder"],
        interval=options["interval"],
        accessLog=bool(options["access-log"]),
    )


__all__ = ["Options", "makeService"]

