"""
Run the tests in a temporary directory, as trial does: TestCase.mktemp()
makes relative paths, which must not land in the source tree.  HOME and
XDG_DATA_HOME point into it too, so that nothing a test runs (twistd
without --data-dir, python -m chatweb ensure-key, ...) writes to the real
home directory.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _inTemporaryDirectory(tmp_path_factory):  # type: ignore[no-untyped-def]
    previous = os.getcwd()
    saved = {name: os.environ.get(name) for name in ("HOME", "XDG_DATA_HOME")}
    home = tmp_path_factory.mktemp("home")
    os.environ["HOME"] = str(home)
    os.environ["XDG_DATA_HOME"] = str(home / ".local" / "share")
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(previous)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
