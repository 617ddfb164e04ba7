"""Applying a changed file: Runtime API, graceful HAProxy reload, or a user command.

With `apply = "auto"`, a change that only touches server lines is applied through the Runtime API
(no reload, no new worker); anything structural, or any runtime step HAProxy refuses, goes through
a reload of the already validated file. A reload is confirmed by HAProxy itself (`Success=1` and a
new worker in `show proc`); before it, server state is dumped to the configured
server-state-file so weights, maintenance and health survive it. Reloads closer together than
`min_reload_interval` wait, so bursts cannot pile up old workers, and past a burst the gap grows
(`ReloadPace`): a storm of structural changes costs a reload every few seconds, not every second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from renderer.commands import run_command
from renderer.config import Config, TemplateSpec
from renderer.decay import faded
from renderer.deliver.runtime import RuntimeApplier, RuntimeApplyError, ServerChange, plan_runtime
from renderer.deliver.write import write_atomically
from renderer.errors import ApplyKind, ReloadError, WriteError
from renderer.haproxy.config_text import global_value, parse_sections
from renderer.haproxy.control import MasterCLI, RuntimeAPI
from renderer.haproxy.runtime_grammar import command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyOutcome:
    kind: ApplyKind
    duration_s: float
    detail: str = ""


STORM_BURST = 6.0  # reloads within about a minute that keep the gap at min_reload_interval
STORM_MEMORY_S = 60.0  # how long a reload counts toward a storm (its weight fades with this time constant)
STORM_MAX_GAP_S = 30.0  # the longest gap a storm makes (hard-stop-after: an old worker's 30 s)


@dataclass
class ReloadPace:
    """The gap before HAProxy's next reload: `base` (min_reload_interval), doubled for each reload
    past a burst of STORM_BURST within about a minute, up to STORM_MAX_GAP_S. An attacker's review
    (/tmp/rev16) flipped its own service's settings every 100 ms: a reload each second for good,
    and every old worker (with its long connections, for every service) cut after 20 reloads
    (`mworker-max-reloads`) or 30 s (`hard-stop-after`). A storm settles at about one reload every
    7 s; server membership still goes through the Runtime API meanwhile (delivery.py), and the
    changes a reload waits for go together."""

    base: float
    grows: bool = True  # False (apply = "reload": every change is a reload, none goes meanwhile): the base gap only
    last: float = 0.0  # monotonic: the last reload
    level: float = 0.0  # the reloads lately, each fading with STORM_MEMORY_S

    def gap(self, now: float) -> float:
        """The gap a reload at `now` (monotonic) keeps from the last: longer the more reloads lately."""
        excess = self.lately(now) - STORM_BURST
        if excess <= 0 or self.base <= 0 or not self.grows:
            return self.base
        return min(self.base * 2**excess, max(self.base, STORM_MAX_GAP_S))

    def wait(self, now: float) -> float:
        """Seconds from `now` until the next reload may go."""
        return max(0.0, self.last + self.gap(now) - now)

    def lately(self, now: float) -> float:
        """The reloads lately, as of `now`: each counts 1 when made, fading with STORM_MEMORY_S."""
        return faded(self.level, self.last, now, STORM_MEMORY_S)

    def reloaded(self, now: float) -> None:
        self.level, self.last = self.lately(now) + 1.0, now


class HAProxySide(Protocol):
    """What delivery asks of HAProxy (or of a template's command): `Applier` is the real one."""

    @property
    def runtime(self) -> RuntimeApplier | None: ...
    @property
    def has_cleanup(self) -> bool: ...
    def hitless(self, spec: TemplateSpec) -> bool: ...
    def apply_reloads(self, spec: TemplateSpec) -> bool: ...
    def apply_runtime(self, plan: list[ServerChange]) -> ApplyOutcome: ...
    def revert_runtime(self, applied: str, running: str) -> None: ...
    def apply(self, spec: TemplateSpec) -> ApplyOutcome: ...
    def reload_wait(self) -> float: ...
    def reload_gap(self) -> float: ...
    def reload_running(self) -> ApplyOutcome | None: ...
    def cleanup(self) -> None: ...
    def reconfigured(self, config: Config) -> HAProxySide: ...


class Applier:
    """Knows how to apply each template's change: reload HAProxy, run its command, or nothing."""

    def __init__(
        self, config: Config, previous: Applier | None = None, interrupt: threading.Event | None = None
    ) -> None:
        """`previous`: the applier a configuration reload replaces; servers it left draining and the
        time of its last reload carry over (min_reload_interval holds across a SIGHUP). `interrupt`:
        set when the renderer stops, so that no apply keeps retrying a HAProxy that is gone."""
        self._config = config
        self._interrupt = interrupt
        master_socket = config.haproxy_master_socket
        self._master = MasterCLI(master_socket, config.reload_timeout, interrupt) if master_socket else None
        self._runtime: RuntimeApplier | None = None
        if self._master is not None or config.haproxy_runtime_socket:
            self._runtime = RuntimeApplier(RuntimeAPI(config.haproxy_runtime_socket, self._master))
        self.pace = ReloadPace(config.min_reload_interval, grows=config.apply == "auto")
        if previous is not None:  # the gap and the storm hold across a SIGHUP
            self.pace.last, self.pace.level = previous.pace.last, previous.pace.level
        if previous is not None and previous.runtime is not None and self._runtime is not None:
            self._runtime.leftovers.update(previous.runtime.leftovers)

    @property
    def runtime(self) -> RuntimeApplier | None:
        """The Runtime API side (None without a master or runtime socket): servers still draining."""
        return self._runtime

    def reconfigured(self, config: Config) -> Applier:
        """The applier for a new configuration (SIGHUP), carrying over what this one holds."""
        return Applier(config, previous=self, interrupt=self._interrupt)

    def hitless(self, spec: TemplateSpec) -> bool:
        """Whether a membership change of `spec`'s file may go through the Runtime API."""
        if spec.command or not spec.haproxy or self._config.apply != "auto":
            return False
        return self._runtime is not None and self._master is not None

    def apply_reloads(self, spec: TemplateSpec) -> bool:
        """Whether applying `spec`'s file reloads HAProxy (`apply`): its reload keeps the gap."""
        return not spec.command and spec.haproxy and self._master is not None

    def apply_runtime(self, plan: list[ServerChange]) -> ApplyOutcome:
        """Carry out a plan; RuntimeApplyError when HAProxy refuses a step (the caller reloads)."""
        assert self._runtime is not None
        started = time.monotonic()
        self._runtime.run(plan)
        kind = ApplyKind.RUNTIME if plan else ApplyKind.NONE
        return ApplyOutcome(kind, time.monotonic() - started, f"{len(plan)} server change(s)")

    def revert_runtime(self, applied: str, running: str) -> None:
        """Undo runtime changes whose file failed validation; ReloadError when HAProxy refuses a
        step: the caller leaves the apply pending, and the reload of the live file that settles it
        takes the reload gap's turns like any other (delivery.py). It reloaded here before, at
        once, sleeping through the gap while holding the runtime lock."""
        plan = plan_runtime(applied, running)
        if plan is None:
            raise RuntimeApplyError("no runtime path back: the live file must be reloaded")
        self.apply_runtime(plan)

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        """Apply a file already installed: its command, a reload for HAProxy outputs, else nothing."""
        if spec.command:
            return self._run_command(spec)
        if spec.haproxy and self._master is not None:
            return self.reload(spec.destination.read_text())
        return ApplyOutcome(ApplyKind.NONE, 0.0)

    def reload_wait(self) -> float:
        """Seconds until HAProxy may be reloaded again (`ReloadPace`: `min_reload_interval` after
        the last reload, longer in a storm); 0 without a master socket."""
        if self._master is None:
            return 0.0
        return self.pace.wait(time.monotonic())

    def reload_gap(self) -> float:
        """The gap the next reload keeps from the last (`ReloadPace`); 0 without a master socket."""
        return self.pace.gap(time.monotonic()) if self._master is not None else 0.0

    def reload_running(self) -> ApplyOutcome | None:
        """Reload HAProxy on the files it has (certificate files changed, say); None without a master."""
        if self._master is None:
            return None
        spec = next((t for t in self._config.templates if t.haproxy and t.destination.exists()), None)
        return self.reload(spec.destination.read_text() if spec is not None else "")

    def reload(self, content: str) -> ApplyOutcome:
        assert self._master is not None
        # The floor, for --once (no turns); otherwise every reload waits for the gap in delivery's
        # turns (`reload_wait`), without blocking a thread for it, and finds none left here.
        gap = time.monotonic() - self.pace.last
        if gap < self._config.min_reload_interval:
            time.sleep(self._config.min_reload_interval - gap)
        self._save_server_state(content)
        result = self._master.reload()
        if self._runtime is not None:
            self._runtime.forget_leftovers()
        now = time.monotonic()
        self.pace.reloaded(now)
        if self.pace.gap(now) > self._config.min_reload_interval:
            log.warning(
                "HAProxy reloaded %.0f times lately: the next reload waits %.1f s (server changes go on "
                "through the Runtime API; the timeline names what changes again and again)",
                self.pace.lately(now), self.pace.gap(now),
            )  # fmt: skip
        log.info("HAProxy reloaded in %.0f ms (worker %s)", result.duration_s * 1000, result.worker_pid)
        return ApplyOutcome(ApplyKind.RELOAD, result.duration_s, f"worker {result.worker_pid}")

    @property
    def has_cleanup(self) -> bool:
        return self._runtime is not None and bool(self._runtime.leftovers)

    def cleanup(self) -> None:
        """Finish removals still draining (servers in maintenance waiting for `del server`)."""
        if self._runtime is not None and self._runtime.leftovers:
            try:
                self._runtime.cleanup()
            except ReloadError as err:
                log.warning("runtime cleanup failed (the next reload will clear it): %s", err)

    def _save_server_state(self, content: str) -> None:
        """Dump `show servers state` to the config's server-state-file, if it names one, less the
        servers the renderer put in maintenance to delete them (leftovers): one that comes back in
        the file being reloaded would otherwise start in maintenance and never serve."""
        sections = parse_sections(content)
        state_file = global_value(sections, "server-state-file")
        if not state_file or self._runtime is None:
            return
        path = Path(state_file)
        base = global_value(sections, "server-state-base")
        if not path.is_absolute() and base:
            path = Path(base) / path
        try:
            state = self._runtime.api.command(command("show", "servers", "state"))
            write_atomically(path, without_servers(state, self._runtime.leftovers))
        except (ReloadError, WriteError) as err:
            log.warning("could not save server state before the reload (%s); servers start fresh", err)

    @staticmethod
    def _run_command(spec: TemplateSpec) -> ApplyOutcome:
        assert spec.command is not None
        what = f"command `{spec.command}` for {spec.destination}"
        done = run_command(spec.command, spec.command_timeout, ReloadError, what)
        if not done.ok:
            raise ReloadError(f"{what} failed ({done.returncode}): {done.output}")
        log.info("ran `%s` for %s in %.0f ms", spec.command, spec.destination, done.duration_s * 1000)
        return ApplyOutcome(ApplyKind.COMMAND, done.duration_s)


def without_servers(state: str, servers: Collection[str]) -> str:
    """`show servers state` output without the rows of `servers` ("backend/server"); a server with
    no row starts as its config line says."""
    if not servers:
        return state
    kept = []
    for line in state.splitlines(keepends=True):
        fields = line.split()  # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...
        if len(fields) > 3 and not line.startswith("#") and f"{fields[1]}/{fields[3]}" in servers:
            continue
        kept.append(line)
    return "".join(kept)
