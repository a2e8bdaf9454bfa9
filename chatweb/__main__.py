"""
The C{chatweb} command (also C{python -m chatweb}): the client commands of
L{chatweb.cli} (send, sessions, show, follow, status, share), and the
helper commands C{ensure-key [--data-dir DIR]} and C{import PATH...
[--data-dir DIR] [--replace]}, where each PATH is a chat.nvim session file
or a directory of them (chat.nvim's sessions directory).

A command either sets C{run} (a function of the parsed arguments that
returns the exit status; see L{chatweb.cli.addClientCommands}) or is
dispatched by name below.

C{python -m chatweb migrate --to postgresql://... [--data-dir DIR]
[--database-password-file FILE]} moves a SQLite store into PostgreSQL.

(The service itself runs as C{twistd -n chatweb}.)
"""

from __future__ import annotations

import argparse
import sys

from chatweb.config import ConfigError, defaultDataDir, ensureKeyFile, readSecretFile


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command's reactor runs (while it imports): one
        # line too, and the shell's status for it.
        print("chatweb: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from chatweb.cli import addClientCommands, addClientOptions, clientOptionsGiven

    parser = argparse.ArgumentParser(
        prog="chatweb",
        description="chatweb: push messages into chat sessions over HTTP"
        " (chat.nvim's HTTP API), as a Twisted service.  The service runs as"
        " `twistd -n chatweb` (see `twistd chatweb --help`); these are its"
        " client and helper commands.  The client commands take the server"
        " from --url or $CHATWEB_URL and the key from --key-file or"
        " $CHATWEB_API_KEY.",
    )
    parser.add_argument("--version", action="version", version=_version())
    addClientOptions(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser(
        "ensure-key",
        help="create a random API key file in the data directory unless one"
        " exists, and print its path (never the key)",
    )
    ensure.add_argument("--data-dir", default=None)
    load = commands.add_parser(
        "import",
        help="import chat.nvim session files (JSON), or whole directories of"
        " them, into the default backend",
    )
    load.add_argument(
        "files",
        nargs="+",
        metavar="PATH",
        help="a session file, or a directory whose *.json files are imported"
        " (chat.nvim's sessions directory)",
    )
    load.add_argument("--data-dir", default=None)
    load.add_argument(
        "--replace",
        action="store_true",
        help="overwrite sessions that already exist (default: skip them)",
    )
    migrate = commands.add_parser(
        "migrate",
        help="copy the data directory's SQLite store (sessions, the queue with"
        " its pending and failed messages, the event log) into an empty"
        " PostgreSQL database; stop chatweb first",
    )
    migrate.add_argument("--to", required=True, metavar="postgresql://USER@HOST:PORT/DB",
                         help="the target; the password from $PGPASSWORD,"
                         " --database-password-file, or the DSN")
    migrate.add_argument("--data-dir", default=None)
    migrate.add_argument("--database-password-file", default=None)
    addClientCommands(commands)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is not None:
        return int(args.run(args))
    given = clientOptionsGiven(args)
    if given:
        parser.error(f"{', '.join(given)}: options of the client commands, not of {args.command}")
    if args.command == "migrate":
        return _migrate(args.data_dir or defaultDataDir(), args.to,
                        args.database_password_file)
    if args.command == "import":
        return _import(args.files, args.data_dir or defaultDataDir(), args.replace)
    if args.command == "ensure-key":
        try:
            path, created = ensureKeyFile(args.data_dir or defaultDataDir())
        except ConfigError as e:
            print(f"chatweb: {e}", file=sys.stderr)
            return 1
        if created:
            print(f"chatweb: created a new API key in {path}", file=sys.stderr)
        print(path)
    return 0


def _version() -> str:
    from twisted import version as twistedVersion

    from chatweb.tap import version

    return f"chatweb {version()} (Twisted {twistedVersion.short()})"


def _import(files: list[str], dataDir: str, replace: bool) -> int:
    from chatweb.cli import runWithReactor
    from chatweb.importer import runImport

    status: list[int] = [1]

    async def run(reactor: object) -> None:
        try:
            status[0] = await runImport(reactor, files, dataDir, replace)
        except ConfigError as e:
            print(f"chatweb: {e}", file=sys.stderr)

    return runWithReactor(run, status)


def _migrate(dataDir: str, dsn: str, passwordFile: str | None) -> int:
    from chatweb.cli import runWithReactor
    from chatweb.migrate import runMigrate
    from chatweb.store._postgresql import isPostgreSQL, redact

    if not isPostgreSQL(dsn):
        print("chatweb: --to must be a postgresql:// DSN", file=sys.stderr)
        return 2
    password = None
    if passwordFile is not None:
        try:
            password = readSecretFile(passwordFile, "--database-password-file")
        except ConfigError as e:
            print(f"chatweb: {e}", file=sys.stderr)
            return 1
    status: list[int] = [1]

    async def run(reactor: object) -> None:
        try:
            counts = await runMigrate(reactor, dataDir, dsn, password)
        except ConfigError as e:
            print(f"chatweb: {e}", file=sys.stderr)
            return
        except Exception as e:
            # psycopg's messages name the server and user, never the password.
            print(f"chatweb: migrating to {redact(dsn)} failed: {e}", file=sys.stderr)
            return
        shown = ", ".join(f"{n} {table}" for table, n in counts.items())
        print(f"chatweb: copied {shown} from {dataDir} to {redact(dsn)}")
        status[0] = 0

    return runWithReactor(run, status)


if __name__ == "__main__":
    sys.exit(main())
