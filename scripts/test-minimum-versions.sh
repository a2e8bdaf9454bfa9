#!/bin/sh
# Run a fast part of the test suite once more in .venv-min, a venv pinned to
# every minimum version that setup.cfg declares (install_requires `>=`), so a
# declared minimum is one that really works.  Used by .ci/run.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV_MIN:-.venv-min}

# "twisted>=24.11.0" -> "twisted==24.11.0", for each install_requires line.
PINS=$(sed -n '/^install_requires =/,/^\[/p' setup.cfg | sed -n 's/^ *\([A-Za-z0-9_.-]*\)>=\([0-9.]*\).*/\1==\2/p')
if [ -z "$PINS" ]; then
    echo "test-minimum-versions: no minimum versions found in setup.cfg" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC2086
"$VENV/bin/pip" install --quiet --disable-pip-version-check $PINS pytest hypothesis
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall .
echo "test-minimum-versions: $(echo $PINS)"

# The fast part: everything but the real browser, the wheel build, the
# schemathesis run (its own dependencies) and the
# long end-to-end runs of twistd.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests \
    --ignore=tests/test_browser.py \
    --ignore=tests/test_packaging.py \
    --ignore=tests/test_twistd.py \
    --ignore=tests/test_openapi.py
