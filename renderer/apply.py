"""Applying a changed file: a graceful HAProxy reload through the master CLI, or a user command.

A reload is confirmed by HAProxy itself (`Success=1` and a new worker in `show proc`). Reloads
closer together than `min_reload_interval` wait for it, so bursts cannot pile up old workers.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass

from renderer.config import Config, TemplateSpec
from renderer.errors import ReloadError
from renderer.haproxy import MasterCLI

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyOutcome:
    kind: str  # "reload", "command" or "none"
    duration_s: float
    detail: str = ""


class Applier:
    """Knows how to apply each template's change: reload HAProxy, run its command, or nothing."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._master = MasterCLI(config.haproxy_master_socket) if config.haproxy_master_socket else None
        self._last_reload = 0.0
        self.reloads = 0

    @property
    def master(self) -> MasterCLI | None:
        return self._master

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        if spec.command:
            return self._run_command(spec)
        if spec.haproxy and self._master is not None:
            return self.reload()
        return ApplyOutcome("none", 0.0)

    def reload(self) -> ApplyOutcome:
        assert self._master is not None
        gap = time.monotonic() - self._last_reload
        if gap < self._config.min_reload_interval:
            time.sleep(self._config.min_reload_interval - gap)
        result = self._master.reload()
        self._last_reload = time.monotonic()
        self.reloads += 1
        log.info("HAProxy reloaded in %.0f ms (worker %s)", result.duration_s * 1000, result.worker_pid)
        return ApplyOutcome("reload", result.duration_s, f"worker {result.worker_pid}")

    @staticmethod
    def _run_command(spec: TemplateSpec) -> ApplyOutcome:
        assert spec.command is not None
        started = time.monotonic()
        try:
            proc = subprocess.run(
                spec.command, shell=True, capture_output=True, text=True, timeout=spec.command_timeout
            )
        except subprocess.TimeoutExpired as err:
            raise ReloadError(
                f"command `{spec.command}` for {spec.destination} took longer than {spec.command_timeout:.0f}s"
            ) from err
        duration = time.monotonic() - started
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            raise ReloadError(f"command `{spec.command}` for {spec.destination} failed ({proc.returncode}): {output}")
        log.info("ran `%s` for %s in %.0f ms", spec.command, spec.destination, duration * 1000)
        return ApplyOutcome("command", duration)
