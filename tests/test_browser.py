"""
The preview in a real browser: headless Chromium loads the page of every
fixture session at a phone's width (375 px) and a desktop's (1440 px), from
a server on 127.0.0.1 that sends the page's real security headers.

The page must not scroll sideways, must log no console error (a blocked
script, style or load breaks the Content-Security-Policy and shows up
there), and must keep its scrolling boxes working.  Screenshots land in
screenshots/ (git-ignored) for a human to look at.

Skipped when Chromium, chromedriver or selenium are missing, unless
CHATWEB_REQUIRE_BROWSER=1 (as in CI), where that is a failure;
scripts/ensure-browser.sh installs them.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from chatweb.importer import readSessionFile
from chatweb.render._preview import SECURITY_HEADERS, renderIndex, renderSession
from chatweb.testing import twistdCommand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SCREENSHOTS = os.path.join(ROOT, "screenshots")
WIDTHS = (375, 1440)
HEIGHT = 900

CHROMIUM = os.environ.get("CHATWEB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHATWEB_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
]


def _missing() -> str | None:
    """
    Why the browser test cannot run here, or None.
    """
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found: run scripts/ensure-browser.sh (as root) to install chromium and chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


def _pages() -> dict[str, str]:
    """
    The page of each fixture, by URL path; and the index of them.
    """
    pages: dict[str, str] = {}
    links: dict[str, str] = {}
    ids = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.json"))):
        session = readSessionFile(path)
        name = os.path.basename(path)[: -len(".json")]
        pages[f"/{name}"] = renderSession(session)
        links[session.id] = f"/{quote(name)}"
        ids.append(session.id)
    pages["/index"] = renderIndex(ids, links)
    return pages


class _PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages = pages
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _PageServer

    def do_GET(self) -> None:
        page = self.server.pages.get(self.path)
        if page is None:
            self.send_error(404)
            return
        body = page.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name.decode("ascii"), value.decode("ascii"))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Browser(SynchronousTestCase):
    """
    A headless Chromium for a test, with the checks the tests share.
    """

    def setUp(self) -> None:
        reason = _missing()
        if reason is not None:
            if os.environ.get("CHATWEB_REQUIRE_BROWSER") == "1":
                self.fail(f"CHATWEB_REQUIRE_BROWSER=1 but {reason}")
            raise SkipTest(reason)
        self.server = _PageServer(_pages())
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.driver = self.startBrowser()
        os.makedirs(SCREENSHOTS, exist_ok=True)

    def startBrowser(self) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        profile = tempfile.mkdtemp(prefix="chatweb-chromium-")
        self.addCleanup(shutil.rmtree, profile, ignore_errors=True)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size=1440,{HEIGHT}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.addCleanup(driver.quit)
        return driver

    def load(self, path: str, width: int) -> None:
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": width < 600},
        )
        self.driver.get(self.server.url + path)

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def consoleErrors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, name: str) -> None:
        """
        The first screen, and the whole page (a tall viewport, then back).
        """
        with open(os.path.join(SCREENSHOTS, f"{name}-top.png"), "wb") as f:
            f.write(self.driver.get_screenshot_as_png())
        width = self.js("return window.innerWidth")
        height = min(self.js("return document.documentElement.scrollHeight"), 12000)
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        with open(os.path.join(SCREENSHOTS, f"{name}.png"), "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    def assertFits(self, what: str, width: int) -> None:
        # A phone's browser widens the layout viewport (zooming out) to fit
        # content that is too wide: that is sideways scrolling too.
        self.assertEqual(
            self.js("return window.innerWidth"), width, f"{what}: the layout is wider than the screen"
        )
        scrollWidth, innerWidth, bodyWidth = self.js(
            "return [document.documentElement.scrollWidth, window.innerWidth,"
            " document.body.scrollWidth]"
        )
        self.assertLessEqual(scrollWidth, innerWidth, f"{what}: the page scrolls sideways")
        self.assertLessEqual(bodyWidth, innerWidth, f"{what}: the body is wider than the window")
        # Name the culprits, if any: elements sticking out of the viewport.
        wide = self.js(
            "return [...document.querySelectorAll('body *')].filter(e => {"
            " const r = e.getBoundingClientRect();"
            " return r.width && r.right > window.innerWidth + 0.5 &&"
            " !e.closest('pre, .table-wrap, .prompt, details .content'); })"
            ".slice(0, 5).map(e => e.tagName + '.' + e.className)"
        )
        self.assertEqual(wide, [], f"{what}: elements wider than the window")

    def checkPage(self, name: str) -> None:
        for width in WIDTHS:
            what = f"{name} at {width}px"
            self.load(f"/{name}", width)
            self.assertFits(what, width)
            self.assertEqual(self.consoleErrors(), [], what)
            self.screenshot(f"{name}-{width}")



class BrowserTests(_Browser):
    def test_fixturesFitAndLogNoErrors(self) -> None:
        for path in sorted(glob.glob(os.path.join(FIXTURES, "*.json"))):
            self.checkPage(os.path.basename(path)[: -len(".json")])
        self.checkPage("index")

    def test_scrollingBoxesAndCollapsedThinking(self) -> None:
        """
        What scrolls, scrolls inside its box; the thinking stays closed
        until clicked.
        """
        for width in WIDTHS:
            self.load("/tools-and-reasoning", width)
            # The long line of the fixture's code scrolls inside its block.
            overflowing = self.js(
                "return [...document.querySelectorAll('pre.highlight')]"
                ".filter(p => p.scrollWidth > p.clientWidth + 1).length"
            )
            self.assertGreaterEqual(overflowing, 2, width)
            # The system prompt is taller than its box, which scrolls.
            self.assertTrue(self.js(
                "const p = document.querySelector('.prompt');"
                " return p.scrollHeight > p.clientHeight &&"
                " getComputedStyle(p).overflowY === 'auto'"
            ), width)
            thinking = self.driver.find_elements("css selector", "details.reasoning .content")
            self.assertEqual([t.is_displayed() for t in thinking], [False, False])
            self.driver.find_element("css selector", "details.reasoning summary").click()
            self.assertTrue(thinking[0].is_displayed())
            self.assertFits(f"thinking open at {width}px", width)
            # The three roles each have their own colour.
            colours = self.js(
                "return ['user', 'assistant', 'tool'].map(r =>"
                " getComputedStyle(document.querySelector('.badge.' + r)).backgroundColor)"
            )
            self.assertEqual(len(set(colours)), 3, colours)


class RealServiceBrowserTests(_Browser):
    """
    The same checks through the real C{twistd -n chatweb}: the fixtures
    imported with C{python -m chatweb import}, an index share link asked for
    over the API, and every page opened by following its links, with
    chatweb's own headers, Host check and Content-Security-Policy.
    """

    def startChatweb(self, dataDir: str) -> str:
        env = dict(os.environ, CHATWEB_API_KEY="browser-test-key")
        process = subprocess.Popen(
            twistdCommand()
            + ["-n", "--pidfile=", "chatweb", "--data-dir", dataDir,
               "--listen", "tcp:0:interface=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.terminate)
        assert process.stdout is not None
        for _ in range(200):
            line = process.stdout.readline()
            match = re.search(rb"chatweb listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                threading.Thread(target=process.stdout.read, daemon=True).start()
                return f"http://127.0.0.1:{int(match.group(1))}"
            if not line:
                break
        self.fail("chatweb did not start")

    def test_fixturesThroughShareLinks(self) -> None:
        dataDir = tempfile.mkdtemp(prefix="chatweb-browser-")
        self.addCleanup(shutil.rmtree, dataDir, ignore_errors=True)
        fixtures = sorted(glob.glob(os.path.join(FIXTURES, "*.json")))
        subprocess.run(
            [sys.executable, "-m", "chatweb", "import", "--data-dir", dataDir, *fixtures],
            check=True, capture_output=True, timeout=120,
        )
        base = self.startChatweb(dataDir)
        request = urllib.request.Request(
            base + "/sessions/share", data=b"{}", method="POST",
            headers={"X-API-Key": "browser-test-key"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            indexURL = base + json.load(response)["url"]
        for width in WIDTHS:
            self.driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": width < 600},
            )
            self.driver.get(indexURL)
            self.assertFits(f"index at {width}px", width)
            links = [a.get_attribute("href") for a in self.driver.find_elements("css selector", "main a")]
            self.assertEqual(len(links), len(fixtures), links)
            for link in links:
                self.driver.get(link)
                what = f"{link} at {width}px"
                self.assertIn("message", self.driver.find_element("css selector", "body").text, what)
                self.assertFits(what, width)
                self.assertEqual(self.consoleErrors(), [], what)
