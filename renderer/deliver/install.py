"""Installing one rendered file and applying it: the write path's last two stages.

Two paths, chosen per change:
- hitless: only server lines changed (see runtime.py). The Runtime API changes go out first; the
  file is staged, checked (`haproxy -c`) and swapped behind them, and only once the check passed,
  so the file on disk always ends equal to what HAProxy runs. A file that fails the check is
  never installed and its runtime changes are undone; a runtime step HAProxy refuses falls back
  to a reload of the checked file.
- validate → swap → apply: everything else (a reload, the template's command, or the first start
  of HAProxy in exec mode).
An apply that fails leaves the file installed and `ApplyState.pending`: it is retried with a
doubling backoff, and HAProxy is reloaded (not patched) at the retry, since what it runs is then
unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from renderer.commands import Hurry, Superseded
from renderer.config import TemplateSpec
from renderer.deliver.apply import HAProxySide
from renderer.deliver.busy_ports import BusyPorts
from renderer.deliver.change import ChangeKind, ConfigChange
from renderer.deliver.report import describe_apply
from renderer.deliver.runtime import ServerChange
from renderer.deliver.write import StagedFile, Validator, command_validator, live_bytes
from renderer.errors import ApplyKind, ReloadError, RendererError, ValidationError, WriteError
from renderer.haproxy.child import HAProxyChild
from renderer.haproxy.config_text import SECTION_KEYWORDS
from renderer.haproxy.control import IN_USE_REASON, BindJudge, bind_failures, check_config, check_new_binds
from renderer.status import Status

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0
WRITE_BEHIND_MAX_PAUSE_S = 2.0  # the file lags HAProxy by at most about a check plus this


class RuntimeRefused(Exception):
    """HAProxy refused a runtime step: what it runs in the plan's backends is unknown (the apply
    pending, `ApplyState.refused`), and the caller schedules the reload that settles it: in its
    turn after the files before it, and in the reload gap's turns (delivery.py)."""


@dataclass
class ApplyState:
    """Per template: an installed file whose apply failed (or, `step` "write", a file whose write
    failed), retried with backoff."""

    step: str = "apply"  # what failed and is retried, as the log says it
    pending: bool = False
    retry_delay: float = RETRY_BASE_S
    retry_at: float = 0.0
    # Pending after runtime steps HAProxy refused: what it runs but in `unknown` (the backends of
    # the refused plans), so that other backends' servers still go through the Runtime API while
    # the reload that settles it waits (delivery.py). None: all of it is unknown.
    known_running: str | None = None
    unknown: frozenset[str] = frozenset()
    # Pending after a reload HAProxy refused (it could not bind a listener): what its old workers run,
    # the base of every change until an apply succeeds (ConfigChange.serving; helper-151's D: kept
    # here, not for one delivery only, as later passes compared with the refused file again).
    serving: str | None = None

    @property
    def backing_off(self) -> bool:
        return self.pending and time.monotonic() < self.retry_at

    def failed(self, destination: Path) -> None:
        self.known_running, self.unknown = None, frozenset()  # HAProxy runs what it runs
        self.retry_at = time.monotonic() + self.retry_delay
        log.warning("%s of %s failed; retrying the %s in %.1fs", self.step, destination, self.step, self.retry_delay)
        self.retry_delay = min(self.retry_delay * 2, RETRY_MAX_S)

    def succeeded(self) -> None:
        self.pending, self.retry_delay, self.retry_at = False, RETRY_BASE_S, 0.0
        self.known_running, self.unknown, self.serving = None, frozenset(), None

    def refused(self, running: str | None, backends: frozenset[str]) -> None:
        """HAProxy refused a runtime step of a plan from `running` touching `backends`: pending
        (the next apply reloads), HAProxy known to run `running` but in those backends."""
        if not self.pending:
            self.known_running, self.unknown = running, backends if running is not None else frozenset()
        elif self.known_running is not None:
            self.unknown |= backends
        self.pending = True

    def postpone(self) -> None:
        """A retry that came due and could not be tried (nothing to deliver): due again after its
        backoff, doubled, instead of at once again and again."""
        if self.pending and self.retry_at <= time.monotonic():
            self.retry_at = time.monotonic() + self.retry_delay
            self.retry_delay = min(self.retry_delay * 2, RETRY_MAX_S)


