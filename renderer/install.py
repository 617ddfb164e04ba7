"""Installing one rendered file and applying it: the write path's last two stages.

Two paths, chosen per change:
- hitless: only server lines changed (see runtime.py). `haproxy -c` on the staged file and the
  Runtime API changes run side by side; the file is swapped in only once the check passed, so
  the file on disk always ends equal to what HAProxy runs. A file that fails the check is never
  installed and its runtime changes are undone; a runtime step HAProxy refuses falls back to a
  reload of the checked file.
- validate → swap → apply: everything else (a reload, the template's command, or the first start
  of HAProxy in exec mode).
An apply that fails leaves the file installed and `ApplyState.pending`: it is retried with a
doubling backoff, and HAProxy is reloaded (not patched) at the retry, since what it runs is then
unknown.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from renderer.apply import Applier
from renderer.config import TemplateSpec
from renderer.errors import ReloadError, WriteError
from renderer.haproxy import check_config, check_new_binds
from renderer.runtime import ServerChange
from renderer.status import Status
from renderer.supervise import HAProxyChild
from renderer.write import StagedFile, Validator, command_validator, live_bytes, write_atomically

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0


@dataclass
class ApplyState:
    """Per template: an installed file whose apply failed, retried with backoff."""

    pending: bool = False
    retry_delay: float = RETRY_BASE_S
    retry_at: float = 0.0

    @property
    def backing_off(self) -> bool:
        return self.pending and time.monotonic() < self.retry_at

    def failed(self, destination: Path) -> None:
        self.retry_at = time.monotonic() + self.retry_delay
        log.warning("apply of %s failed; retrying the apply in %.1fs", destination, self.retry_delay)
        self.retry_delay = min(self.retry_delay * 2, RETRY_MAX_S)

    def succeeded(self) -> None:
        self.pending, self.retry_delay, self.retry_at = False, RETRY_BASE_S, 0.0


class Installer:
    """Installs and applies rendered files; `applier` is replaced when the configuration reloads."""

    def __init__(
        self,
        applier: Applier,
        status: Status,
        haproxy_bin: str | None,
        last_change: Callable[[], float],
        haproxy_child: HAProxyChild | None = None,
    ) -> None:
        self.applier = applier
        self._status = status
        self._haproxy_bin = haproxy_bin
        self._last_change = last_change
        self._child = haproxy_child

    async def install(self, spec: TemplateSpec, state: ApplyState, content: str) -> None:
        """Install and apply one rendered file: hitless when only servers changed, else swap + reload."""
        started = time.monotonic()
        before = live_bytes(spec.destination)
        if before == content.encode() and not state.pending:
            return
        # HAProxy runs the live file, unless an earlier apply of it is still pending.
        running = before.decode(errors="replace") if before is not None and not state.pending else None
        plan = self.applier.runtime_plan(spec, running, content) if running is not None else None
        if before is not None and running is not None and plan is not None and not self._child_to_start(spec):
            kind = await self._install_hitless(spec, state, before, content, plan)
        else:
            kind = await self._install_and_apply(spec, state, before, content)
        if kind != "none":
            done = time.monotonic()
            last_change = self._last_change()
            since_change = (done - last_change) if last_change else float("nan")
            self._status.converged(since_change)
            log.info(
                "applied %s (%s): %.0f ms after the Consul change, %.0f ms for check, swap and apply",
                spec.destination, kind, since_change * 1000, (done - started) * 1000,
            )  # fmt: skip

    async def _install_hitless(
        self, spec: TemplateSpec, state: ApplyState, before: bytes, content: str, plan: list[ServerChange]
    ) -> str:
        """Runtime API first (traffic follows at once), then stage, check and swap the file.

        The commands are sent before the slow steps (staged write, fsync, `haproxy -c`); if the
        file then fails its check or cannot be written, the commands are undone, so HAProxy ends
        running what the live file says.
        """
        running = before.decode(errors="replace")
        applying = asyncio.ensure_future(asyncio.to_thread(self.applier.apply_runtime, plan))
        staging = asyncio.ensure_future(self._stage_and_check(spec, before, content))
        applied, staged = await asyncio.gather(applying, staging, return_exceptions=True)
        if isinstance(staged, BaseException) or staged is None:
            if not isinstance(applied, BaseException):
                await asyncio.to_thread(self.applier.revert_runtime, content, running)
            if isinstance(staged, BaseException):
                raise staged
            return "none"
        try:
            await self._commit(spec, staged, running, content, plan, undo=not isinstance(applied, BaseException))
        finally:
            staged.discard()
        if isinstance(applied, ReloadError):
            log.warning("runtime update failed, falling back to a reload: %s", applied)
            state.pending = True
            return await self._apply(spec, state)
        if isinstance(applied, BaseException):
            raise applied
        self._status.applied(applied.kind)
        return applied.kind

    async def _stage_and_check(self, spec: TemplateSpec, before: bytes, content: str) -> StagedFile | None:
        staged = await asyncio.to_thread(StagedFile.create, spec.destination, content, before)
        if staged is None:
            return None
        try:
            await asyncio.to_thread(staged.validate, self.validator(spec, before))
        except BaseException:
            staged.discard()
            raise
        return staged

    async def _commit(
        self, spec: TemplateSpec, staged: StagedFile, running: str, content: str, plan: list[ServerChange], undo: bool
    ) -> None:
        shown = "; ".join(change.describe() for change in plan[:3]) + ("; …" if len(plan) > 3 else "")
        log.info("rendered %s (%d server change(s): %s)", spec.destination, len(plan), shown)
        try:
            await asyncio.to_thread(staged.commit, spec.perms, spec.backup)
        except WriteError:
            if undo:  # HAProxy must keep running what the live file says
                await asyncio.to_thread(self.applier.revert_runtime, content, running)
            raise

    async def _install_and_apply(
        self, spec: TemplateSpec, state: ApplyState, before: bytes | None, content: str
    ) -> str:
        """Validate → swap → apply (reload, command, or starting HAProxy in exec mode)."""
        written = await asyncio.to_thread(
            write_atomically, spec.destination, content, self.validator(spec, before), spec.perms, spec.backup
        )
        if written.changed:
            log.info("rendered %s (%s)", spec.destination, change_summary(before, content))
            state.pending = True
        if not state.pending:
            return "none"
        if self._child is not None and self._child_to_start(spec):
            await self._child.start(spec.destination)
            state.succeeded()
            return "start"
        return await self._apply(spec, state)

    def _child_to_start(self, spec: TemplateSpec) -> bool:
        return self._child is not None and spec.haproxy and not self._child.started

    async def _apply(self, spec: TemplateSpec, state: ApplyState) -> str:
        try:
            outcome = await asyncio.to_thread(self.applier.apply, spec)
        except ReloadError:
            state.failed(spec.destination)
            raise
        state.succeeded()
        self._status.applied(outcome.kind)
        return outcome.kind

    def validator(self, spec: TemplateSpec, running: bytes | None) -> Validator | None:
        """The template's check command, or for HAProxy outputs `haproxy -c` plus the bind pre-check
        against `running`, the live file's bytes."""
        if spec.check_command:
            return command_validator(spec.check_command, spec.command_timeout)
        if spec.haproxy and self._haproxy_bin:
            binary = self._haproxy_bin

            def validate(staged: Path) -> None:
                check_config(binary, staged)
                check_new_binds(running.decode(errors="replace") if running else None, staged.read_text())

            return validate
        return None


def change_summary(before: bytes | None, content: str) -> str:
    """`+N -M lines: + added…; - removed…`, for the log line of a render (linear time: a multiset
    difference of lines, not a diff, so a 20,000-line file costs milliseconds)."""
    if before is None:
        return f"new file, {len(content.splitlines())} lines"
    old = collections.Counter(before.decode(errors="replace").splitlines())
    new = collections.Counter(content.splitlines())
    added = [line.strip() for line in (new - old).elements()]
    removed = [line.strip() for line in (old - new).elements()]
    shown = "; ".join([f"+ {a}" for a in added[:3]] + [f"- {r}" for r in removed[:3]])
    return f"+{len(added)} -{len(removed)} lines: {shown}"
