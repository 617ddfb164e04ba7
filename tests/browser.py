"""A real browser for the tests: Debian's headless Chromium, driven by Playwright, with real-time waits.

Playwright's own browser downloads are never used: it launches the system's `chromium` through
`executable_path` (installed from Debian when missing and root may). Every wait is a real-time
wait for what the test looks for (`--virtual-time-budget` never fires on pages that keep a request
open, as the Consul UI's long polls do). Pages are never waited on for "network idle" either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

from lab import CHECKOUT

CHROMIUM = "chromium"
SCREENSHOTS = CHECKOUT / ".run" / "screenshots"


def chromium_unavailable() -> str | None:
    """None when Chromium is there (installed from Debian if need be), else why not."""
    if shutil.which(CHROMIUM):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "no chromium, and no root apt-get to install Debian's chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", CHROMIUM]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        subprocess.run(install, env=env, capture_output=True, timeout=900)
    return None if shutil.which(CHROMIUM) else "Debian's chromium could not be installed"


@dataclass
class Session:
    """One browser and what its pages said: console errors, page errors and every URL requested."""

    browser: Browser
    errors: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)

    def page(self, width: int = 1280, height: int = 900, credentials: tuple[str, str] | None = None) -> Page:
        context = self.browser.new_context(
            viewport={"width": width, "height": height},
            http_credentials={"username": credentials[0], "password": credentials[1]} if credentials else None,
        )
        page = context.new_page()
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.requested.append(request.url))
        return page

    def text_of(self, url: str, until: str, timeout: float = 30.0) -> str:
        """Load `url` and return the page's text once it contains `until` (a Playwright timeout otherwise)."""
        page = self.page()
        try:
            page.goto(url, wait_until="commit")
            wait_for_text(page, until, timeout)
            return page.inner_text("body")
        finally:
            page.context.close()


def wait_for_text(page: Page, text: str, timeout: float = 30.0, selector: str = "body") -> None:
    """Wait, in real time, until the element `selector` shows `text`."""
    page.wait_for_function(
        "([selector, text]) => { const node = document.querySelector(selector); "
        "return !!node && node.innerText.includes(text); }",
        arg=[selector, text],
        timeout=timeout * 1000,
        polling=100,
    )


@contextmanager
def chromium() -> Iterator[Session]:
    """A headless Debian Chromium for one test (a Playwright error carries the browser's own log)."""
    executable = shutil.which(CHROMIUM)
    assert executable is not None, "chromium_unavailable() first"
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield Session(browser)
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    """A full-page screenshot kept under .run/screenshots/ (after the test, for people to look at)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    return path
