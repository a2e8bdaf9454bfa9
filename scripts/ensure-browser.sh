#!/bin/sh
# Make sure the real-browser test (tests/test_browser.py) can run: install
# Debian's chromium and chromium-driver (and a small CJK font, so that
# screenshots of CJK text are legible) when they are missing.
#
# Idempotent and quiet: does nothing when they are there.  Installs only when
# running as root with apt-get; otherwise prints a note and exits 0 (the test
# then skips, unless CHATWEB_REQUIRE_BROWSER=1).
set -eu

CHROMIUM=${CHATWEB_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${CHATWEB_CHROMEDRIVER:-/usr/bin/chromedriver}
PACKAGES="chromium chromium-driver fonts-wqy-microhei"

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-browser: $CHROMIUM or $CHROMEDRIVER is missing; the browser test will be skipped." >&2
    echo "ensure-browser: install them with: sudo apt-get install -y $PACKAGES" >&2
    exit 0
fi

echo "ensure-browser: installing $PACKAGES" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# shellcheck disable=SC2086
apt-get install -y -qq $PACKAGES >/dev/null
