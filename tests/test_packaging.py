"""
The package as a user installs it: a wheel that carries the twistd plugin
and the templates, and works without this source tree.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The wheel, built once for all the tests of this module (building it is
#: most of their time).
_built: list[str] = []


def _buildWheel() -> str:
    if not _built:
        out = tempfile.mkdtemp(prefix="chatweb-wheel-")
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--no-build-isolation", "--wheel-dir", out, ROOT],
            check=True,
            capture_output=True,
            timeout=300,
        )
        [wheel] = glob.glob(os.path.join(out, "chatweb-*.whl"))
        _built.append(wheel)
    return _built[0]


class WheelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.wheel = _buildWheel()
        self.out = os.path.abspath(self.mktemp())
        os.makedirs(self.out)

    def test_wheelCarriesPluginAndTemplates(self) -> None:
        names = zipfile.ZipFile(self.wheel).namelist()
        self.assertIn("twisted/plugins/chatweb_plugin.py", names)
        self.assertIn("chatweb/render/templates/session.html", names)
        # Typed: a user's mypy reads chatweb's hints (PEP 561).
        self.assertIn("chatweb/py.typed", names)
        for package in (
            "web", "render", "model", "store", "queue", "testing", "backends", "client"
        ):
            self.assertIn(f"chatweb/{package}/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([n for n in names if n.startswith("tests/")])

    def test_wheelInstallsTheChatwebCommand(self) -> None:
        wheel = zipfile.ZipFile(self.wheel)
        [entryPoints] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = wheel.read(entryPoints).decode()
        self.assertIn("[console_scripts]", text)
        self.assertIn("chatweb = chatweb.__main__:main", text)

    def test_twistdFindsPluginFromWheelAlone(self) -> None:
        """
        With only the unpacked wheel and the dependencies on the path (no
        source tree, no editable install), twistd lists chatweb and the
        templates load.
        """
        unpacked = os.path.join(self.out, "unpacked")
        zipfile.ZipFile(self.wheel).extractall(unpacked)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [unpacked, sysconfig.get_paths()["purelib"]]))
        # -S: no site, so no .pth puts the source tree on the path.
        script = (
            "import sys, chatweb, chatweb.render._preview as p;"
            "assert chatweb.__file__.startswith(sys.argv[1]), chatweb.__file__;"
            "from chatweb.model import Session;"
            "assert 'x-session' in p.renderSession(Session(id='x-session'));"
            "from twisted.scripts.twistd import run;"
            "sys.argv = ['twistd', '--help']; run()"
        )
        result = subprocess.run(
            [sys.executable, "-S", "-c", script, unpacked],
            capture_output=True, text=True, env=env, cwd=self.out, timeout=120,
        )
        self.assertIn("chatweb", result.stdout, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
