"""Headless Chromium (Debian's `chromium`) driven through the DevTools protocol, with real-time waits.

`--virtual-time-budget` never fires on the Consul UI (its long-poll requests stay pending), so a
page is loaded with `Page.navigate` and its text polled with `Runtime.evaluate` until it shows what
the test waits for, or a deadline passes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from lab.processes import free_port

CHROMIUM = "chromium"


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


class Browser:
    """One headless Chromium and one page; `text_of(url, until)` returns the page's text."""

    def __init__(self, log_path: Path) -> None:
        self._port = free_port()
        self._profile = tempfile.mkdtemp(prefix="chromium-")
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={self._port}", f"--user-data-dir={self._profile}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def text_of(self, url: str, until: str, timeout: float = 30.0) -> str:
        """Load `url` and return the page's text once it contains `until` (TimeoutError otherwise)."""
        return asyncio.run(asyncio.wait_for(self._text_of(url, until, timeout), timeout + 15))

    async def _text_of(self, url: str, until: str, timeout: float) -> str:
        async with aiohttp.ClientSession() as session:
            ws_url = await self._page(session)
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                counter = iter(range(1, 1_000_000))

                async def call(method: str, **params: Any) -> dict[str, Any]:
                    number = next(counter)
                    await ws.send_json({"id": number, "method": method, "params": params})
                    while True:
                        message: dict[str, Any] = await ws.receive_json()
                        if message.get("id") == number:
                            return message

                await call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout
                text = ""
                while time.monotonic() < deadline:
                    answer = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
                    text = str(answer.get("result", {}).get("result", {}).get("value", ""))
                    if until in text:
                        return text
                    await asyncio.sleep(0.3)
                raise TimeoutError(f"{url} never showed {until!r} within {timeout:.0f}s; it shows:\n{text[:2000]}")

    async def _page(self, session: aiohttp.ClientSession) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{self._port}/json/list") as response:
                    pages = [p for p in await response.json() if p.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError("Chromium's DevTools endpoint did not come up")
