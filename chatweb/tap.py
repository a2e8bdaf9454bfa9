"""
The twistd plugin's options and service maker: C{twistd -n chatweb ...}.
"""

from __future__ import annotations


import math
import os
import sys
from typing import Any

from twisted.application.service import Service
from twisted.python import usage

from chatweb.backends.responders import RESPONDERS
from chatweb.config import (
    ConfigError,
    checkDatabase,
    defaultDataDir,
    ensureDataDir,
    DEFAULT_BACKLOG,
    readSecretFile,
    resolveKeys,
    shortKeyWarning,
    withBacklog,
)
from chatweb.limits import Limits


def _exit(message: str) -> None:
    """
    Stop with a one-line message and a non-zero exit, no traceback.
    """
    raise SystemExit(f"chatweb: {message}")


_DEFAULTS = Limits()

def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installedVersion

    try:
        return installedVersion("chatweb")
    except PackageNotFoundError:
        return "unknown"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Push messages into chat sessions over HTTP (chat.nvim's HTTP API). "
        "The API key comes from one of --api-key-file (one key per line),"
        " $CHATWEB_API_KEY or --api-key."
    )

    optParameters = [
        ["port", "p", 7777, "TCP port to listen on.", None],
        ["host", None, "127.0.0.1", "Interface to listen on."],
        ["listen", "l", None, "Twisted endpoint to listen on (overrides --port"
         " and --host), e.g. tcp:7777:interface=::1, unix:/run/chatweb.sock, ssl:...;"
         f" backlog={DEFAULT_BACKLOG} is added unless it sets one"],
        ["api-key", None, None, "The API key (visible in ps: prefer the file or"
         " $CHATWEB_API_KEY)."],
        ["api-key-file", None, None, "A file holding the API key, or several"
         " (one per line, to rotate keys)."],
        ["data-dir", "d", None, "Where sessions and the queue are kept"
         " [default: $XDG_DATA_HOME/chatweb or ~/.local/share/chatweb]."],
        ["database", None, None, "postgresql://USER@HOST:PORT/DB: keep sessions"
         " and the queue in PostgreSQL, shared by several instances (default:"
         " SQLite in the data directory).  The password comes from $PGPASSWORD,"
         " --database-password-file, or the DSN.", None],
        ["database-password-file", None, None, "A file holding the PostgreSQL"
         " password.", None],
        ["lease-ttl", None, 15.0, "With --database: seconds an instance's claim"
         " on a session lasts unless renewed (another instance takes the session"
         " over this long after the first dies).", None],
        ["interval", None, 5.0, "Seconds between sweeps of the queue.", None],
        ["page-workers", None, 2, "Processes that read sessions and render pages (the"
         " SQLite default store); 0: threads of the server's own process do.", None],
        ["responder", None, "none", "What answers in a session of the default"
         f" backend: {' or '.join(RESPONDERS)}."],
        ["base-url", None, None, "The model server of --responder openai or"
         " anthropic, e.g. http://127.0.0.1:11434/v1 [default: OpenAI's or"
         " Anthropic's]."],
        ["model", None, None, "The model asked when a session names none."],
        ["provider-key-file", None, None, "A file holding the model server's key"
         " [default: $OPENAI_API_KEY or $ANTHROPIC_API_KEY; none if unset]."],
        ["system-prompt", None, None, "The system message of sessions that have"
         " no prompt of their own."],
        ["system-prompt-file", None, None, "A file holding the system prompt."],
        ["model-timeout", None, 120.0, "Seconds the model server may stay silent"
         " (before its answer starts, or in the middle of it) before the request"
         " fails and is retried.", None],
        ["history-budget", None, 200000, "Characters of a session's history sent"
         " to the model at most (the oldest messages are left out).", None],
        ["providers", None, None, "A TOML file of named model providers"
         " (see docs/models.md); sessions choose one by their provider."],
        ["max-attempts", None, 10, "Failed deliveries of a message before it is"
         " kept as failed (a dead letter).", None],
        ["delivery-timeout", None, 600.0, "Seconds a delivery may take before it"
         " counts as failed (0: no limit).", None],
        ["shutdown-timeout", None, 10.0, "Seconds to let deliveries under way"
         " finish when stopping.", None],
        ["max-body", None, _DEFAULTS.maxBodySize, "Largest request body, in bytes.", None],
        ["max-content", None, _DEFAULTS.maxContentLength, "Longest message"
         " content, in characters.", None],
        ["max-header-size", None, _DEFAULTS.maxHeaderSize, "Largest request line"
         " plus headers, in bytes.", None],
        ["request-timeout", None, _DEFAULTS.requestTimeout, "Seconds for a request"
         " to arrive whole once begun.", None],
        ["idle-timeout", None, _DEFAULTS.idleTimeout, "Seconds an idle"
         " connection stays open.", None],
        ["max-pending-per-session", None, _DEFAULTS.maxPendingPerSession,
         "Messages that may wait in one session (then 429).", None],
        ["max-pending", None, _DEFAULTS.maxPendingTotal, "Messages that may wait"
         " in all sessions (then 503).", None],
        ["rate-limit", None, _DEFAULTS.rateLimit, "Requests per second per API"
         " key (then 429); 0: off.", None],
        ["rate-burst", None, _DEFAULTS.rateBurst, "Requests a key may make at"
         " once before --rate-limit applies.", None],
        ["max-connections", None, _DEFAULTS.maxConnections, "Connections open"
         " at once; more are closed at once.", None],
        ["metrics-listen", None, None, "Also serve GET /metrics, without the"
         " key, on this Twisted endpoint (e.g. tcp:9100:interface=127.0.0.1)."],
    ]
    optFlags = [
        ["access-log", None, "Log every request (method, path, status; never"
         " the query string)."],
        ["log-each-message", None, "Log every message queued and delivered"
         " (by default the first 100 lines of each minute, and a count of the"
         " rest once a minute; failures are always logged one by one)."],
    ]
    compData = usage.Completions(
        optActions={
            "responder": usage.CompleteList(list(RESPONDERS)),
            "data-dir": usage.CompleteDirs(),
            "api-key-file": usage.CompleteFiles(),
            "provider-key-file": usage.CompleteFiles(),
            "system-prompt-file": usage.CompleteFiles(),
            "providers": usage.CompleteFiles(),
        }
    )

    def opt_version(self) -> None:
        """
        Print chatweb's and Twisted's versions and exit.
        """
        from twisted import version as twistedVersion

        print(f"chatweb {version()} (Twisted {twistedVersion.short()})")
        sys.exit(0)

    def opt_port(self, value: str) -> None:
        try:
            port = int(value)
        except ValueError:
            raise usage.UsageError(f"--port must be a number, not {value!r}")
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--port must be between 0 and 65535, not {port}")
        self["port"] = port

    opt_p = opt_port

    def _number(self, name: str, value: str, kind: type, minimum: float) -> None:
        try:
            number = kind(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {value!r}")
        if not math.isfinite(number) or number < minimum:
            raise usage.UsageError(f"--{name} must be at least {minimum:g}, not {value!r}")
        self[name] = number

    def __init__(self) -> None:
        super().__init__()
        self["allowed-hosts"] = []

    def opt_allowed_host(self, value: str) -> None:
        """
        A Host name (no port) that HTML pages may be served to, besides the
        loopback names: the name users type in the browser (repeatable; *
        allows any).
        """
        self["allowed-hosts"].append(value)

    def limits(self) -> Limits:
        return Limits(
            maxBodySize=self["max-body"],
            maxHeaderSize=self["max-header-size"],
            requestTimeout=self["request-timeout"],
            idleTimeout=self["idle-timeout"],
            maxContentLength=self["max-content"],
            maxPendingPerSession=self["max-pending-per-session"],
            maxPendingTotal=self["max-pending"],
            rateLimit=self["rate-limit"],
            rateBurst=self["rate-burst"],
            maxConnections=self["max-connections"],
        )

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
            self["keys"], origin = resolveKeys(self["api-key"], self["api-key-file"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        warning = shortKeyWarning(self["keys"], origin)
        if warning is not None:
            print(warning, file=sys.stderr, flush=True)
        modelOptions = [
            name for name in ("base-url", "model", "provider-key-file",
                              "system-prompt", "system-prompt-file", "providers")
            if self[name] is not None
        ]
        if self["providers"] is not None and self["responder"] == "none":
            self["responder"] = "openai"
        if modelOptions and self["responder"] not in ("openai", "anthropic"):
            raise usage.UsageError(
                f"--{modelOptions[0]} needs --responder openai or anthropic"
            )
        if self["providers"] is not None and len(modelOptions) > 1:
            raise usage.UsageError(
                "--providers names every provider's settings: give no"
                f" --{[n for n in modelOptions if n != 'providers'][0]} with it"
            )
        if self["data-dir"] is None:
            self["data-dir"] = defaultDataDir()
        self["database-password"] = None
        if self["database"] is not None:
            from chatweb.store._postgresql import isPostgreSQL

            if not isPostgreSQL(self["database"]):
                raise usage.UsageError(
                    "--database must be a postgresql:// DSN (SQLite is the default,"
                    " in --data-dir)"
                )
            if self["database-password-file"] is not None:
                try:
                    self["database-password"] = readSecretFile(
                        self["database-password-file"], "--database-password-file"
                    )
                except ConfigError as e:
                    raise usage.UsageError(str(e))
        elif self["database-password-file"] is not None:
            raise usage.UsageError("--database-password-file needs --database")
        if self["listen"] is None:
            from twisted.internet.endpoints import quoteStringArgument

            self["listen"] = "tcp:%d:interface=%s" % (
                self["port"],
                quoteStringArgument(self["host"]),
            )
        self["listen"] = withBacklog(self["listen"])


#: The numeric options: their type and least value.
_NUMBERS = {
    "interval": (float, 0.1),
    "model-timeout": (float, 0.1),
    "history-budget": (int, 100),
    "lease-ttl": (float, 1.0),
    "page-workers": (int, 0),
    "max-attempts": (int, 1),
    "delivery-timeout": (float, 0),
    "shutdown-timeout": (float, 0),
    "max-body": (int, 64),
    "max-content": (int, 1),
    "max-header-size": (int, 1024),
    "request-timeout": (float, 0.1),
    "idle-timeout": (float, 0.1),
    "max-pending-per-session": (int, 1),
    "max-pending": (int, 1),
    "rate-limit": (float, 0),
    "rate-burst": (int, 1),
    "max-connections": (int, 1),
}


def _numberOption(name: str, kind: type, minimum: float) -> Any:
    def option(self: Options, value: str) -> None:
        self._number(name, value, kind, minimum)

    return option


for _name, (_kind, _minimum) in _NUMBERS.items():
    setattr(Options, "opt_" + _name.replace("-", "_"), _numberOption(_name, _kind, _minimum))


def makeService(options: Options) -> Any:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from chatweb.config import DATABASE_NAME

    try:
        ensureDataDir(options["data-dir"])
        if options["database"] is None:
            checkDatabase(os.path.join(options["data-dir"], DATABASE_NAME))
    except ConfigError as e:
        _exit(str(e))
    try:
        serverFromString(reactor, options["listen"])
    except Exception as e:
        _exit(f"bad --listen endpoint {options['listen']!r}: {e}")
    if options["metrics-listen"] is not None:
        try:
            serverFromString(reactor, options["metrics-listen"])
        except Exception as e:
            _exit(f"bad --metrics-listen endpoint {options['metrics-listen']!r}: {e}")
    from chatweb.web._api import normalizeAllowedHost

    allowedHosts = list(options["allowed-hosts"])
    for name in allowedHosts:
        try:
            normalizeAllowedHost(name)
        except ValueError as e:
            _exit(f"--allowed-host: {e}")
    if options["host"] not in ("0.0.0.0", "::", ""):
        allowedHosts.append(options["host"])
    try:
        service = _makeService(options, allowedHosts)
    except ConfigError as e:
        _exit(str(e))
    _FreezeAtStart().setServiceParent(service)
    # Listen now, before twistd writes its pidfile or daemonizes: a port in
    # use is then the same one line and exit status with or without -n, and
    # leaves no pidfile behind.
    service.privilegedStartService()
    return service


class _FreezeAtStart(Service):
    """
    Once everything has started, moves the objects that exist then (the
    modules, the wiring: they live as long as the process) out of the cyclic
    garbage collector's sight (C{gc.freeze}).  Under load, its full
    collections went through all of them and held the reactor for 20 to
    37 ms twice a second (bench/table.py, reactor stall); after, 2 ms.
    And puts the reactor's thread before the reading and rendering threads
    (L{chatweb._priority}).  Only for the twistd plugin: chatweb's own
    process.
    """

    def startService(self) -> None:
        import gc

        from chatweb._priority import favourTheReactor

        super().startService()
        gc.collect()
        gc.freeze()
        favourTheReactor()


def _makeService(options: Options, allowedHosts: list[str]) -> Any:
    from chatweb.queue._queue import RetryPolicy
    from chatweb.service import ChatWebService

    responder: Any = options["responder"]
    if responder in ("openai", "anthropic"):
        from chatweb.backends.responders import makeResponder
        from twisted.internet import reactor

        if options["providers"] is not None:
            responder = makeResponder(
                responder, reactor, providersFile=options["providers"],
                historyBudget=options["history-budget"],
            )
        else:
            responder = makeResponder(
                responder,
                reactor,
                baseUrl=options["base-url"],
                model=options["model"],
                keyFile=options["provider-key-file"],
                systemPrompt=options["system-prompt"],
                systemPromptFile=options["system-prompt-file"],
                timeout=options["model-timeout"],
                historyBudget=options["history-budget"],
            )
    return ChatWebService(
        apiKeys=options["keys"],
        dataDir=options["data-dir"],
        endpoint=options["listen"],
        responder=responder,
        interval=options["interval"],
        accessLog=bool(options["access-log"]),
        logEachMessage=bool(options["log-each-message"]),
        limits=options.limits(),
        retry=RetryPolicy(maxAttempts=options["max-attempts"]),
        deliveryTimeout=options["delivery-timeout"] or None,
        shutdownTimeout=options["shutdown-timeout"],
        exitOnFailure=True,
        allowedHosts=allowedHosts,
        metricsEndpoint=options["metrics-listen"],
        database=options["database"],
        databasePassword=options["database-password"],
        leaseTTL=options["lease-ttl"],
        pageWorkers=options["page-workers"],
    )


__all__ = ["Options", "makeService"]

