"""Template files edited on disk are picked up while running (watchdog), through the SIGHUP path.

A change is compiled before it replaces anything: a template with a syntax error is reported and
the running one is kept; the corrected file is picked up by the next change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)


TEMPLATE_SUFFIXES = (".j2", ".jinja", ".jinja2", ".tmpl", ".tpl")


class _Handler(FileSystemEventHandler):
    """Only the template files themselves and template-like files beside them (includes) count:
    a directory may hold anything else, the renderer's own log included."""

    def __init__(self, sources: set[Path], notify: Callable[[str], None]) -> None:
        self._sources = sources
        self._directories = {p.parent for p in sources}
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("modified", "created", "moved"):
            return
        path = Path(str(getattr(event, "dest_path", "") or event.src_path))
        if path in self._sources or (path.parent in self._directories and path.suffix in TEMPLATE_SUFFIXES):
            self._notify(str(path))


class TemplateFileWatcher:
    """Calls `on_change` on the event loop when a file in a template's directory changes."""

    def __init__(self, sources: Iterable[Path], on_change: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        resolved = {p.resolve() for p in sources}
        directories = {p.parent for p in resolved}

        def notify(path: str) -> None:
            log.info("template file changed: %s", path)
            loop.call_soon_threadsafe(on_change)

        self._observer = Observer()
        handler = _Handler(resolved, notify)
        for directory in directories:
            self._observer.schedule(handler, str(directory), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
