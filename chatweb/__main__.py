"""
chatweb's helper commands: C{python -m chatweb ensure-key [--data-dir DIR]}.

(The service itself runs as C{twistd -n chatweb}.)
"""

from __future__ import annotations

import argparse
import sys

from chatweb.config import ConfigError, defaultDataDir, ensureKeyFile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatweb")
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser(
        "ensure-key",
        help="create a random API key file in the data directory unless one"
        " exists, and print its path (never the key)",
    )
    ensure.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
