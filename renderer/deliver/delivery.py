"""The front door of delivery: "make HAProxy (or the template's command) run this rendered content".

`Delivery.deliver(spec, content)` is all the runner calls for a rendered file. Behind it, per
destination: parts of the file HAProxy rejected are left out and the rest applied (`quarantine`);
content that still fails validation is not tried again until it changes, and changed content is
checked again with a doubling backoff while it keeps failing; an apply that
failed is retried with a doubling backoff (`ApplyState`); the hitless path or validate → swap →
reload/command is chosen and carried out (`Installer`); failures found later (a file written
behind its runtime changes that fails its check) are reported through the same callback. The
runner also asks it when it next wants to act (`next_due`: a retry, servers still draining),
lets it do that work (`maintain`), hands it a new configuration on SIGHUP (`reconfigure`) and
waits for it on the way out (`flush`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import Applier, HAProxySide
from renderer.deliver.certs import EXPIRY_WARNING_DAYS, CertificateSync
from renderer.deliver.change import ChangeKind, ConfigChange
from renderer.deliver.install import RETRY_BASE_S, RETRY_MAX_S, ApplyState, Installer, RuntimeRefused
from renderer.deliver.quarantine import (
    MAX_ROUNDS,
    PortHolds,
    Quarantine,
    duplicate_binds,
    duplicate_binds_after,
    repair,
)
from renderer.deliver.runtime import membership_only
from renderer.deliver.write import live_bytes
from renderer.errors import ApplyKind, DeliveryError, ReloadError, RendererError, ValidationError, WriteError
from renderer.haproxy.child import HAProxyChild
from renderer.haproxy.control import bind_failures
from renderer.logs import shown
from renderer.source.dependency import KeyPair
from renderer.status import Status

log = logging.getLogger(__name__)

CLEANUP_INTERVAL_S = 0.1  # how often removed servers still draining are retried for deletion
TURN_AFTER_S = 0.01  # a change not first in line at the gap's end looks again this much later


class Outcome(StrEnum):
    """How a delivery went."""

    APPLIED = "applied"  # HAProxy (or the command) runs the content now
    UNCHANGED = "unchanged"  # it already did
    REJECTED = "rejected"  # its check failed (now or before): not tried again until it changes
    BACKING_OFF = "backing off"  # an earlier apply failed: retried when next_due() says
    DEFERRED = "deferred"  # the last content failed its check: this one is checked at check_at
    WAITING = "waiting"  # a reload waits out min_reload_interval (its servers went ahead): at gap_until
    FAILED = "failed"  # a write or an apply failed now (reported)


@dataclass(frozen=True)
class Delivered:
    """What `Delivery.deliver` did: its outcome, how it applied, the error it reported."""

    outcome: Outcome
    kind: ApplyKind = ApplyKind.NONE
    error: RendererError | None = None

    @property
    def served(self) -> bool:
        """HAProxy (or the command) runs the content."""
        return self.outcome in (Outcome.APPLIED, Outcome.UNCHANGED)


@dataclass
class _Destination:
    """What delivery remembers of one destination between renders (kept across a SIGHUP)."""

    apply: ApplyState = field(default_factory=ApplyState)
    rejected: str | None = None  # content that failed validation: not tried again until it changes
    quarantine: Quarantine = field(default_factory=Quarantine)  # parts HAProxy rejected, left out
    check_delay: float = RETRY_BASE_S  # while content keeps failing its check: the next try's wait
    check_at: float = 0.0  # (monotonic) no check of new content before this
    deferred: bool = False  # new content waits for `check_at`
    redo: bool = False  # a check behind runtime changes taught new parts to leave out: deliver again
    clashes: tuple[str, ...] = ()  # sections left out of the last content for a port already bound
    binds_free: str | None = None  # the last content (quarantine applied) with no port bound twice
    port_holds: PortHolds = field(default_factory=PortHolds)  # ports kept for listeners gone a moment
    served: str | None = None  # the content last applied: what HAProxy runs after a reload it refused
    gap_until: float | None = None  # (monotonic) a structural change waits for the reload gap until then
    waiting_since: float | None = None  # (monotonic) since when it waits: the oldest waiter reloads first
    # A write that failed (disk full, out of file descriptors): delivered again at `write_retry.retry_at`
    # (backing off), not only when the content next changes; `pending` while one is due.
    write_retry: ApplyState = field(default_factory=lambda: ApplyState(step="write"))

    def rejected_now(self, content: str) -> None:
        self.rejected = content
        self.check_at = time.monotonic() + self.check_delay
        self.check_delay = min(self.check_delay * 2, RETRY_MAX_S)

    def accepted(self) -> None:
        self.rejected, self.check_delay, self.check_at = None, RETRY_BASE_S, 0.0

    def wait_for_gap(self, wait: float) -> None:
        """A reload waits `wait` seconds for the gap; its turn counts from when it first waited."""
        self.gap_until = time.monotonic() + wait
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()


CERTIFICATES_FIRST_RETRY_S = 5.0  # then twice as long each time, up to 2 × RETRY_MAX_S


@dataclass
class _PendingCertificates:
    """Certificates HAProxy has not taken while its state is unknown (a transaction of another's
    open, no answer) and a reload did not settle it: offered again at `again_at`, later each time
    (no reload storm while HAProxy stays unreachable), and reported meanwhile (`why`)."""

    why: str | None = None
    again_at: float | None = None  # monotonic
    delay: float = field(default_factory=lambda: CERTIFICATES_FIRST_RETRY_S)

    def failed(self, reloaded: bool, reload_needed: str | None = None) -> str:
        how = (
            "HAProxy was reloaded, and still did not take them"
            if reloaded
            else "HAProxy was not reloaded (no master socket, or the reload failed)"
        )
        state = reload_needed or (
            "HAProxy's certificate state is unknown (no answer, or a transaction of another's open)"
        )
        self.why = (
            f"certificates not taken: {state} and {how}; the old ones are served; offered again in {self.delay:.0f} s"
        )
        self.again_at = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, RETRY_MAX_S * 2)
        return self.why

    def due(self) -> bool:
        """No retry is waiting out its backoff."""
        return self.again_at is None or time.monotonic() >= self.again_at

    def taken(self) -> None:
        self.why, self.again_at, self.delay = None, None, CERTIFICATES_FIRST_RETRY_S


class Delivery:
    """Makes HAProxy (or a template's command) run rendered content; one per renderer process."""

    def __init__(
        self,
        config: Config,
        status: Status,
        haproxy_bin: str | None,
        last_change: Callable[[Path], float | None],
        on_late_failure: Callable[[], None] | None = None,
        haproxy_child: HAProxyChild | None = None,
        interrupt: threading.Event | None = None,
        haproxy: HAProxySide | None = None,
    ) -> None:
        """`on_late_failure` is told when a failure is found later (a file written behind its
        runtime changes failed): `take_late_failures` then gives it; `interrupt` is set when the
        renderer stops, so that no apply keeps retrying a HAProxy that is gone;
        `haproxy` (default: an `Applier` made from `config`) carries out reloads, commands and runtime plans."""
        self._on_late_failure = on_late_failure
        self._late: list[tuple[TemplateSpec, RendererError]] = []
        self._status = status
        self._destinations: dict[Path, _Destination] = {}
        self._config = config
        self._child = haproxy_child
        self._certs: CertificateSync | None = None
        self._certificates_pending = _PendingCertificates()
        self._pass_began = 0.0  # (monotonic) see pass_begins
        if config.certificates is not None:
            self._certs = CertificateSync(config.certificates[1], haproxy_bin=haproxy_bin, limit=config.certs_max)
        self._haproxy = haproxy or Applier(config, interrupt=interrupt)
        self._installer = Installer(
            self._haproxy,
            status,
            haproxy_bin,
            last_change,
            haproxy_child,
            # --once: nobody to tell later, so the file is finished before deliver() returns.
            on_file_error=None if config.once else self._file_failed,
            on_file_written=self._file_written,
        )

    async def deliver(self, spec: TemplateSpec, content: str) -> Delivered:
        """Make HAProxy (or the command) run `content`, less any part HAProxy rejects, and say how
        it went (`Delivered`, with the error to report when it failed). Never raises for what the
        content holds: an unexpected error comes back as a DeliveryError."""
        delivered = await self._deliver(spec, content, ahead=False)
        assert delivered is not None  # only a delivery ahead of its turn declines
        self._settled(spec, delivered)
        return delivered

    async def deliver_ahead(self, spec: TemplateSpec, content: str) -> Delivered | None:
        """`deliver`, ahead of the templates listed before this one, when its change reads no file
        they write (`ConfigChange.reads_no_file`: HAProxy runs it already, or takes it through the
        Runtime API alone). None for any other change and for content held back (rejected, backing
        off, deferred), having applied nothing; None too when HAProxy refuses a runtime step, some
        of the plan's steps applied (additions first: no backend is left short) and HAProxy's
        state now unknown: the caller delivers it in its turn, after those files, and that
        delivery reloads."""
        delivered = await self._deliver(spec, content, ahead=True)
        if delivered is not None:
            self._settled(spec, delivered)
        return delivered

    def _settled(self, spec: TemplateSpec, delivered: Delivered) -> None:
        """After a delivery: a destination no longer waiting for the reload gap gives up its turn
        (see `_my_turn`); a reload read the certificate files as the sync before it wrote them."""
        destination = self._destination(spec.destination)
        if delivered.outcome is not Outcome.WAITING:
            destination.gap_until = destination.waiting_since = None
        if delivered.kind is ApplyKind.RELOAD and self._certs is not None:
            self._certs.reload_needed = None

    async def _deliver(self, spec: TemplateSpec, content: str, ahead: bool) -> Delivered | None:
        destination = self._destination(spec.destination)
        destination.redo = False
        if not ahead:  # set again if it still waits (a declined delivery ahead keeps its turn)
            destination.gap_until = None
        destination.write_retry.pending = False  # due again only if this delivery's write fails too
        # A port two sections bind stays with the one serving it in the live file.
        content, clashes = duplicate_binds_after(
            destination.quarantine.apply(content), destination.binds_free, spec.destination, destination.port_holds
        )
        destination.clashes = tuple(part.describe() for part in clashes)
        destination.binds_free = None if clashes else content
        held = self._held(destination, content)
        if held is not None:
            return None if ahead else Delivered(held)
        try:
            change = self._installer.change(spec, destination.apply, content)
            wait = 0.0 if ahead else self._reload_wait(spec, destination, change)
            if wait > 0:
                return await self._while_reload_waits(spec, destination, change, wait)
            return await self._install(spec, destination, content, change, ahead)
        except RuntimeRefused:
            return None
        except WriteError as err:
            return self._write_failed(spec, destination, err)
        except RendererError as err:
            return self._failed(err)
        except Exception as err:  # contained: the renderer and HAProxy go on with the last good file
            log.exception("delivering %s failed unexpectedly", spec.destination)
            return self._failed(DeliveryError(f"unexpected {type(err).__name__} while applying: {err}"))

    @staticmethod
    def _held(destination: _Destination, content: str) -> Outcome | None:
        """Why `content` is not tried now, if it is not: rejected before, an apply backing off, or a
        check backoff after rejected content."""
        if content == destination.rejected and not destination.apply.pending:
            return Outcome.REJECTED
        if destination.apply.backing_off:
            return Outcome.BACKING_OFF  # an apply failed: its retry comes when next_due() says so
        destination.deferred = destination.rejected is not None and time.monotonic() < destination.check_at
        if destination.deferred:
            return Outcome.DEFERRED  # the last content failed its check: this one is checked at check_at
        return None

    def _reload_wait(self, spec: TemplateSpec, destination: _Destination, change: ConfigChange) -> float:
        """Seconds a reload of `change` must wait for the reload gap (`ReloadPace`): 0 when it may
        go now, and for any change whose apply does not reload HAProxy. Every reload waits: a new
        file's, a pending apply's (HAProxy's state unknown: a runtime step refused, a reload or an
        undo failed), and with `apply = "reload"` too; `Applier.reload`'s own floor is reached by
        --once alone. When the gap ends, the destination waiting longest goes first (`_my_turn`): the gap is
        HAProxy's, shared by every template and the certificates, and one reloading first at each
        gap's end (a registrant flapping its settings there) held another's change back for good
        (an attacker's review, /tmp/rev22). No delivery sleeps through a gap (/tmp/rev24)."""
        if self._config.once or change.kind is not ChangeKind.STRUCTURAL or not self._haproxy.apply_reloads(spec):
            return 0.0
        if self._installer.starts_haproxy(spec):  # exec mode's first start: no reload
            return 0.0
        wait = self._haproxy.reload_wait()
        if wait <= 0 and self._my_turn(destination):
            return 0.0
        # After the older waiter's delivery in this pass: the next pass finds the gap it began, or
        # its turn if that one reloaded nothing (it waited a whole interval for nothing before).
        return wait if wait > 0 else TURN_AFTER_S

    def _my_turn(self, destination: _Destination) -> bool:
        """No other destination has waited for the reload gap longer than `destination`."""
        mine = destination.waiting_since
        return not any(
            other is not destination
            and other.gap_until is not None
            and other.waiting_since is not None
            and (mine is None or other.waiting_since < mine)
            for other in self._destinations.values()
        )

    async def _while_reload_waits(
        self, spec: TemplateSpec, destination: _Destination, change: ConfigChange, wait: float
    ) -> Delivered:
        """A structural change whose reload must wait for the gap: the servers it changes in
        backends it leaves otherwise alone go through the Runtime API now (`membership_only`), the
        rest with the reload when the gap ends (`next_retry`). The delivery slept through the gap
        before: while one service's settings flapped, every other service's new instance waited
        for the next reload, ~1.5 s (an attacker's review, /tmp/rev18)."""
        destination.wait_for_gap(wait)
        state = destination.apply
        # An apply pending after refused runtime steps: HAProxy runs what it ran but in their
        # backends, and the other backends' servers go on (an attacker's review, /tmp/rev28: a
        # registrant HAProxy refused at each pass held every service's new instance back).
        base = change.running if change.running is not None else state.known_running
        if base is None or not self._haproxy.hitless(spec):  # unknown, or no Runtime API: all at the gap's end
            log.debug("%s: the reload of a pending apply waits %.0f ms for the gap", spec.destination, wait * 1000)
            return Delivered(Outcome.WAITING)
        part = await asyncio.to_thread(membership_only, base, change.content, state.unknown)
        if part is not None:
            partial = (
                self._installer.change(spec, state, part)
                if change.running is not None
                else ConfigChange.of(part, base, None, hitless=True)
            )
            if partial.plan is not None:
                # Refused: HAProxy's state is unknown there (pending), and the reload at the gap's end settles it.
                with contextlib.suppress(RuntimeRefused):
                    await self._installer.install(spec, state, partial)
                    if state.pending and state.known_running is not None:
                        state.known_running = part  # HAProxy runs it now, but in `unknown`
        log.debug("%s: structural change waits %.0f ms for the reload gap", spec.destination, wait * 1000)
        return Delivered(Outcome.WAITING)

    async def _install(
        self, spec: TemplateSpec, destination: _Destination, content: str, change: ConfigChange, ahead: bool
    ) -> Delivered | None:
        """Install `content` (`change`: against what HAProxy runs); when its check names parts in
        backends, leave them out and try again (ahead: only while the change still reads no file)."""
        for _ in range(MAX_ROUNDS + 1):
            if ahead and not change.reads_no_file:
                return None
            try:
                if ahead:  # refused: RuntimeRefused, delivered again in its turn (`_deliver`)
                    kind = await self._installer.install(spec, destination.apply, change)
                else:
                    done = await self._install_in_turn(spec, destination, content, change)
                    if isinstance(done, Delivered):
                        return done
                    kind = done
            except ValidationError as err:
                repaired = self._leave_out_rejected(destination, content, change.base, err)
                if repaired is None:
                    destination.rejected_now(content)
                    await self._apply_live(spec, destination)
                    return self._failed(err, Outcome.REJECTED)
                content = repaired
                change = self._installer.change(spec, destination.apply, content)
                continue
            except WriteError as err:
                return self._write_failed(spec, destination, err)
            except ReloadError as err:
                if bind_failures(str(err)):  # refused: HAProxy's old workers run what they ran
                    destination.apply.serving = change.running or change.serving or destination.served
                refused = await asyncio.to_thread(self._installer.refused_binds, spec, err, content)
                if refused is None:
                    return self._failed(err)
                repaired = self._leave_out_rejected(destination, content, destination.apply.serving, refused)
                if repaired is None:
                    return self._failed(err)
                log.warning("%s: HAProxy could not bind listeners of it: they are left out (%s)",
                            spec.destination, shown(str(refused), 400))  # fmt: skip
                content = repaired
                change = self._installer.change(spec, destination.apply, content)
                continue
            destination.accepted()
            destination.served = content
            if kind in (ApplyKind.RELOAD, ApplyKind.START):  # HAProxy read every file: each runs its live one
                for other in self._destinations.values():  # (a refused one's old workers are gone: helper-152's F3)
                    other.apply.serving = None
            if change.plan is None and not change.behind:  # written (a runtime change's: see _file_written)
                destination.write_retry.succeeded()
            return Delivered(Outcome.UNCHANGED if change.kind is ChangeKind.SAME else Outcome.APPLIED, kind)
        destination.rejected_now(content)
        await self._apply_live(spec, destination)
        error = ValidationError(f"still rejected after leaving out {MAX_ROUNDS} parts: giving up")
        return self._failed(error, Outcome.REJECTED)

    async def _install_in_turn(
        self, spec: TemplateSpec, destination: _Destination, content: str, change: ConfigChange
    ) -> ApplyKind | Delivered:
        """Install `change`. A runtime step HAProxy refuses leaves its state unknown (the apply
        pending), and the reload that settles it waits for the gap and its turn like any other
        (`_reload_wait`): it went at once before, `Applier.reload` slept through the gap in the
        delivery's thread and took the gap's end, so an attacker re-registering an instance with
        other keywords while its old entry drained held another template's change back for good
        (an attacker's review, /tmp/rev25)."""
        try:
            return await self._installer.install(spec, destination.apply, change)
        except RuntimeRefused:
            change = self._installer.change(spec, destination.apply, content)  # pending: a reload
            wait = self._reload_wait(spec, destination, change)
            if wait > 0:
                return await self._while_reload_waits(spec, destination, change, wait)
            return await self._installer.install(spec, destination.apply, change)

    async def _apply_live(self, spec: TemplateSpec, destination: _Destination) -> None:
        """New content was rejected while an apply of the live file is pending: apply the live file
        (see Installer.apply_live). Before, the pending apply waited for content that passes its
        check, so HAProxy went on running the runtime steps of a file whose check had failed and
        whose undo had failed too. A failure is reported here; the apply's backoff goes on."""
        try:
            await self._installer.apply_live(spec, destination.apply)
        except RendererError as err:
            log.error("applying %s as it is, after new content was rejected, failed: %s", spec.destination, err)
        except Exception:  # contained: the rejection is what this delivery reports
            log.exception("applying %s as it is, after new content was rejected, failed unexpectedly", spec.destination)

    @staticmethod
    def _failed(err: RendererError, outcome: Outcome = Outcome.FAILED) -> Delivered:
        return Delivered(outcome, error=err)

    @staticmethod
    def _write_failed(spec: TemplateSpec, destination: _Destination, err: WriteError) -> Delivered:
        """A write that failed is tried again after a backoff, whether or not the data changes."""
        destination.write_retry.pending = True
        destination.write_retry.failed(spec.destination)
        return Delivered(Outcome.FAILED, error=err)

    def _leave_out_rejected(
        self, destination: _Destination, content: str, live: str | None, err: ValidationError
    ) -> str | None:
        """`content` without the backend parts HAProxy's check named (remembered), or None; `live`:
        what HAProxy runs, whose version of a rejected section stands in for it."""
        repaired = repair(content, str(err), live)
        if repaired is None:
            return None
        destination.quarantine.parts += repaired[1]  # the runner reports them with the left-out instances
        # A section's live version stands in for it, with its live bind lines: the port may be
        # another's by now. Settled again, so that two sections never bind one port.
        settled, clashes = duplicate_binds(repaired[0], live, destination.port_holds)
        destination.clashes += tuple(part.describe() for part in clashes)
        return settled

    def prepare_certificates(self) -> None:
        """The certificate directory and its crt-list, before HAProxy first reads its config."""
        if self._certs is not None:
            self._certs.prepare()

    async def sync_certificates(self, pairs: tuple[KeyPair, ...]) -> None:
        """Serve exactly the valid certificates in `pairs` (see certs.py), through the Runtime API
        when HAProxy runs. When HAProxy's state is unknown (no answer, or a certificate transaction
        open for another file), it is reloaded on the files it serves, which ends every transaction,
        and the same certificates are offered to the new process at once (a new file is written
        only once HAProxy took it, so the reload alone would not serve it)."""
        certs = self._certs
        if certs is None:
            return
        runtime = self._haproxy.runtime
        # Before HAProxy first runs our file, files are enough: it reads them when it starts.
        certs.runtime = runtime.api if runtime is not None and self._haproxy_runs() else None
        changes, reloaded = await self._offer_certificates(certs, pairs), False
        if changes is None and self._certificate_reload_waits():  # a note of an earlier failure stays
            if self._certificates_pending.why is None:
                self._certificates_pending.why = (
                    "certificates not taken yet: HAProxy's certificate state is unknown (no answer, or a "
                    "transaction of another's open); the reload that settles it waits for the reload gap"
                )
                log.warning("%s", self._certificates_pending.why)
            self._status.set_certificates(certs.expiries())
            return
        if changes is None:
            reloaded = await self._reload_for_certificates()
            if reloaded:
                certs.reload_needed = None  # the new process read the list as it is now
            again = await self._offer_certificates(certs, pairs) if reloaded else None
            changes = ["reloaded", *again] if again is not None else None
        if changes is not None and certs.reload_needed is not None:  # the default certificate went
            if self._certificate_reload_waits():
                for change in changes:  # the reload waits out its backoff or the gap; its note stays
                    log.info("certificates: %s", change)
                self._status.set_certificates(certs.expiries())
                return
            reloaded = await self._reload_for_certificates()
            if reloaded:
                certs.reload_needed = None
                changes = [*changes, "reloaded"]
            else:
                changes = None
        if changes is None:
            log.warning("certificates: %s", self._certificates_pending.failed(reloaded, certs.reload_needed))
        else:
            self._certificates_pending.taken()
            for change in changes:
                log.info("certificates: %s", change)
        self._status.set_certificates(certs.expiries())

    def _certificate_reload_waits(self) -> bool:
        """A reload for the certificates waits: its backoff, or the reload gap (`_certificate_reload_yields`)."""
        return not self._certificates_pending.due() or self._certificate_reload_yields()

    def _certificate_reload_yields(self) -> bool:
        """A reload for the certificates yields to the reload gap rather than sleep through it in
        the delivery's thread: to a template's change waiting for it, whose reload reads the
        certificate files too (`_settled`), and while the gap runs (offered again at its end). It
        took the gap's end first at each pass, and a template's change waiting for it never went
        (/tmp/rev24). Offered again when the last waiter's gap ends, not at a time already past:
        the loop would pass again and again, the certificates yielding each time."""
        waiting = [d.gap_until for d in self._destinations.values() if d.gap_until is not None]
        if waiting:
            self._certificates_pending.again_at = max(waiting)
            return True
        wait = self._haproxy.reload_wait()
        if wait > 0:
            self._certificates_pending.again_at = time.monotonic() + wait
            return True
        return False

    async def _offer_certificates(self, certs: CertificateSync, pairs: tuple[KeyPair, ...]) -> list[str] | None:
        """`certs.sync(pairs)`'s changes; None when HAProxy's state is unknown (the caller reloads)."""
        try:
            return await asyncio.to_thread(certs.sync, pairs)
        except ReloadError as err:
            log.warning("certificate update through the Runtime API failed (%s): reloading HAProxy", err)
            return None
        except Exception:  # contained: a certificate never stops the renderer
            log.exception("certificate update failed unexpectedly")
            return []

    def _haproxy_runs(self) -> bool:
        if self._child is not None and not self._child.started:
            return False
        return any(t.haproxy and t.destination.exists() for t in self._config.templates)

    async def _reload_for_certificates(self) -> bool:
        """Reload HAProxy on its files: True when it was (never without a master socket)."""
        try:
            outcome = await asyncio.to_thread(self._haproxy.reload_running)
        except ReloadError as err:
            log.error("reloading HAProxy for its certificates failed: %s", err)
            return False
        if outcome is None:
            return False
        self._status.applied(outcome.kind)  # counted like every other reload (/status, the metric)
        return True

    def certificate_notes(self) -> dict[tuple[str, str], str]:
        """Certificates refused (the old one keeps serving) or expiring within 14 days: (what,
        name) → the sentence (an expiry's days left change from pass to pass, its key does not)."""
        if self._certs is None:
            return {}
        notes = {
            ("refused", name): f"certificate key {name!r} refused: {why}"
            for name, why in sorted(self._certs.refused.items())
        }
        if self._certs.beyond:
            first = ", ".join(shown(key, 60) for key in self._certs.beyond[:3])
            notes["refused", ""] = (
                f"{len(self._certs.beyond)} certificate key(s) past certs_max ({self._certs.limit}) not served "
                f"(the first: {first}): raise certs_max or delete keys under the prefix"
            )
        if self._certificates_pending.why is not None:
            notes["pending", ""] = self._certificates_pending.why
        for name, seconds in sorted(self._certs.expiries().items()):
            if seconds < EXPIRY_WARNING_DAYS * 86400:
                notes["expiring", name] = f"certificate {name} expires in {seconds / 86400:.1f} days"
        return notes

    def left_out(self, destination: Path) -> tuple[str, ...]:
        """The parts of a destination's rendered file left out because HAProxy rejected them."""
        found = self._destinations.get(destination)
        return found.quarantine.described() + found.clashes if found is not None else ()

    def next_retry(self) -> float | None:
        """When delivery wants to deliver again without new content (monotonic): a failed apply's
        retry, new content waiting out a check backoff, a redo after parts were left out, or a part
        left out or a port hold that expires, or a certificate in KV that becomes valid."""
        # A pending apply whose new content waits out a check backoff is retried with it, at check_at.
        # One waiting for the reload gap is retried at the gap's end (below).
        due = [
            d.apply.retry_at
            for d in self._destinations.values()
            if d.apply.pending and not d.deferred and d.gap_until is None
        ]
        due += [d.check_at for d in self._destinations.values() if d.deferred]
        due += [time.monotonic() for d in self._destinations.values() if d.redo]
        due += [d.write_retry.retry_at for d in self._destinations.values() if d.write_retry.pending]
        due += [self._certificates_pending.again_at] if self._certificates_pending.again_at is not None else []
        valid_from = self._certs.due_at() if self._certs is not None else None
        due += [valid_from] if valid_from is not None and valid_from > self._pass_began else []
        due += [at for d in self._destinations.values() for at in self._expiries(d) if at > self._pass_began]
        # Due until a pass begins after it, as expiries are: a template that pass does not deliver
        # (waiting for data) must not keep the loop awake.
        due += [d.gap_until for d in self._destinations.values() if d.gap_until and d.gap_until > self._pass_began]
        return min(due) if due else None

    def pass_begins(self) -> None:
        """The loop begins a pass over the templates: what expired before now is let go by it."""
        self._pass_began = time.monotonic()

    @staticmethod
    def _expiries(destination: _Destination) -> list[float]:
        """When a part left out is tried again or a port hold ends: the loop renders and delivers
        then, so that a newcomer waiting for a held port, or a part whose cause went away (another
        process freed its port), needs no catalog change to come in. Each is due until a pass over
        the templates begins after it (`pass_begins`): that pass lets it go, or its template is not
        delivered (waiting for data) and no loop spins on it."""
        return destination.quarantine.expiries() + destination.port_holds.expiries()

    def reload_pace(self) -> tuple[float, float]:
        """(the gap HAProxy's next reload keeps from the last, min_reload_interval): the first
        grows past the second in a storm of reloads (`ReloadPace`)."""
        return self._haproxy.reload_gap(), self._config.min_reload_interval

    def next_cleanup(self) -> float | None:
        """When removed servers still draining should be tried for deletion again, or None."""
        return time.monotonic() + CLEANUP_INTERVAL_S if self._haproxy.has_cleanup else None

    def retry_due(self) -> bool:
        """True when a failed apply is due for its retry (the runner then renders and delivers)."""
        due = self.next_retry()
        return due is not None and due <= time.monotonic()

    def take_late_failures(self) -> list[tuple[TemplateSpec, RendererError]]:
        """Failures found behind a delivery (see `on_late_failure`), each once."""
        late, self._late = self._late, []
        return late

    async def maintain(self) -> None:
        """Delete servers that were removed and are still draining, if any."""
        if self._haproxy.has_cleanup:
            await asyncio.to_thread(self._haproxy.cleanup)

    def reconfigure(self, config: Config) -> None:
        """A new configuration (SIGHUP): a new applier, with the servers still draining and the time
        of the last reload carried over; rejected content may be tried again."""
        self._haproxy = self._installer.applier = self._haproxy.reconfigured(config)
        self._config = config
        if self._certs is not None:  # certs_max raised or lowered takes effect at the next sync
            self._certs.relimit(config.certs_max)
        for destination in self._destinations.values():
            destination.accepted()  # rejected content may be tried again, at once
            destination.deferred = False
            destination.gap_until = destination.waiting_since = None  # every template renders again

    async def flush(self) -> None:
        """Wait for files still being written behind their runtime changes."""
        await self._installer.flush()

    def _destination(self, path: Path) -> _Destination:
        found = self._destinations.get(path)
        if found is None:
            found = self._destinations[path] = _Destination(port_holds=PortHolds.for_destination(path))
        return found

    async def not_delivered(self, spec: TemplateSpec) -> None:
        """`spec`'s template rendered nothing to deliver this pass (a render error, data it waits
        for). An apply pending with HAProxy's state unknown (a runtime step or an undo HAProxy
        refused, a reload that failed) brings HAProxy to the live file, in the reload gap's turn:
        it waited for the template to render again, and HAProxy ran the runtime steps of content
        that had failed its check meanwhile (an attacker's review, /tmp/rev32). Anything else due
        for it waits its backoff again, or the next render, since the loop would otherwise wake
        every 10 ms for a retry that cannot happen."""
        found = self._destinations.get(spec.destination)
        if found is None:
            return
        try:
            if found.apply.pending and not found.apply.backing_off and await self._apply_live_in_turn(spec, found):
                return
        except Exception:  # contained: the backoff below keeps the loop from waking for it at once
            log.exception("bringing HAProxy to %s as it is failed unexpectedly", spec.destination)
        found.apply.postpone()
        found.write_retry.postpone()
        found.redo = found.deferred = False  # the next content is delivered (and checked) when it comes
        found.gap_until = found.waiting_since = None

    async def _apply_live_in_turn(self, spec: TemplateSpec, destination: _Destination) -> bool:
        """Apply the live file as it is (`Installer.apply_live`) when the reload gap and its turn
        allow, else wait for them (`next_retry`): False when there is no live file."""
        live = live_bytes(spec.destination)
        if live is None:
            return False
        change = self._installer.change(spec, destination.apply, live.decode(errors="replace"))
        wait = self._reload_wait(spec, destination, change)
        if wait > 0:
            destination.wait_for_gap(wait)
            return True
        destination.gap_until = destination.waiting_since = None
        await self._apply_live(spec, destination)
        return True

    def _file_written(self, spec: TemplateSpec) -> None:
        """A file written behind its runtime changes: a later failed write starts its backoff afresh."""
        self._destination(spec.destination).write_retry.succeeded()

    def _file_failed(self, spec: TemplateSpec, err: RendererError, content: str) -> None:
        """A file written behind its runtime changes failed its check (or its write): HAProxy was
        brought back to the live file. Parts of backends the check named are left out and the
        rest delivered again at once; otherwise the same content is not tried again until it changes."""
        destination = self._destination(spec.destination)
        if isinstance(err, ValidationError):
            live = live_bytes(spec.destination)
            running = live.decode(errors="replace") if live is not None else None
            if self._leave_out_rejected(destination, content, running, err) is not None:
                destination.redo = True  # the loop delivers again (retry_due), reporting nothing
                self._tell_loop()
                return
            destination.rejected_now(content)
        elif isinstance(err, WriteError):  # HAProxy was brought back to the live file: write it again later
            self._write_failed(spec, destination, err)
        self._late.append((spec, err))
        self._tell_loop()

    def _tell_loop(self) -> None:
        if self._on_late_failure is not None:
            self._on_late_failure()
