"""The loop that owns the lifecycle: watch → quiescence → render → write → apply.

Signal handlers only set flags and wake the loop; the loop finishes the step it is in (a write is
never interrupted half-way) and then acts: SIGHUP re-reads config and templates, SIGTERM/SIGINT
stop. A failing template, validation or reload is logged and keeps the last good file; only bad
startup configuration and fatal conditions (an ACL refusal before any success) end the process.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from renderer.apply import Applier
from renderer.config import Config, TemplateSpec, parse_host_port
from renderer.consul_client import ConsulClient
from renderer.errors import (
    ConfigError,
    ReloadError,
    RendererError,
    TemplateError,
    ValidationError,
    WriteError,
)
from renderer.haproxy import check_config, check_new_binds, has_prometheus_exporter
from renderer.logs import redact
from renderer.runtime import ServerChange
from renderer.status import SelfRegistration, Status, StatusServer
from renderer.template import RenderResult, TemplateRenderer
from renderer.template_files import TemplateFileWatcher
from renderer.tools import find_haproxy
from renderer.watch import Store, Watcher, WatchSettings
from renderer.write import DestinationLock, StagedFile, Validator, command_validator, live_bytes, write_atomically

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0
CLEANUP_INTERVAL_S = 0.1  # how often removed servers still draining are retried for deletion


@dataclass
class TemplateState:
    """What the loop remembers of one template between renders."""

    renderer: TemplateRenderer
    dependencies: tuple[object, ...] = ()
    last_error: str | None = None
    rejected: str | None = None  # content that failed validation: not retried until it changes
    pending_apply: bool = False  # written, but the apply step failed: retried with backoff
    retry_delay: float = RETRY_BASE_S
    retry_at: float = 0.0
    rendered: bool = False
    recheck_at: float | None = None  # an anti-empty guard holds instances until then

    @property
    def spec(self) -> TemplateSpec:
        return self.renderer.spec


def compile_templates(config: Config, builtin_vars: Mapping[str, str]) -> list[TemplateState]:
    """Compile every template; the user's vars override the built-in ones."""
    if not config.templates:
        raise ConfigError("no template: pass --template SRC:DST or add a [[template]] table to the config file")
    variables = {**builtin_vars, **config.vars}
    return [TemplateState(TemplateRenderer(spec, variables)) for spec in config.templates]


def builtin_variables(haproxy_bin: str | None) -> dict[str, str]:
    """Facts about the HAProxy binary that templates may use (e.g. haproxy_promex)."""
    if haproxy_bin is None:
        return {}
    return {"haproxy_promex": "true" if has_prometheus_exporter(haproxy_bin) else "false"}


