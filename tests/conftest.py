"""
Run the tests in a temporary directory, as trial does: TestCase.mktemp()
makes relative paths, which must not land in the source tree.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _inTemporaryDirectory(tmp_path_factory):  # type: ignore[no-untyped-def]
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(previous)
