"""The loop that owns the lifecycle: wait → render what is due → deliver → report.

`Runner.run()` wires the stages (no I/O happens before it is called), holds the destination
locks, starts the watches and the operator's tasks, then loops: it waits for a typed cause
(`Wakeups`: new data, a signal, a deadline, HAProxy gone), lets quiescence coalesce bursts, runs
one `RenderCycle` and goes back to waiting. Signal handlers only post causes; the loop finishes the
step it is in (a write is never interrupted half-way) and then acts: SIGHUP re-reads config and
templates, SIGTERM/SIGINT stop. A failing template, validation or reload is reported and keeps the
last good file; only bad startup configuration and fatal conditions (an ACL refusal before any
success) end the process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from renderer.config import Config
from renderer.deliver.delivery import Delivery
from renderer.deliver.write import DestinationLocks
from renderer.errors import ConsulError, RendererError
from renderer.haproxy.binaries import find_haproxy
from renderer.haproxy.child import HAProxyChild
from renderer.loop.agent_ports import read_agent_ports
from renderer.loop.collector import Collector
from renderer.loop.cycle import RenderCycle
from renderer.loop.operator import OperatorTasks
from renderer.loop.outage import OutageReport
from renderer.loop.templates import HostAddresses, builtin_variables, compile_templates
from renderer.render.files import TemplateFileWatcher
from renderer.source.client import ConsulClient
from renderer.source.h2 import BLOCK_WAIT_S, CONSUL_DEFAULT_MAX_QUERY_S, PING_INTERVAL_S
from renderer.source.store import Store, WatchSettings
from renderer.source.watch import Watcher
from renderer.status import ContactReader, Status
from renderer.wakeups import Quiescence, Wake, Wakeups

# Causes that need no render by themselves (a render still runs when a retry or a hold is due).
NO_RENDER = frozenset(
    {
        Wake.DUE, Wake.CLEANUP, Wake.PROGRESS, Wake.ONCE_DEADLINE, Wake.CONSUL_FAILING, Wake.LATE_FAILURE,
        Wake.COLLECT, Wake.HOST_ADDRESSES,
    }
)  # fmt: skip

log = logging.getLogger(__name__)


def held_wait(block_wait_s: float, over_http2: bool) -> float:
    """How long a blocking query may be held: the protocol's default when `block_wait` is 0 (10 min
    over HTTP/2, 60 s over HTTP/1.1), else `block_wait`, but at most Consul's default ceiling
    (10 min) over HTTP/1.1, where no PING checks a held connection: one dropped without a word is
    noticed only when the wait (plus Consul's 1/16 and 5 s) runs out."""
    if not block_wait_s:
        return BLOCK_WAIT_S if over_http2 else WatchSettings.block_wait_s
    if over_http2 or block_wait_s <= CONSUL_DEFAULT_MAX_QUERY_S:
        return block_wait_s
    log.warning(
        "block_wait %g s lowered to %g s over HTTP/1.1: nothing checks a held connection there, so one "
        "dropped silently would go unnoticed for the whole wait; point the renderer at the agent's HTTPS "
        "port (HTTP/2, PINGed every %g s) for longer waits",
        block_wait_s, CONSUL_DEFAULT_MAX_QUERY_S, PING_INTERVAL_S,
    )  # fmt: skip
    return CONSUL_DEFAULT_MAX_QUERY_S


@dataclass
class OncePolicy:
    """--once: render once, or give up at `deadline` saying why; a signal before that is 128+N."""

    enabled: bool
    timeout_s: float
    deadline: float = float("inf")

    def start(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s if self.enabled else float("inf")

    def gave_up(self, store: Store, status: Status) -> ConsulError:
        why = store.last_error if store.failing() else None
        if why is None:
            why = "still waiting for " + (", ".join(status.waiting_for[:5]) or "a complete render")
        return ConsulError(f"--once: no complete render within {self.timeout_s:.0f}s (once_timeout): {why}")


class Runner:
    """Runs the renderer until stopped; `run()` returns the process exit code."""

    def __init__(
        self, config: Config, reload_config: Callable[[], Config] | None = None, out: TextIO | None = None
    ) -> None:
        self.config = config
        # The ports of the agent the client talks to and of the status server, bound at start: a
        # SIGHUP that moves either keeps both (a restart takes the change), so they stay reserved
        # whatever the configuration read again says (helper-144: the old agent port was freed).
        self._started_ports = config.reserved_ports
        self._reload_config = reload_config
        self._out = out or sys.stdout
        self._store = Store()
        self._wake = Wakeups(self._store.changed, self._store.failing_started)
        self._quiescence = Quiescence(config.wait.min, config.wait.max)
        self._once = OncePolicy(config.once, config.once_timeout)
        self._collector = Collector()
        self._fatal: ConsulError | None = None
        self._signal = int(signal.SIGTERM)
        self._interrupt = threading.Event()  # set on SIGTERM/SIGINT: HAProxy calls stop retrying
        self._requests = 0
        self._builtin_vars: dict[str, str] = {}
        self._host: HostAddresses  # read in run()
        self._cycle: RenderCycle  # wired in run()
        self.status = Status(
            templates=len(config.templates),
            watch_errors_source=lambda: self._store.watch_errors,
            consul_requests_source=lambda: self._requests,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        config = self.config
        haproxy_bin = find_haproxy(config.haproxy_bin) if any(s.haproxy for s in config.templates) else None
        self._builtin_vars = builtin_variables(haproxy_bin)
        self._host = HostAddresses.start()
        templates = compile_templates(config, self._builtin_vars, self._host.known)
        child = self._child(haproxy_bin)
        delivery = Delivery(
            config, self.status, haproxy_bin, lambda destination: self._cycle.change_told(destination),
            on_late_failure=functools.partial(self._wake.post, Wake.LATE_FAILURE), haproxy_child=child,
            interrupt=self._interrupt,
        )  # fmt: skip
        self._cycle = RenderCycle(config, templates, self._store, self.status, delivery, self._out)
        self.status.reload_pace_source = delivery.reload_pace
        self._install_signal_handlers()
        locks = DestinationLocks([t.spec.destination for t in templates] if not config.dry else [])
        if child is not None and not config.dry:  # after the lock: a second renderer is told of the first
            await asyncio.to_thread(child.refuse_a_running_master)
        client = ConsulClient(config.consul)
        self.status.consul_requests_source = lambda: client.requests
        self.status.consul_answer_bytes_source = lambda: client.answer_bytes
        settings = WatchSettings(
            max_stale_s=config.max_stale, max_connections=config.consul.max_connections,
            reconcile_interval_s=config.reconcile_interval, server_watch_s=config.server_watch,
        )  # fmt: skip
        await client.open(settings.blocking_connections)
        settings = replace(  # HTTP/2: many streams per connection, longer waits
            settings,
            streams_per_connection=client.streams_per_connection,
            block_wait_s=held_wait(config.block_wait, client.streams_per_connection > 1),
        )
        watcher = Watcher(client, self._store, settings, on_fatal=self._consul_refused)
        outage = OutageReport(client.address)
        self.status.contact_source = ContactReader(
            client.address, self._store, watcher, settings.max_connections, config.max_data_age,
            outage_since=lambda: outage.since,
        ).read  # fmt: skip
        log.info(
            "watching Consul at %s over %s for %d template(s) (up to %d blocking queries on %d connections, "
            "each held up to %g s)",
            client.address, client.protocol, len(templates), settings.precise_capacity,
            settings.blocking_connections if client.streams_per_connection > 1 else settings.precise_capacity,
            settings.block_wait_s,
        )  # fmt: skip
        if settings.block_wait_s > CONSUL_DEFAULT_MAX_QUERY_S:
            log.info(
                "blocking queries ask to be held %g s: Consul's servers answer after their max_query_time "
                "(%.0f s unless raised in their config), so raise it there for this to take effect",
                settings.block_wait_s, CONSUL_DEFAULT_MAX_QUERY_S,
            )  # fmt: skip
        if not config.dry:
            delivery.prepare_certificates()
        operator = OperatorTasks(config, self.status)
        await operator.start(client)
        ports = asyncio.create_task(read_agent_ports(client, self._agent_ports), name="agent ports")
        files = TemplateFileWatcher([t.spec.source for t in templates], self.request_reload)
        try:
            code = await self._main_loop(watcher, delivery, outage, child)
        finally:
            ports.cancel()
            files.stop()
            await delivery.flush()  # the file on disk ends equal to what HAProxy runs
            await self._cycle.flush_memory()
            await watcher.stop()
            await operator.stop()
            await client.close()
            locks.release()
            haproxy_code = await child.stop() if child is not None else None
        if haproxy_code is not None:
            log.info("HAProxy exited with %d", haproxy_code)
            return haproxy_code
        return code

    def _child(self, haproxy_bin: str | None) -> HAProxyChild | None:
        """HAProxy as our child (--exec-haproxy), or None."""
        if not (self.config.exec_haproxy and haproxy_bin and self.config.haproxy_master_socket):
            return None
        return HAProxyChild(
            haproxy_bin, self.config.haproxy_master_socket, functools.partial(self._wake.post, Wake.HAPROXY_EXITED)
        )

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

    # -- the loop --------------------------------------------------------------------------------

    async def _main_loop(
        self, watcher: Watcher, delivery: Delivery, outage: OutageReport, child: HAProxyChild | None
    ) -> int:
        complete = False
        causes: set[Wake] = set()
        self._once.start()
        while Wake.STOP not in causes:
            if Wake.FATAL in causes and self._fatal is not None:
                raise self._fatal
            if Wake.RECONFIGURE in causes:
                self._reconfigure(delivery)
            if Wake.LATE_FAILURE in causes:
                for spec, error in delivery.take_late_failures():
                    self._cycle.delivery_failed(spec, error)
            if Wake.CLEANUP in causes:
                await delivery.maintain()
            if Wake.COLLECT in causes:
                self._collector.idle()
            policy_changed = Wake.HOST_ADDRESSES in causes and self._host_addresses_changed()
            if not causes or causes - NO_RENDER or self._cycle.due() or policy_changed:
                watcher.pause_sweeps()  # a change goes first
                try:
                    complete, dependencies = await self._cycle.run()
                    watcher.watch(dependencies)
                finally:
                    watcher.resume_sweeps()
            if self.config.once and complete:
                return 0
            if not causes or causes - NO_RENDER:
                self._collector.after_cycle()  # the garbage collector's long runs: here, not on a change
            outage.check(self._store, watcher.watched)
            if Wake.ONCE_DEADLINE in causes or time.monotonic() >= self._once.deadline:
                raise self._once.gave_up(self._store, self.status)
            if child is not None and child.returncode is not None:
                log.error("HAProxy exited with %d; stopping", child.returncode)
                return child.returncode
            causes = await self._wait_for_change(delivery, outage)
        if self.config.once and not complete:
            log.error("stopped by signal %d before the first complete render: nothing was rendered", self._signal)
            return 128 + self._signal
        return 0

    async def _wait_for_change(self, delivery: Delivery, outage: OutageReport) -> set[Wake]:
        """Sleep until something happens (new data, a signal, a timer) and return why. New data alone
        is acted on at once if all was quiet for `wait.min` before (leading edge); data closer than
        that to the last wake-up is a burst: the loop waits until it is quiet for `wait.min`,
        `wait.max` at most (`Quiescence`). Any other cause ends the wait at once."""
        timers = self._timers(delivery, outage)
        soonest = min(timers.values(), default=None)
        causes = await self._wake.wait(None if soonest is None else max(0.0, soonest - time.monotonic()) + 0.01)
        if causes == {Wake.DUE}:
            now = time.monotonic()
            return {wake for wake, at in timers.items() if at <= now} or causes
        self._wake.data_seen()
        if causes != {Wake.DATA}:
            return causes
        began = self._quiescence.burst()
        while began is not None and (timeout := self._quiescence.wait_for_more(began)) is not None:
            more = await self._wake.wait(timeout)
            if more == {Wake.DUE}:
                break  # quiet for wait.min: render
            self._wake.data_seen()
            if Wake.DATA in more:
                self._quiescence.more()
            causes |= more
            if more != {Wake.DATA}:
                break  # a signal: act on it now
        return causes

    def _timers(self, delivery: Delivery, outage: OutageReport) -> dict[Wake, float]:
        """Each timer that is set, by name → when it is due (monotonic)."""
        holds = [s.recheck_at for s in self._cycle.templates if s.recheck_at is not None]
        timers = {
            Wake.RETRY: delivery.next_retry(),
            Wake.CLEANUP: delivery.next_cleanup(),
            Wake.GUARD_HOLD: min(holds) if holds else None,
            Wake.PROGRESS: outage.next_line_at,
            Wake.ONCE_DEADLINE: self._once.deadline if self.config.once else None,
            Wake.COLLECT: self._collector.due_at(),
            Wake.HOST_ADDRESSES: None if self.config.allow_local_addresses else self._host.due_at(),
        }
        return {wake: at for wake, at in timers.items() if at is not None}

    def _agent_ports(self, ports: frozenset[int]) -> None:
        """The local agent's ports, read: reserved for the rest of the run, and rendered with."""
        self._started_ports |= ports
        new = [state for state in self._cycle.templates if not self._started_ports <= state.renderer.reserved_ports]
        for state in new:
            state.renderer.set_reserved_ports(state.renderer.reserved_ports | self._started_ports)
        if new:
            self._wake.post(Wake.AGENT_PORTS)

    def _host_addresses_changed(self) -> bool:
        """The host's own addresses read again; when they changed, every template's address policy
        takes them (and the loop renders)."""
        if not self._host.refresh():
            return False
        self._host.apply(self._cycle.templates)
        return True

    def _reconfigure(self, delivery: Delivery) -> None:
        """SIGHUP: the new configuration and templates, or the running ones if they are rejected."""
        if self._host.refresh():
            self._host.apply(self._cycle.templates)  # taken even if the new configuration is not
        try:
            config = self._reload_config() if self._reload_config is not None else self.config
            templates = compile_templates(config, self._builtin_vars, self._host.known)
        except RendererError as err:
            log.error("new configuration or template rejected, keeping the running one: %s", err)
            return
        for new in templates:
            new.renderer.set_reserved_ports(new.renderer.reserved_ports | self._started_ports)
        running = {state.spec.destination: state for state in self._cycle.templates}
        for new in templates:  # by destination: a reordered list keeps each template's memory
            old = running.get(new.spec.destination)
            if old is not None:
                new.renderer.carry_over(old.renderer)
                new.memory = old.memory  # its file's one writer, and what it last kept
                new.covered = old.covered  # the changes its next apply carries (its latency's start)
            elif self._cycle.templates:
                new.renderer.share_storms(self._cycle.templates[0].renderer)
        kept = {new.spec.destination for new in templates}
        for old in running.values():
            if old.spec.destination not in kept and old.memory is not None:
                old.memory.retire()
        if [t.spec.destination for t in templates] != [t.spec.destination for t in self._cycle.templates]:
            log.warning("destinations changed; locks are kept for the original destinations")
        self.config = self._cycle.config = config
        self._cycle.templates = templates
        self._quiescence.wait_min, self._quiescence.wait_max = config.wait.min, config.wait.max
        delivery.reconfigure(config)
        log.info("configuration and %d template(s) reloaded", len(templates))