@dataclass
class _FileJob:
    """A destination whose runtime changes went out and whose file is still being staged, checked
    and swapped behind them (write-behind): `latest` is what HAProxy runs now."""

    latest: str
    state: ApplyState  # the destination's: made pending when HAProxy could not be brought back
    task: asyncio.Task[None] | None = None
    error: RendererError | None = None
    hurry: Hurry = field(default_factory=Hurry)  # its checks run at a low priority until someone waits
    # When the oldest Consul change HAProxy runs and the file does not hold yet was told of: among
    # the contents up to the one being checked, and among those sent since its check began.
    told_checked: float | None = None
    told_after: float | None = None
    _waited: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, content: str, told: float | None) -> None:
        """HAProxy runs `content` now; `told`: when the oldest Consul change it carries was told of."""
        self.latest, self.told_after = content, _oldest(self.told_after, told)

    def written(self) -> None:
        """The file holds the content checked (and every change sent before it)."""
        self.told_checked = None

    def undone(self) -> float | None:
        """HAProxy was brought back to the live file: when the oldest change it no longer runs was
        told of (the apply that carries them again is timed from it)."""
        told, self.told_checked, self.told_after = _oldest(self.told_checked, self.told_after), None, None
        return told

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def waited_for(self) -> None:
        """Someone waits for the file now: its checks run at the normal priority, and no pause."""
        self.hurry.hurry()
        self._waited.set()

    def checking(self, content: str) -> None:
        """The write-behind checks `content` now: a check of it stopped at the low priority (hurried,
        starved) is not run again once newer content was sent (helper-127's finding 4: a reload
        behind it waited for a check of content nobody would install)."""
        self.told_checked, self.told_after = _oldest(self.told_checked, self.told_after), None
        # Through a weak reference: `lambda: self.latest == content` made the job a reference cycle,
        # each one garbage once done, frozen by the collector with the rendered file it held until
        # the full collection 10 minutes on: ~0.6 MB a second beside a registrant's 70 writes a
        # second at 1,000 services (helper-134's port attack, /tmp/s25/gc1.out).
        job = weakref.ref(self)
        self.hurry.wanted = lambda: (alive := job()) is not None and alive.latest == content

    async def pause(self, seconds: float) -> None:
        """Between two checks, unless (or until) someone waits for the file."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._waited.wait(), seconds)


def _section_kind(lines: list[str], at: int) -> str | None:
    """The kind of the section holding line `at` ("listen", "frontend", …)."""
    for line in reversed(lines[: at + 1]):
        words = line.split()
        if words and not line[:1].isspace() and words[0] in SECTION_KEYWORDS:
            return words[0]
    return None


def _tell_loaded(memories: list[tuple[BusyPorts, bool]]) -> None:
    for busy, confirmed in memories:
        busy.loaded(confirmed)


def _listeners_only(judge: BindJudge) -> BindJudge:
    """`judge` for `listen` sections only: before HAProxy's first start (exec mode) a frontend's port
    held by another program is left to HAProxy, whose start fails and the renderer's exit says so,
    as before (a frontend cannot be left out, and a file rejected for it would wait for a catalog
    change before it was tried again, HAProxy never started)."""

    def listeners(kind: str, host: str, port: int, in_use: bool) -> str | None:
        return judge(kind, host, port, in_use) if kind == "listen" else None

    return listeners


def _oldest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


FileErrorHandler = Callable[[TemplateSpec, RendererError, str], None]


class Installer:
    """Installs and applies rendered files; `applier` is replaced when the configuration reloads.

    Membership changes take the hitless path: the Runtime API commands go out at once and the file
    is staged, checked (`haproxy -c`) and swapped *behind* them, off the loop's critical path, so a
    change that arrives during a check is applied without waiting for it. While a file is behind,
    the next plan starts from what HAProxy runs (the newest content sent), and the write-behind
    always ends on the newest content. A file that fails its check (or cannot be written) is never
    installed, HAProxy is brought back to the live file, and `on_file_error` hears of it.
    """

    def __init__(
        self,
        applier: HAProxySide,
        status: Status,
        haproxy_bin: str | None,
        last_change: Callable[[Path], float | None],
        haproxy_child: HAProxyChild | None = None,
        on_file_error: FileErrorHandler | None = None,
        on_file_written: Callable[[TemplateSpec], None] | None = None,
    ) -> None:
        self.applier = applier
        self._status = status
        self._haproxy_bin = haproxy_bin
        self._last_change = last_change
        self._child = haproxy_child
        self._on_file_error = on_file_error  # None: wait for the file and raise its error (--once)
        self._on_file_written = on_file_written  # a file written behind its runtime changes
        self._jobs: dict[Path, _FileJob] = {}
        # When the oldest change HAProxy ran and a failed write-behind undid was told of: the next
        # apply of new content carries it again, and its latency counts from it (helper-127's
        # finding 6: the render had moved on, and the figure started at the newer changes only).
        self._undone_told: dict[Path, float] = {}
        self._runtime_lock = asyncio.Lock()
        self._busy: dict[Path, BusyPorts] = {}  # per destination: the ports other programs listened on
        self._master_loads: set[Path] = set()  # the HAProxy outputs the master CLI (or exec mode) loads

    def change(self, spec: TemplateSpec, state: ApplyState, content: str) -> ConfigChange:
        """`content` against what HAProxy runs: the content last sent while its file is written
        behind, else the live file (read once here), unless an earlier apply is still pending
        (unknown: None; known after a reload HAProxy refused: `state.serving`, see ConfigChange.base)."""
        if spec.haproxy:
            self._busy_ports(spec.destination)  # from the first delivery on, whatever changes
            if self.applier.apply_reloads(spec):  # exec mode's too: it needs the master socket
                self._master_loads.add(spec.destination)
            else:  # a SIGHUP may have given it a command (helper-152)
                self._master_loads.discard(spec.destination)
        if self.starts_haproxy(spec):
            # HAProxy runs nothing yet: the file is checked whole, each of its ports probed, and
            # HAProxy started on it even when the live file holds it already. A restart on a live
            # file equal to the render started no HAProxy (SAME: nothing to do), and a port a daemon
            # took while the renderer was down failed HAProxy's start, the renderer's exit with it.
            return ConfigChange.of(content, None, None, hitless=False)
        hitless = self.applier.hitless(spec)
        job = self._jobs.get(spec.destination)
        if job is not None and job.busy:  # pending: what HAProxy runs is unknown (a reload, once it is written)
            return ConfigChange.of(content, None if state.pending else job.latest, None, hitless, behind=True)
        live = live_bytes(spec.destination)
        running = live.decode(errors="replace") if live is not None and not state.pending else None
        return ConfigChange.of(content, running, live, hitless, serving=state.serving if running is None else None)

    async def install(self, spec: TemplateSpec, state: ApplyState, change: ConfigChange) -> ApplyKind:
        """Install and apply one rendered file: hitless when only servers changed, else swap + reload.
        RuntimeRefused when HAProxy refuses a runtime step (the next install of the file reloads)."""
        started = time.monotonic()
        # The changes a failed write-behind undid: this delivery carries them again, or no longer
        # (rendered equal to what runs, say, their part left out): never a later, unrelated one.
        undone = self._undone_told.pop(spec.destination, None)
        try:
            applied = await self._install(spec, state, change)
        except BaseException:
            self._undid(spec.destination, undone)  # not applied: the next delivery carries them
            raise
        if applied is None:
            return ApplyKind.NONE
        kind, change = applied
        await self._tell_status(spec, change, kind, started, undone)
        return kind

    async def _install(
        self, spec: TemplateSpec, state: ApplyState, change: ConfigChange
    ) -> tuple[ApplyKind, ConfigChange] | None:
        """`install`'s work: how it applied and the change it applied, or None when it has nothing
        to tell the status."""
        if change.kind is ChangeKind.SAME:
            if not change.behind:  # e.g. written by --once before us
                self._status.found_serving(str(spec.destination), change.content)
            return None
        if change.plan is not None:
            return await self._runtime_then_file(spec, state, change, change.plan), change
        if change.behind:  # structural: the file must catch up before a validated swap + reload
            await self.flush(spec.destination)
            return await self._install(spec, state, self.change(spec, state, change.content))
        log.debug("structural change in %s: validate, swap, apply", spec.destination)
        return await self._install_and_apply(spec, state, change), change

    async def apply_live(self, spec: TemplateSpec, state: ApplyState) -> ApplyKind:
        """Apply the live file as it is, when an apply of it is pending and not backing off (a
        reload that failed, or an undo of runtime changes that failed): new content failed its
        check, and HAProxy must still be brought to what the file says, not go on running the
        runtime steps of content that was never installed. ReloadError when the apply fails again
        (its backoff goes on)."""
        live = live_bytes(spec.destination)
        if not state.pending or state.backing_off or live is None:
            return ApplyKind.NONE
        started = time.monotonic()
        kind = await self._apply_installed(spec, state)  # the file as it is: never staged again
        change = self.change(spec, state, live.decode(errors="replace"))  # for the status, which shows text
        await self._tell_status(spec, change, kind, started)
        return kind

    def _undid(self, destination: Path, told: float | None) -> None:
        told = _oldest(told, self._undone_told.get(destination))
        if told is not None:
            self._undone_told[destination] = told

    async def _tell_status(
        self, spec: TemplateSpec, change: ConfigChange, kind: ApplyKind, started: float, undone: float | None = None
    ) -> None:
        """The status, the log and the convergence metric hear of an apply; `undone`: when the oldest
        change a failed write-behind undid, which this apply carries again, was told of."""
        done = time.monotonic()
        last_change = _oldest(self._last_change(spec.destination), undone if kind is not ApplyKind.NONE else None)
        since_change = (done - last_change) if last_change else float("nan")
        template = str(spec.destination)
        changed = await asyncio.to_thread(describe_apply, self._status.serving(template), change, kind)
        self._status.now_serving(template, change.content, kind, since_change, changed)
        if kind is not ApplyKind.NONE:
            self._status.converged(since_change)
            log.info(
                "applied %s (%s): %.0f ms after the Consul change, %.0f ms from render to applied",
                spec.destination, kind, since_change * 1000, (done - started) * 1000,
            )  # fmt: skip

    async def flush(self, destination: Path | None = None) -> None:
        """Wait for files still being written behind their runtime changes (all, or one); their
        checks, waited for now, run at the normal priority from here on."""
        jobs = [job for dest, job in self._jobs.items() if destination in (None, dest) and job.busy]
        for job in jobs:
            job.waited_for()
        await asyncio.gather(*(job.task for job in jobs if job.task is not None), return_exceptions=True)

    async def _runtime_then_file(
        self,
        spec: TemplateSpec,
        state: ApplyState,
        change: ConfigChange,
        plan: list[ServerChange],
    ) -> ApplyKind:
        """Runtime API first (traffic follows at once), then the file behind it."""
        content = change.content
        async with self._runtime_lock:
            try:
                outcome = await asyncio.to_thread(self.applier.apply_runtime, plan)
                refused: ReloadError | None = None
            except ReloadError as err:
                refused = err
            else:
                job = self._jobs.get(spec.destination)
                if job is None or not job.busy:
                    job = self._jobs[spec.destination] = _FileJob(content, state)
                    job.task = asyncio.create_task(self._write_behind(spec, job), name=f"write {spec.destination}")
                job.send(content, self._last_change(spec.destination))
        if refused is not None:
            log.warning("runtime update failed, falling back to a reload: %s", refused)
            await self.flush(spec.destination)
            # What HAProxy runs in the plan's backends is unknown: the next delivery reloads. A file
            # written behind that failed its check was undone: all of it is unknown then.
            job = self._jobs.get(spec.destination)
            running = change.running if job is None or job.error is None else None
            state.refused(running, frozenset(step.backend for step in plan))
            raise RuntimeRefused(refused)
        self._status.applied(outcome.kind)
        if self._on_file_error is None:  # nobody to tell later: finish the file now, and fail here
            await self.flush(spec.destination)
            error = self._jobs[spec.destination].error
            if error is not None:
                raise error
        return outcome.kind

    async def _write_behind(self, spec: TemplateSpec, job: _FileJob) -> None:
        """Stage, check and swap `job.latest` until the file holds the newest content sent."""
        while True:
            content = job.latest
            job.checking(content)
            before = live_bytes(spec.destination)
            checked_at = time.monotonic()
            try:
                written = ConfigChange.of(content, before.decode(errors="replace") if before else None, before, False)
                log.debug("write-behind: staging and checking %s", spec.destination)
                staged = await self._stage_and_check(spec, written, background=job.hurry)
                if staged is not None:
                    took_ms = (time.monotonic() - checked_at) * 1000
                    log.debug("write-behind: checked %s in %.0f ms", spec.destination, took_ms)
                    try:
                        log.info("rendered %s (%s)", spec.destination, written.summary)
                        await asyncio.to_thread(staged.commit, spec.perms, spec.backup)
                    finally:
                        staged.discard()
                job.error = None
                job.written()
                if self._on_file_written is not None:
                    self._on_file_written(spec)
            except Superseded:  # hurried (or starved) with newer content sent: the newest is checked next,
                # even if it equals this one again (helper-129: ONE, TWO, ONE ended the job unchecked)
                log.debug("write-behind: %s changed during its check; checking the newest", spec.destination)
                continue
            except (ValidationError, WriteError) as err:
                await self._undo_unless_newer(spec, job, content, before)
                self._file_error(spec, job, err, content)
            except Exception as err:  # contained: never a silently dead write-behind task
                log.exception("writing %s behind its runtime changes failed unexpectedly", spec.destination)
                await self._undo_unless_newer(spec, job, content, before)
                self._file_error(spec, job, WriteError(f"unexpected {type(err).__name__}: {err}"), content)
            if job.latest == content:
                return
            # Under a steady stream of changes, check at most half the time: `haproxy -c` of a large
            # file takes a core for ~0.5 s, and HAProxy already runs every change. Not while someone
            # waits for the file (a reload, shutdown).
            await job.pause(min(WRITE_BEHIND_MAX_PAUSE_S, time.monotonic() - checked_at))

    def _file_error(self, spec: TemplateSpec, job: _FileJob, err: RendererError, content: str) -> None:
        job.error = err
        if self._on_file_error is not None:
            self._on_file_error(spec, err, content)

    async def _undo_unless_newer(self, spec: TemplateSpec, job: _FileJob, content: str, live: bytes | None) -> None:
        """HAProxy must run what the live file says, unless newer content was sent meanwhile; the
        status then names what HAProxy holds again, and the timeline shows the undo."""
        async with self._runtime_lock:
            if job.latest != content or live is None:
                return
            running = live.decode(errors="replace")
            self._undid(spec.destination, job.undone())
            undone = await self._revert(spec, job.state, content, running)
        if not undone:
            if self._on_file_error is None:  # --once: no later delivery to reload it, and no turns
                with contextlib.suppress(ReloadError):  # the check's failure is what --once reports
                    await self._apply(spec, job.state)
            return
        undo = ConfigChange.of(running, content, None, hitless=True)
        template = str(spec.destination)
        changed = await asyncio.to_thread(describe_apply, content, undo, ApplyKind.RUNTIME)
        self._status.now_serving(template, running, ApplyKind.RUNTIME, float("nan"), changed)

    async def _revert(self, spec: TemplateSpec, state: ApplyState, content: str, running: str) -> bool:
        """Undo the runtime steps from `running` to `content`; False when HAProxy refused one: the
        apply is pending then, and the reload of the live file that settles it waits for the
        reload gap and its turn (delivery.py), as every reload does."""
        try:
            await asyncio.to_thread(self.applier.revert_runtime, content, running)
        except ReloadError as err:
            log.error(
                "could not undo the runtime changes of %s after its check failed (%s): the live file is "
                "reloaded in the reload gap's turn", spec.destination, err,
            )  # fmt: skip
            state.pending = True
            state.failed(spec.destination)
            return False
        return True

    async def _stage_and_check(
        self, spec: TemplateSpec, change: ConfigChange, background: Hurry | None = None
    ) -> StagedFile | None:
        """The staged file, checked (None: the live file holds it already); `background`: HAProxy
        runs the change already (write-behind), so the check runs at a lower CPU priority until it
        is hurried (`Hurry`)."""
        starting = self.starts_haproxy(spec)  # the live file is checked too: HAProxy never ran it here
        staged = await asyncio.to_thread(StagedFile.create, spec.destination, change.content, change.live, starting)
        if staged is None:
            return None
        try:
            await asyncio.to_thread(staged.validate, self.validator(spec, change, background))
        except BaseException:
            staged.discard()
            raise
        return staged

    async def _install_and_apply(self, spec: TemplateSpec, state: ApplyState, change: ConfigChange) -> ApplyKind:
        """Validate → swap → apply (reload, command, or starting HAProxy in exec mode)."""
        staged = await self._stage_and_check(spec, change)
        if staged is not None:
            try:
                await asyncio.to_thread(staged.commit, spec.perms, spec.backup)
            finally:
                staged.discard()
            log.info("rendered %s (%s)", spec.destination, change.summary)
            state.pending = True
        if not state.pending:
            return ApplyKind.NONE
        return await self._apply_installed(spec, state)

    async def _apply_installed(self, spec: TemplateSpec, state: ApplyState) -> ApplyKind:
        """Apply the file in place (reload, command, or starting HAProxy in exec mode)."""
        if spec.haproxy or spec.command:
            # A reload (or a command that may reload) must not run while another file is still written
            # behind its runtime changes: HAProxy would read that file's old version and drop them.
            await self.flush()
        if self._child is not None and self.starts_haproxy(spec):
            await self._child.start(spec.destination)
            state.succeeded()
            await self._loaded(spec, confirmed=True)
            return ApplyKind.START
        return await self._apply(spec, state)

    def starts_haproxy(self, spec: TemplateSpec) -> bool:
        """Whether applying `spec`'s file starts HAProxy (exec mode, not started yet): no reload."""
        return self._child is not None and spec.haproxy and not self._child.started

    async def _apply(self, spec: TemplateSpec, state: ApplyState) -> ApplyKind:
        try:
            outcome = await asyncio.to_thread(self.applier.apply, spec)
        except ReloadError:
            state.failed(spec.destination)
            raise
        state.succeeded()
        await self._loaded(spec, confirmed=outcome.kind is ApplyKind.RELOAD)
        self._status.applied(outcome.kind)
        return outcome.kind

    async def _loaded(self, spec: TemplateSpec, confirmed: bool) -> None:
        """HAProxy loaded its files (`confirmed`: by its master, or started on them): each HAProxy
        output's memory is told; confirmed only for the outputs that master reloads (a reload reads
        every file of its HAProxy; an output applied by a command may be another HAProxy's, whose
        dropped port was learnt after another output's reload: helper-151's B)."""
        if spec.haproxy:
            told = [(busy, confirmed and destination in self._master_loads) for destination, busy in self._busy.items()]
            await asyncio.to_thread(_tell_loaded, told)  # one thread for all: each reads the live files

    def refused_binds(self, spec: TemplateSpec, err: ReloadError, content: str) -> ValidationError | None:
        """A reload HAProxy refused because it could not bind listeners of `content` (the file it
        read): each port another program holds is remembered as that program's (`BusyPorts.learn`),
        and the refusal is told in a check's words, one alert per bind line of `content`, for the
        quarantine to leave those listeners out (None: it names no bind line of `content`). The file
        was applied again and again before, never checked again, and every reload failed while that
        program held the port: no change reached HAProxy, each failure a ~2 s pause of its listeners."""
        lines = content.splitlines()
        alerts: list[str] = []
        for failure in bind_failures(str(err)):
            at = failure.line - 1
            if Path(failure.file).name != spec.destination.name or not 0 <= at < len(lines):
                continue
            words = lines[at].split()
            if len(words) < 2 or words[0] != "bind" or not words[1].endswith(f":{failure.port}"):
                continue  # not this file's line: HAProxy read another version of it
            if _section_kind(lines, at) != "listen":
                continue  # a frontend (the template's own) is never left out, nor its port learnt (helper-150's F4)
            if failure.reason != IN_USE_REASON:
                self._busy_ports(spec.destination).unbindable(failure.port, failure.reason)
                why = "give this service another port (meta haproxy_port)"
            elif self._busy_ports(spec.destination).learn(failure.port):
                why = "another program took the port after the bind pre-check; it is remembered as that program's"
            else:  # a connection's local port (helper-150's F3): not another program's listener
                why = "the port was in use (not by a listener: a connection's own port) when HAProxy reloaded"
            alerts.append(
                f"[ALERT]    (reload) [{spec.destination.name}:{failure.line}] : config : bind "
                f"{failure.host}:{failure.port}: HAProxy's reload could not bind it ({failure.reason}): {why}"
            )
        return ValidationError("\n".join(alerts)) if alerts else None

    def _busy_ports(self, destination: Path) -> BusyPorts:
        """The destination's memory of the ports other programs listened on, scanning from now."""
        found = self._busy.get(destination)
        if found is None:

            def others() -> list[Path]:  # read from the scanner's thread: list() copies the keys at once
                return [path for path in list(self._busy) if path != destination]

            found = self._busy[destination] = BusyPorts.for_destination(destination, also_ours=others)
            found.start()
        return found

    def validator(self, spec: TemplateSpec, change: ConfigChange, background: Hurry | None = None) -> Validator | None:
        """The template's check command, or for HAProxy outputs `haproxy -c` plus the bind pre-check
        of `change` (only when a `bind` line may differ); `background`: run at a lower priority."""
        if spec.check_command:
            return command_validator(spec.check_command, spec.command_timeout, background)
        if spec.haproxy and self._haproxy_bin:
            binary, busy = self._haproxy_bin, self._busy_ports(spec.destination)
            judge = _listeners_only(busy.judge) if self.starts_haproxy(spec) else busy.judge

            def validate(staged: Path) -> None:
                check_config(binary, staged, background=background)
                if change.binds_touched:
                    busy.scan()  # the host's listening ports now: a registration may time its own
                    check_new_binds(change.base, change.content, judge)

            return validate
        return None
