"""The loop that owns the lifecycle: watch → quiescence → render → write → apply.

Signal handlers only set flags and wake the loop; the loop finishes the step it is in (a write is
never interrupted half-way) and then acts: SIGHUP re-reads config and templates, SIGTERM/SIGINT
stop. A failing template, validation or reload is logged and keeps the last good file; only bad
startup configuration and fatal conditions (an ACL refusal before any success) end the process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from renderer.config import Config, TemplateSpec, parse_host_port
from renderer.deliver.delivery import Delivery
from renderer.deliver.write import DestinationLock
from renderer.errors import (
    ConfigError,
    ConsulError,
    RendererError,
    TemplateError,
)
from renderer.haproxy.binaries import find_haproxy
from renderer.haproxy.child import HAProxyChild
from renderer.haproxy.control import has_prometheus_exporter
from renderer.logs import redact
from renderer.registration.sidecar import SelfRegistration
from renderer.render.files import TemplateFileWatcher
from renderer.render.template import RenderResult, TemplateRenderer
from renderer.source.client import ConsulClient
from renderer.source.dependency import KVPrefix
from renderer.source.watch import Store, Watcher, WatchSettings
from renderer.status import ContactReader, Status, StatusServer
from renderer.wakeups import Quiescence, Wake, Wakeups

log = logging.getLogger(__name__)


@dataclass
class TemplateState:
    """What the loop remembers of one template between renders."""

    renderer: TemplateRenderer
    dependencies: tuple[object, ...] = ()
    last_error: str | None = None
    printed: str | None = None  # --dry: the content last printed
    left_out: tuple[str, ...] = ()  # instances and parts left out for an unsafe value (as last applied)
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


@dataclass
class OutageReport:
    """While Consul fails: one progress line every `every_s` (how long, how many failures, what
    waits), and one line when it answers again. Never a line per watched key."""

    address: str
    every_s: float = 10.0
    since: float | None = None
    next_line_at: float | None = None
    errors_at_start: int = 0

    def check(self, store: Store, watched: int) -> None:
        now, failing = time.monotonic(), store.failing()
        if failing and self.since is None:
            self.since, self.next_line_at, self.errors_at_start = now, now + self.every_s, store.watch_errors
        elif failing and self.since is not None and self.next_line_at is not None and now >= self.next_line_at:
            self.next_line_at = now + self.every_s
            log.warning(
                "Consul at %s failing for %.0fs (%d failed queries; %d of %d watched keys waiting; retrying, "
                "never giving up): %s",
                self.address, now - self.since, store.watch_errors - self.errors_at_start, failing, watched,
                store.last_error,
            )  # fmt: skip
        elif not failing and self.since is not None:
            log.info("Consul at %s answers again after %.0fs", self.address, now - self.since)
            self.since = self.next_line_at = None


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
        self._store = Store()
        self._wake = Wakeups(self._store.changed)
        self._fatal: ConsulError | None = None
        self._locks: list[DestinationLock] = []
        self._quiescence = Quiescence(config.wait.min, config.wait.max)
        self._signal = int(signal.SIGTERM)
        self._once_deadline = time.monotonic() + config.once_timeout
        self._outage = OutageReport(self._consul_address())
        self._self_registration: SelfRegistration | None = None
        self._client: ConsulClient | None = None
        self._interrupt = threading.Event()  # set on SIGTERM/SIGINT: HAProxy calls stop retrying
        self.status = Status(
            templates=len(self._templates),
            watch_errors_source=lambda: self._store.watch_errors,
            consul_requests_source=lambda: self._client.requests if self._client is not None else 0,
        )
        self._child: HAProxyChild | None = None
        if config.exec_haproxy and self._haproxy_bin and config.haproxy_master_socket:
            exited = functools.partial(self._wake.post, Wake.HAPROXY_EXITED)
            self._child = HAProxyChild(self._haproxy_bin, config.haproxy_master_socket, exited)
        self._delivery = Delivery(
            config,
            self.status,
            self._haproxy_bin,
            lambda: self._store.last_change,
            report=self._delivery_failed,
            haproxy_child=self._child,
            interrupt=self._interrupt,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        self._install_signal_handlers()
        if not self.config.dry:
            self._acquire_locks()
        client = self._client = ConsulClient(self.config.consul)
        settings = WatchSettings(
            max_stale_s=self.config.max_stale,
            max_connections=self.config.consul.max_connections,
            reconcile_interval_s=self.config.reconcile_interval,
        )
        watcher = Watcher(client, self._store, settings, on_fatal=self._consul_refused)
        self.status.contact_source = ContactReader(
            client.address, self._store, watcher, settings.max_connections, self.config.max_data_age,
            outage_since=lambda: self._outage.since,
        ).read  # fmt: skip
        log.info("watching Consul at %s for %d template(s)", client.address, len(self._templates))
        if not self.config.dry:
            self._delivery.prepare_certificates()
        background = await self._start_operator_tasks(client)
        files = TemplateFileWatcher(self._template_paths(), self.request_reload)
        haproxy_code: int | None = None
        try:
            code = await self._main_loop(watcher)
        finally:
            files.stop()
            await self._delivery.flush()  # the file on disk ends equal to what HAProxy runs
            await watcher.stop()
            await self._stop_operator_tasks(background)
            await client.close()
            self._release_locks()
            haproxy_code = await self._child.stop() if self._child is not None else None
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
            server = StatusServer(self.status, *addr, self.config.status_login, (self.config.consul.token,))
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
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self.request_stop, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        self._signal = signum
        self._interrupt.set()
        self._wake.post(Wake.STOP)

    def request_reload(self) -> None:
        """SIGHUP, or a template file changed on disk: re-read config and templates."""
        self._wake.post(Wake.RECONFIGURE)

    def _consul_refused(self, error: ConsulError) -> None:
        self._fatal = error
        self._wake.post(Wake.FATAL)

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
        complete = False
        causes: set[Wake] = set()
        while Wake.STOP not in causes:
            if Wake.FATAL in causes and self._fatal is not None:
                raise self._fatal
            if Wake.RECONFIGURE in causes:
                self._reload_templates()
            if causes != {Wake.DUE} or self._render_due():  # not for a mere cleanup or progress line
                watcher.pause_sweeps()  # a change goes first
                try:
                    complete = await self._render_all(watcher)
                finally:
                    watcher.resume_sweeps()
            if self.config.once and complete:
                return 0
            self._outage.check(self._store, watcher.watched)
            if self.config.once and time.monotonic() >= self._once_deadline:
                raise ConsulError(self._once_gave_up())
            if self._child is not None and self._child.returncode is not None:
                log.error("HAProxy exited with %d; stopping", self._child.returncode)
                return self._child.returncode
            causes = await self._wait_for_change()
        if self.config.once and not complete:
            log.error("stopped by signal %d before the first complete render: nothing was rendered", self._signal)
            return 128 + self._signal
        return 0

    def _once_gave_up(self) -> str:
        why = self._store.last_error if self._store.failing() else None
        if why is None:
            why = "still waiting for " + (", ".join(self.status.waiting_for[:5]) or "a complete render")
        return f"--once: no complete render within {self.config.once_timeout:.0f}s (once_timeout): {why}"

    async def _render_all(self, watcher: Watcher) -> bool:
        """Render every template, install the complete ones; True when all are complete and applied."""
        dependencies: dict[str, object] = {}
        all_done = True
        self.status.waiting_for = []
        if self.config.certificates is not None:  # certificates first: a template may bind with them
            certs = KVPrefix(self.config.certificates[0])
            dependencies[certs.key] = certs
            present, pairs = self._store.get(certs.key)
            if present and not self.config.dry:
                await self._delivery.sync_certificates(pairs)
        for state in self._templates:
            started = time.monotonic()
            try:
                result = state.renderer.render(self._store)
            except Exception as err:  # contained: one template's failure never stops the others
                log.exception("rendering %s failed unexpectedly", state.spec.source)
                result = RenderResult(None, (), error=f"unexpected {type(err).__name__}: {err}")
            log.debug(
                "rendered %s in %.1f ms, %.1f ms after the last Consul change",
                state.spec.source.name, (time.monotonic() - started) * 1000,
                (started - self._store.last_change) * 1000,
            )  # fmt: skip
            state.recheck_at = time.monotonic() + result.recheck_in if result.recheck_in is not None else None
            state.dependencies = result.dependencies or state.dependencies
            dependencies.update({str(dep): dep for dep in state.dependencies})
            done = await self._handle(state, result)
            all_done = all_done and done
        watcher.watch(dependencies.values())  # type: ignore[arg-type]
        return all_done

    async def _handle(self, state: TemplateState, result: RenderResult) -> bool:
        if result.error is not None:
            self._report(state, TemplateError(result.error))
            return False
        if result.content is None:
            log.debug("%s waits for data: %s", state.spec.source, ", ".join(result.missing))
            self.status.waiting_for += list(result.missing)
            return False
        self.status.render_ok()
        if self.config.dry:
            self._note_left_out(state, result.left_out)
            return self._print_dry(state, result.content)
        keys = {k: (s.index, s.updated_at) for k in map(str, state.dependencies) if (s := self._store.keys.get(k))}
        self.status.rendered_from(str(state.spec.destination), keys)
        delivered = await self._delivery.deliver(state.spec, result.content)
        found = self._delivery.left_out(state.spec.destination)
        found += self._delivery.certificate_notes() if state.spec.haproxy else ()
        self._note_left_out(state, result.left_out + found)
        if not delivered:
            return False
        state.last_error, state.rendered = None, True
        self.status.template_ok(str(state.spec.destination))
        return True

    def _note_left_out(self, state: TemplateState, left_out: tuple[str, ...]) -> None:
        """Instances (and parts HAProxy rejected) left out: one error line each when first seen, one
        info line when they come back; the Consul check warns while any is left out."""
        for item in left_out:
            if item not in state.left_out:
                log.error("%s: left out %s (fix the registration; the rest is rendered)", state.spec.destination, item)
        for item in state.left_out:
            if item not in left_out:
                log.info("%s: no longer left out: %s", state.spec.destination, item.split(":")[0])
        state.left_out = left_out
        self.status.set_left_out(str(state.spec.destination), left_out)

    def _delivery_failed(self, spec: TemplateSpec, err: RendererError) -> None:
        state = next(t for t in self._templates if t.spec.destination == spec.destination)
        self._report(state, err)

    def _report(self, state: TemplateState, err: RendererError) -> None:
        token = self.config.consul.token
        message = redact(f"{state.spec.source} → {state.spec.destination}: {err}", token)
        self.status.fail(str(state.spec.destination), err.reason, redact(str(err), token))
        if message != state.last_error:
            log.error("%s", message)
        state.last_error = message
        if self.config.once:
            raise err

    def _print_dry(self, state: TemplateState, content: str) -> bool:
        if content != state.printed:
            self._out.write(redact(f"> {state.spec.destination}\n{content}", self.config.consul.token))
            self._out.flush()
            state.printed = content
        return True

    async def _wait_for_change(self) -> set[Wake]:
        """Sleep until something happens (new data, a signal, a retry or deadline coming due) and
        return why. New data alone is acted on at once if all was quiet for `wait.min` before
        (leading edge: a lone change, or the first of a burst, is not delayed; what came during
        the last render is taken in with it); data that follows the last wake-up closer than
        that is a burst: the loop waits until it is quiet for `wait.min`, `wait.max` at most, so
        that the burst is coalesced into one render. Any other cause ends the wait at once."""
        causes = await self._wake.wait(self._next_retry())
        if causes == {Wake.DUE}:
            await self._delivery.maintain()
            return causes
        self._wake.data_seen()
        if causes != {Wake.DATA}:
            return causes
        began = self._quiescence.burst()
        while began is not None and (timeout := self._quiescence.wait_for_more(began)) is not None:
            more = await self._wake.wait(timeout)
            if more == {Wake.DUE}:
                break  # quiet for wait.min: render
            self._wake.data_seen()
            causes |= more
            if more != {Wake.DATA}:
                break  # a signal: act on it now
        return causes

    def _render_due(self) -> bool:
        """A render is due without new data: an apply to retry, or a guard's hold that ends."""
        now = time.monotonic()
        held = any(state.recheck_at is not None and state.recheck_at <= now for state in self._templates)
        return held or self._delivery.retry_due()

    def _consul_address(self) -> str:
        host, port, scheme = self.config.consul.host_port_scheme
        return f"{scheme}://{host}:{port}"

    def _next_retry(self) -> float | None:
        due = self._delivery.next_due()
        pending = [due] if due is not None else []
        pending += [self._outage.next_line_at] if self._outage.next_line_at is not None else []
        pending += [self._once_deadline] if self.config.once else []
        pending += [s.recheck_at for s in self._templates if s.recheck_at is not None]
        return max(0.0, min(pending) - time.monotonic()) + 0.01 if pending else None

    # -- SIGHUP ----------------------------------------------------------------------------------

    def _reload_templates(self) -> None:
        try:
            config = self._reload_config() if self._reload_config is not None else self.config
            templates = compile_templates(config, self._builtin_vars)
        except RendererError as err:
            log.error("new configuration or template rejected, keeping the running one: %s", err)
            return
        if [t.spec.destination for t in templates] != [t.spec.destination for t in self._templates]:
            log.warning("destinations changed; locks are kept for the original destinations")
        self.config, self._templates = config, templates
        self._quiescence.wait_min, self._quiescence.wait_max = config.wait.min, config.wait.max
        self._delivery.reconfigure(config)
        log.info("configuration and %d template(s) reloaded", len(templates))