class Runner:
    """Runs the renderer until stopped; `run()` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self._out = out or sys.stdout
        wants_haproxy = any(spec.haproxy for spec in config.templates)
        self._haproxy_bin = find_haproxy(config.haproxy_bin) if wants_haproxy else None
        self._builtin_vars = builtin_variables(self._haproxy_bin)
        self._templates = compile_templates(config, self._builtin_vars)
        self._applier = Applier(config)
        self._store = Store()
        self._locks: list[DestinationLock] = []
        self._stopping = False
        self._hup = False
        self._self_registration: SelfRegistration | None = None
        self._haproxy: asyncio.subprocess.Process | None = None
        self.status = Status(templates=len(self._templates), watch_errors_source=lambda: self._store.watch_errors)

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        self._install_signal_handlers()
        if not self.config.dry:
            self._acquire_locks()
        client = ConsulClient(self.config.consul)
        watcher = Watcher(client, self._store, WatchSettings(max_stale_s=self.config.max_stale))
        log.info("watching Consul at %s for %d template(s)", client.address, len(self._templates))
        background = await self._start_operator_tasks(client)
        files = TemplateFileWatcher(self._template_paths(), self.request_reload)
        haproxy_code: int | None = None
        try:
            code = await self._main_loop(watcher)
        finally:
            files.stop()
            await watcher.stop()
            await self._stop_operator_tasks(background)
            await client.close()
            self._release_locks()
            haproxy_code = await self._stop_haproxy()
        if haproxy_code is not None:
            log.info("HAProxy exited with %d", haproxy_code)
            return haproxy_code
        return code

    async def _start_operator_tasks(self, client: ConsulClient) -> list[object]:
        """The status server and the Consul self-registration; neither may stop the renderer."""
        started: list[object] = []
        if self.config.once or self.config.dry:
            return started
        addr = None if self.config.status_addr == "off" else parse_host_port(self.config.status_addr, "status_addr")
        if addr is not None:
            server = StatusServer(self.status, *addr)
            try:
                await server.start()
                started.append(server)
            except OSError as err:
                log.warning("status server not started on %s:%d: %s", addr[0], addr[1], err.strerror)
                addr = None
        if self.config.register_self:
            self._self_registration = SelfRegistration(client, self.status, addr)
            started.append(asyncio.create_task(self._self_registration.run(), name="self-registration"))
        return started

    async def _stop_operator_tasks(self, started: list[object]) -> None:
        for item in started:
            if isinstance(item, asyncio.Task):
                item.cancel()
                await asyncio.gather(item, return_exceptions=True)
            elif isinstance(item, StatusServer):
                await item.stop()
        if self._self_registration is not None:
            await self._self_registration.deregister()

    def _template_paths(self) -> list[Path]:
        return [t.spec.source for t in self._templates]

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def request_stop(self) -> None:
        self._stopping = True
        self._store.changed.set()

    def request_reload(self) -> None:
        """SIGHUP, or a template file changed on disk: re-read config and templates."""
        self._hup = True
        self._store.changed.set()

    def _acquire_locks(self) -> None:
        for state in self._templates:
            lock = DestinationLock(state.spec.destination)
            lock.acquire()
            self._locks.append(lock)

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    # -- the loop --------------------------------------------------------------------------------

    async def _main_loop(self, watcher: Watcher) -> int:
        while not self._stopping:
            if self._hup:
                self._reload_templates()
            if self._store.fatal is not None:
                raise self._store.fatal
            complete = await self._render_all(watcher)
            if self.config.once and complete:
                return 0
            if self._haproxy is not None and self._haproxy.returncode is not None:
                log.error("HAProxy exited with %d; stopping", self._haproxy.returncode)
                return self._haproxy.returncode
            await self._wait_for_change()
        return 0

    async def _render_all(self, watcher: Watcher) -> bool:
        """Render every template, install the complete ones; True when all are complete and applied."""
        dependencies: dict[str, object] = {}
        all_done = True
        self.status.waiting_for = []
        for state in self._templates:
            result = state.renderer.render(self._store)
            state.recheck_at = time.monotonic() + result.recheck_in if result.recheck_in is not None else None
            state.dependencies = result.dependencies or state.dependencies
            dependencies.update({str(dep): dep for dep in state.dependencies})
            done = await self._handle(state, result)
            all_done = all_done and done
        watcher.watch(dependencies.values())  # type: ignore[arg-type]
        return all_done

    async def _handle(self, state: TemplateState, result: RenderResult) -> bool:
        if result.error is not None:
            self._report(state, "template", TemplateError(result.error))
            return False
        if result.content is None:
            log.debug("%s waits for data: %s", state.spec.source, ", ".join(result.missing))
            self.status.waiting_for += list(result.missing)
            return False
        self.status.render_ok()
        if self.config.dry:
            return self._print_dry(state, result.content)
        if result.content == state.rejected and not state.pending_apply:
            return False
        if state.pending_apply and time.monotonic() < state.retry_at:
            return False  # an apply failed: its retry comes when the backoff says so
        try:
            await self._install(state, result.content)
        except (ValidationError, WriteError, ReloadError) as err:
            self._report(state, type(err).__name__.removesuffix("Error").lower(), err)
            if isinstance(err, ValidationError):
                state.rejected = result.content
            return False
        state.last_error, state.rejected, state.rendered = None, None, True
        self.status.template_ok(str(state.spec.destination))
        return True

    def _report(self, state: TemplateState, reason: str, err: RendererError) -> None:
        token = self.config.consul.token
        message = redact(f"{state.spec.source} → {state.spec.destination}: {err}", token)
        self.status.fail(str(state.spec.destination), reason, redact(str(err), token))
        if message != state.last_error:
            log.error("%s", message)
        state.last_error = message
        if self.config.once:
            raise err

    async def _install(self, state: TemplateState, content: str) -> None:
        """Install and apply one rendered file: hitless when only servers changed, else swap + reload."""
        spec = state.spec
        started = time.monotonic()
        before = live_bytes(spec.destination)
        if before == content.encode() and not state.pending_apply:
            return
        # HAProxy runs the live file, unless an earlier apply of it is still pending.
        running = before.decode(errors="replace") if before is not None and not state.pending_apply else None
        plan = self._applier.runtime_plan(spec, running, content) if running is not None else None
        if running is not None and plan is not None and not self._haproxy_to_start(spec):
            kind = await self._install_hitless(state, running, content, plan)
        else:
            kind = await self._install_and_reload(state, before, content)
        if kind != "none":
            done = time.monotonic()
            since_change = (done - self._store.last_change) * 1000 if self._store.last_change else float("nan")
            self.status.converged(since_change / 1000)
            log.info(
                "applied %s (%s): %.0f ms after the Consul change, %.0f ms for check, swap and apply",
                spec.destination, kind, since_change, (done - started) * 1000,
            )  # fmt: skip

    async def _install_hitless(self, state: TemplateState, running: str, content: str, plan: list[ServerChange]) -> str:
        """Check the staged file and apply the server changes at once; swap only a file that passed.

        HAProxy validates every runtime command itself, so traffic follows Consul without waiting
        for `haproxy -c`; the file is installed only once the check passed. A file that fails the
        check is never installed and its runtime changes are undone (a reload of the live file
        if undoing fails). A runtime step HAProxy refuses falls back to swap + reload.
        """
        spec = state.spec
        staged = await asyncio.to_thread(StagedFile.create, spec.destination, content)
        if staged is None:
            return "none"
        try:
            checked, applied = await asyncio.gather(
                asyncio.to_thread(staged.validate, self._validator(spec)),
                asyncio.to_thread(self._applier.apply_runtime, plan),
                return_exceptions=True,
            )
            if isinstance(checked, BaseException) and not isinstance(applied, BaseException):
                await asyncio.to_thread(self._applier.revert_runtime, content, running)
            if isinstance(checked, BaseException):
                raise checked
            await self._commit(spec, staged, running, content, undo=not isinstance(applied, BaseException))
        finally:
            staged.discard()
        if isinstance(applied, ReloadError):
            log.warning("runtime update failed, falling back to a reload: %s", applied)
            state.pending_apply = True
            return await self._apply(state)
        if isinstance(applied, BaseException):
            raise applied
        self._count_apply(applied.kind)
        return applied.kind

    async def _commit(self, spec: TemplateSpec, staged: StagedFile, running: str, content: str, undo: bool) -> None:
        log.info("rendered %s (%s)", spec.destination, _change_summary(running.encode(), content))
        try:
            await asyncio.to_thread(staged.commit, spec.perms, spec.backup)
        except WriteError:
            if undo:  # HAProxy must keep running what the live file says
                await asyncio.to_thread(self._applier.revert_runtime, content, running)
            raise

    async def _install_and_reload(self, state: TemplateState, before: bytes | None, content: str) -> str:
        """Validate → swap → apply (reload, command, or starting HAProxy in exec mode)."""
        spec = state.spec
        written = await asyncio.to_thread(
            write_atomically, spec.destination, content, self._validator(spec), spec.perms, spec.backup
        )
        if written.changed:
            log.info("rendered %s (%s)", spec.destination, _change_summary(before, content))
            state.pending_apply = True
        if not state.pending_apply:
            return "none"
        if self._haproxy_to_start(spec):
            await self._start_haproxy(spec)
            state.pending_apply = False
            return "start"
        return await self._apply(state)

    def _haproxy_to_start(self, spec: TemplateSpec) -> bool:
        return self.config.exec_haproxy and spec.haproxy and self._haproxy is None

    async def _apply(self, state: TemplateState) -> str:
        try:
            outcome = await asyncio.to_thread(self._applier.apply, state.spec)
        except ReloadError:
            state.retry_at = time.monotonic() + state.retry_delay
            log.warning("apply of %s failed; retrying the apply in %.1fs", state.spec.destination, state.retry_delay)
            state.retry_delay = min(state.retry_delay * 2, RETRY_MAX_S)
            raise
        state.pending_apply, state.retry_delay, state.retry_at = False, RETRY_BASE_S, 0.0
        self._count_apply(outcome.kind)
        return outcome.kind

    def _count_apply(self, kind: str) -> None:
        self.status.applied(kind)

    def _validator(self, spec: TemplateSpec) -> Validator | None:
        if spec.check_command:
            return command_validator(spec.check_command, spec.command_timeout)
        if spec.haproxy and self._haproxy_bin:
            binary = self._haproxy_bin
            running = live_bytes(spec.destination)

            def validate(staged: Path) -> None:
                check_config(binary, staged)
                check_new_binds(running.decode(errors="replace") if running else None, staged.read_text())

            return validate
        return None

    def _print_dry(self, state: TemplateState, content: str) -> bool:
        if content != state.rejected:  # reuse `rejected` as "last printed" in dry mode
            self._out.write(redact(f"> {state.spec.destination}\n{content}", self.config.consul.token))
            self._out.flush()
            state.rejected = content
        return True

    async def _wait_for_change(self) -> None:
        """Sleep until data changes (or a signal, or a pending retry), then wait for quiescence."""
        changed = self._store.changed
        retry_in = self._next_retry()
        try:
            await asyncio.wait_for(changed.wait(), retry_in)
        except TimeoutError:
            if self._applier.has_cleanup:
                await asyncio.to_thread(self._applier.cleanup)
            return
        first = time.monotonic()
        wait = self.config.wait
        while not self._stopping and not self._hup:
            changed.clear()
            remaining = wait.max - (time.monotonic() - first)
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(changed.wait(), min(wait.min, remaining))
            except TimeoutError:
                return

    def _next_retry(self) -> float | None:
        pending = [s.retry_at for s in self._templates if s.pending_apply]
        pending += [s.recheck_at for s in self._templates if s.recheck_at is not None]
        if self._applier.has_cleanup:
            pending.append(time.monotonic() + CLEANUP_INTERVAL_S)
        return max(0.0, min(pending) - time.monotonic()) + 0.01 if pending else None

    # -- SIGHUP ----------------------------------------------------------------------------------

    def _reload_templates(self) -> None:
        self._hup = False
        try:
            config = self._reload_config() if self._reload_config is not None else self.config
            templates = compile_templates(config, self._builtin_vars)
        except RendererError as err:
            log.error("new configuration or template rejected, keeping the running one: %s", err)
            return
        if [t.spec.destination for t in templates] != [t.spec.destination for t in self._templates]:
            log.warning("destinations changed; locks are kept for the original destinations")
        self.config, self._templates = config, templates
        self._applier = Applier(config)
        log.info("configuration and %d template(s) reloaded", len(templates))

    # -- exec mode -------------------------------------------------------------------------------

    async def _start_haproxy(self, spec: TemplateSpec) -> None:
        assert self._haproxy_bin and self.config.haproxy_master_socket
        cmd = [
            self._haproxy_bin,
            "-W",
            "-S",
            f"{self.config.haproxy_master_socket},mode,600",
            "-f",
            str(spec.destination),
        ]
        self._haproxy = await asyncio.create_subprocess_exec(*cmd)
        log.info("started HAProxy (pid %d): %s", self._haproxy.pid, " ".join(cmd))
        asyncio.get_running_loop().create_task(self._watch_haproxy())

    async def _watch_haproxy(self) -> None:
        assert self._haproxy is not None
        await self._haproxy.wait()
        self._store.changed.set()

    async def _stop_haproxy(self) -> int | None:
        if self._haproxy is None:
            return None
        if self._haproxy.returncode is None:
            self._haproxy.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._haproxy.wait(), 4.0)
            except TimeoutError:
                self._haproxy.kill()
                await self._haproxy.wait()
        return self._haproxy.returncode


def _change_summary(before: bytes | None, content: str) -> str:
    if before is None:
        return f"new file, {len(content.splitlines())} lines"
    old = before.decode(errors="replace").splitlines()
    diff = list(difflib.unified_diff(old, content.splitlines(), lineterm="", n=0))
    added = [line[1:].strip() for line in diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line[1:].strip() for line in diff if line.startswith("-") and not line.startswith("---")]
    shown = "; ".join([f"+ {a}" for a in added[:3]] + [f"- {r}" for r in removed[:3]])
    return f"+{len(added)} -{len(removed)} lines: {shown}"
