"""Template files edited on disk reach the loop (watchdog, a thread) through a callback on the loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from renderer.render.files import TemplateFileWatcher


def test_an_edit_of_a_template_calls_back_on_the_loop(tmp_path: Path) -> None:
    template = tmp_path / "haproxy.cfg.j2"
    template.write_text("a\n")

    async def scenario() -> int:
        calls: list[None] = []
        changed = asyncio.Event()

        def on_change() -> None:
            calls.append(None)
            changed.set()

        watcher = TemplateFileWatcher([template], on_change)
        try:
            template.write_text("b\n")
            await asyncio.wait_for(changed.wait(), 10)
        finally:
            watcher.stop()
        return len(calls)

    assert asyncio.run(scenario()) >= 1
