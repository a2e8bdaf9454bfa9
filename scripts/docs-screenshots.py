"""
Make docs/preview-1440.png and docs/preview-375.png: the page of the
tools-and-reasoning fixture in headless Chromium, the way the browser test
loads it (tests/test_browser.py), cut to a size fit for the repository.

    .venv/bin/python scripts/docs-screenshots.py
"""

from __future__ import annotations

import base64
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import test_browser  # noqa: E402

SHOTS = [
    # width, height of the part shown (from the top), file
    (1440, 1560, "preview-1440.png"),
    (375, 1400, "preview-375.png"),
]


class _Shooter(test_browser.BrowserTests):
    def runTest(self) -> None:
        for width, height, name in SHOTS:
            self.load("/tools-and-reasoning", width)
            self.driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1,
                 "mobile": width < 600},
            )
            shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
            path = os.path.join(ROOT, "docs", name)
            with open(path, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            print(f"{path}: {os.path.getsize(path) // 1024} KiB")


if __name__ == "__main__":
    shooter = _Shooter()
    shooter.setUp()
    try:
        shooter.runTest()
    finally:
        shooter.doCleanups()
