#!/bin/sh
# Make sure the PostgreSQL tests (tests/postgres.py starts a throwaway
# cluster with initdb and pg_ctl) can run: install Debian's postgresql
# package when initdb is missing.  The cluster Debian's package creates is
# not used (nor started) by the tests.
#
# Idempotent and quiet: does nothing when initdb is there.  Installs only when
# running as root with apt-get; otherwise prints a note and exits 0 (the tests
# then skip, unless CHATWEB_REQUIRE_POSTGRES=1).
set -eu

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgresql: initdb is missing; the PostgreSQL tests will be skipped." >&2
    echo "ensure-postgresql: install it with: sudo apt-get install -y postgresql" >&2
    exit 0
fi

echo "ensure-postgresql: installing postgresql" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq postgresql >/dev/null
