"""The front door of delivery: what it tries again, when, and what it reports (real files, real
check commands; HAProxy never involved: the templates here run a command, not a reload)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import ApplyOutcome
from renderer.deliver.delivery import Delivered, Delivery, Outcome
from renderer.deliver.install import RETRY_BASE_S
from renderer.deliver.runtime import RuntimeApplyError, ServerChange
from renderer.errors import ApplyKind, ReloadError, RendererError, ValidationError, WriteError
from renderer.status import Status
from tests.unit.fakes import FakeApplier


class Door:
    """The front door, with every error its outcomes carry collected in `reports` (as the loop reports them)."""

    def __init__(self, reports: list[RendererError], config: Config | None = None) -> None:
        self._reports = reports
        self._delivery = Delivery(config or Config(), Status(templates=1), None, lambda _: 0.0)

    async def deliver(self, spec: TemplateSpec, content: str) -> Delivered:
        delivered = await self._delivery.deliver(spec, content)
        if delivered.error is not None:
            self._reports.append(delivered.error)
        return delivered

    def __getattr__(self, name: str) -> Any:
        return getattr(self._delivery, name)


def delivery(reports: list[RendererError], config: Config | None = None) -> Door:
    return Door(reports, config)


def spec(tmp_path: Path, check: str | None = None, command: str | None = None) -> TemplateSpec:
    return TemplateSpec(tmp_path / "t.j2", tmp_path / "out.cfg", check_command=check, command=command)


def test_content_that_failed_its_check_is_not_tried_again_until_it_changes(tmp_path: Path) -> None:
    """…and new content is checked with a doubling backoff while checks keep failing, never in a
    tight loop; next_due says when, and the waiting content goes in then."""
    reports: list[RendererError] = []
    door, target = delivery(reports), spec(tmp_path, check="grep -q good {path}")

    async def scenario() -> list[Outcome]:
        before = time.monotonic()
        results = [
            (await door.deliver(target, "bad\n")).outcome,
            (await door.deliver(target, "bad\n")).outcome,  # the same content: not checked again
            (await door.deliver(target, "good\n")).outcome,  # new content within the backoff: waits
        ]
        due = door.next_retry()
        assert due is not None and before < due <= time.monotonic() + RETRY_BASE_S  # one backoff, no slack
        await asyncio.sleep(due - time.monotonic() + 0.01)
        assert door.retry_due()
        return [*results, (await door.deliver(target, "good\n")).outcome]

    assert asyncio.run(scenario()) == [Outcome.REJECTED, Outcome.REJECTED, Outcome.DEFERRED, Outcome.APPLIED]
    assert [type(r) for r in reports] == [ValidationError]
    assert (tmp_path / "out.cfg").read_text() == "good\n"
    assert door.next_retry() is None and not door.retry_due()


def test_an_unexpected_error_is_contained_and_reported(tmp_path: Path) -> None:
    reports: list[RendererError] = []
    door, target = delivery(reports), spec(tmp_path, command="true")
    target_dir = tmp_path / "out.cfg"
    target_dir.mkdir()  # the destination is a directory: whatever breaks, deliver() does not raise
    delivered = asyncio.run(door.deliver(target, "x\n"))
    assert delivered.outcome is Outcome.FAILED and not delivered.served
    assert len(reports) == 1 and reports == [delivered.error]


def test_a_new_configuration_may_try_rejected_content_again(tmp_path: Path) -> None:
    reports: list[RendererError] = []
    door, target = delivery(reports), spec(tmp_path, check="false")

    async def scenario() -> None:
        await door.deliver(target, "x\n")
        door.reconfigure(Config())
        await door.deliver(target, "x\n")

    asyncio.run(scenario())
    assert [type(r) for r in reports] == [ValidationError, ValidationError]


def test_a_failed_apply_backs_off_and_says_when_it_is_due(tmp_path: Path) -> None:
    reports: list[RendererError] = []
    door, target = delivery(reports), spec(tmp_path, command="false")

    async def scenario() -> tuple[Outcome, Outcome]:
        first = await door.deliver(target, "x\n")
        again = await door.deliver(target, "x\n")  # within the backoff: not run
        return first.outcome, again.outcome

    before = time.monotonic()
    assert asyncio.run(scenario()) == (Outcome.FAILED, Outcome.BACKING_OFF)
    assert [type(r) for r in reports] == [ReloadError]
    due = door.next_retry()
    assert due is not None and due > before
    assert (tmp_path / "out.cfg").read_text() == "x\n"  # the file is installed; only its apply waits


def test_nothing_is_due_when_all_is_delivered(tmp_path: Path) -> None:
    reports: list[RendererError] = []
    door = delivery(reports)
    assert asyncio.run(door.deliver(spec(tmp_path, command="true"), "x\n")).outcome is Outcome.APPLIED
    assert door.next_retry() is None and not reports


def test_a_pending_apply_whose_content_was_rejected_applies_the_live_file_then_waits(tmp_path: Path) -> None:
    """HAProxy refused a runtime step (some steps of the plan went out: its state is unknown) and the
    reload's check then rejected the content. HAProxy is reloaded with the live file at once, so it
    runs what the file says; the rejected content is then held until it changes: no busy loop, and
    (before the live file was applied here) no retry of the pending apply against the same content."""
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("backend web\n    server a 10.0.0.1:80\n")
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="grep -q good {path}")
    applier = FakeApplier(runtime_fails=True)
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    content = "backend web\n    server a 10.0.0.1:80\n    server b 10.0.0.2:80\n"  # its check fails

    async def scenario() -> list[Outcome]:
        return [(await door.deliver(target, content)).outcome, (await door.deliver(target, content)).outcome]

    assert asyncio.run(scenario()) == [Outcome.REJECTED, Outcome.REJECTED]
    assert applier.calls == ["runtime", "reload"] and door.next_retry() is None


def test_a_newcomer_asking_for_a_live_listeners_port_is_left_out_not_the_live_one(tmp_path: Path) -> None:
    """The port clash is settled against the file HAProxy runs: the service serving the port keeps
    it, the registration that sorts before it is left out and reported."""
    reports: list[RendererError] = []
    door, target = delivery(reports), spec(tmp_path, command="true")
    db = "listen db\n    bind *:5432\n    server d 10.0.0.3:5432\n"
    newcomer = "listen a-new\n    bind *:5432\n    server n 10.0.0.9:5432\n"  # sorts before db
    front = "frontend http\n    bind *:80\n    default_backend web\n"

    async def scenario() -> list[Outcome]:
        first = await door.deliver(target, front + db)
        return [first.outcome, (await door.deliver(target, front + newcomer + db)).outcome]

    assert asyncio.run(scenario()) == [Outcome.APPLIED, Outcome.UNCHANGED]
    assert (tmp_path / "out.cfg").read_text() == front + db and not reports
    (left_out,) = door.left_out(target.destination)
    assert "listen a-new" in left_out and "port 5432 is already bound by listen db" in left_out


def test_the_live_file_applied_after_a_rejection_is_applied_as_it_is_byte_for_byte(tmp_path: Path) -> None:
    """A review's finding: the live file was decoded with errors="replace" and staged again, so a
    Latin-1 comment written by another tool came back as U+FFFD before the reload."""
    dest = tmp_path / "haproxy.cfg"
    original = "# good: the \xe9quipe r\xe9seau\nbackend web\n    server a 10.0.0.1:80\n".encode("latin-1")
    dest.write_bytes(original)
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="grep -q good {path}")
    applier = FakeApplier(runtime_fails=True)  # a runtime step refused: the apply is pending
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    content = "# bad\nbackend web\n    server a 10.0.0.1:80\n    server b 10.0.0.2:80\n"  # fails its check

    async def scenario() -> Outcome:
        return (await door.deliver(target, content)).outcome

    assert asyncio.run(scenario()) is Outcome.REJECTED
    assert applier.calls == ["runtime", "reload"] and dest.read_bytes() == original


def test_a_listeners_port_is_held_for_it_while_its_service_is_gone_for_a_moment(tmp_path: Path) -> None:
    """The destination keeps its port holds between deliveries (see quarantine.PortHolds)."""
    door, target = delivery([]), spec(tmp_path, command="true")
    db = "listen db\n    bind *:5432\n    server d 10.0.0.3:5432\n"
    newcomer = "listen a-new\n    bind *:5432\n    server n 10.0.0.9:5432\n"
    front = "frontend http\n    bind *:80\n    default_backend web\n"

    async def scenario() -> list[Outcome]:
        return [
            (await door.deliver(target, front + db)).outcome,
            (await door.deliver(target, front + newcomer)).outcome,  # db redeploying: out of the catalog
            (await door.deliver(target, front + newcomer + db)).outcome,  # back
        ]

    assert asyncio.run(scenario()) == [Outcome.APPLIED, Outcome.APPLIED, Outcome.APPLIED]
    assert (tmp_path / "out.cfg").read_text() == front + db
    (left_out,) = door.left_out(target.destination)
    assert "listen a-new" in left_out


class UndoFails(FakeApplier):
    """HAProxy side whose undo of runtime changes fails (the reload of the live file is refused)."""

    def revert_runtime(self, applied: str, running: str) -> None:
        self.calls.append("revert")
        raise ReloadError("HAProxy refused the reload; old workers keep serving")


def test_a_write_behind_whose_undo_fails_is_reported_and_its_apply_retried(tmp_path: Path) -> None:
    """A review's finding: the file written behind its runtime changes failed its check, and the
    undo's reload of the live file failed too. The ReloadError escaped the handler and the
    write-behind task died: nothing reported, no retry, the same content applied again silently."""

    dest = tmp_path / "haproxy.cfg"
    good = "backend web\n    server a 10.0.0.1:80\n"
    dest.write_text(good)
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="sh -c '! grep -q BAD $0' {path}")
    told: list[int] = []
    applier = UndoFails()
    door = Delivery(
        Config(), Status(templates=1), None, lambda _: 0.0, on_late_failure=lambda: told.append(1), haproxy=applier
    )

    async def scenario() -> tuple[Outcome, Outcome]:
        first = await door.deliver(target, good + "    server BAD 10.0.0.2:80\n")
        await door.flush()
        again = await door.deliver(target, good + "    server BAD 10.0.0.2:80\n")
        return first.outcome, again.outcome

    assert asyncio.run(scenario()) == (Outcome.APPLIED, Outcome.BACKING_OFF)  # pending: the next one reloads
    assert "revert" in applier.calls and told and [type(e) for _, e in door.take_late_failures()] == [ValidationError]
    assert door.next_retry() is not None and dest.read_text() == good


def test_after_a_failed_undo_the_live_file_is_applied_even_while_new_content_keeps_failing(tmp_path: Path) -> None:
    """Left undone last time, then mended: the undo of a write-behind failed, so its apply stayed
    pending, and it waited for content that passes its check. While the same content kept failing,
    HAProxy kept running the runtime steps of a file that was never installed. Now, once the
    apply's backoff has passed, a rejection applies the live file as it is: once, not at every
    rejection."""

    dest = tmp_path / "haproxy.cfg"
    good = "backend web\n    server a 10.0.0.1:80\n"
    bad = good + "    server BAD 10.0.0.2:80\n"
    dest.write_text(good)
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="sh -c '! grep -q BAD $0' {path}")
    applier = UndoFails()
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0, on_late_failure=lambda: None, haproxy=applier)

    async def scenario() -> list[Outcome]:
        outcomes = [(await door.deliver(target, bad)).outcome]
        await door.flush()  # the write-behind's check fails, and its undo too
        await asyncio.sleep(RETRY_BASE_S + 0.1)  # the apply's backoff (and the check's) passes
        outcomes.append((await door.deliver(target, bad)).outcome)
        outcomes.append((await door.deliver(target, bad)).outcome)
        return outcomes

    assert asyncio.run(scenario()) == [Outcome.APPLIED, Outcome.REJECTED, Outcome.REJECTED]
    assert applier.calls == ["runtime", "revert", "reload"]
    assert dest.read_text() == good and door.next_retry() is None  # held until the content changes


def test_a_failed_write_is_tried_again_after_a_backoff_without_new_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A review's finding: a write that failed (out of file descriptors while a client held a
    thousand connections to the status port; a full disk) was tried again only when the catalog next
    changed: the file stayed stale meanwhile. It is now due again after a backoff, and no longer
    once a delivery of the destination got past its write. The log calls it a write."""
    reports: list[RendererError] = []
    door = delivery(reports)
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "missing" / "out.cfg", command="true")

    async def first() -> Outcome:
        return (await door.deliver(target, "x\n")).outcome

    before = time.monotonic()
    assert asyncio.run(first()) is Outcome.FAILED and [type(r) for r in reports] == [WriteError]
    assert f"write of {target.destination} failed; retrying the write in 0.5s" in caplog.text
    due = door.next_retry()
    assert due is not None and before < due <= time.monotonic() + RETRY_BASE_S
    (tmp_path / "missing").mkdir()
    assert asyncio.run(first()) is Outcome.APPLIED and door.next_retry() is None


def test_a_failed_write_behind_runtime_changes_is_tried_again_too(tmp_path: Path, monkeypatch: Any) -> None:
    """A review's finding: the retry above covered the validate-and-swap path only; a membership
    change (runtime first, its file written behind) whose write failed was undone and then waited for
    the next catalog change."""
    import renderer.deliver.install as install

    dest = tmp_path / "haproxy.cfg"
    old = "backend web\n    server a 10.0.0.1:80\n"
    dest.write_text(old)
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="true")
    applier = FakeApplier()
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0, on_late_failure=lambda: None, haproxy=applier)

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise WriteError("No space left on device")

    create = install.StagedFile.create
    monkeypatch.setattr(install.StagedFile, "create", staticmethod(full_disk))
    changed = old + "    server b 10.0.0.2:80\n"

    async def retried() -> float:
        """As the loop does at a retry: the same content again; a pass during its write-behind
        delivers it once more (a review's finding: that pass reset the backoff)."""
        await door.deliver(target, changed)
        await door.deliver(target, changed)
        await door.flush()
        due = door.next_retry()
        assert due is not None
        return due - time.monotonic()

    async def scenario() -> tuple[list[float], float]:
        waits = [await retried() for _ in range(3)]
        monkeypatch.setattr(install.StagedFile, "create", create)  # the disk has room again
        await door.deliver(target, changed + "    server c 10.0.0.3:80\n")
        await door.flush()
        assert door.next_retry() is None
        monkeypatch.setattr(install.StagedFile, "create", staticmethod(full_disk))  # and is full once more
        return waits, await retried()

    waits, afresh = asyncio.run(scenario())
    assert applier.calls[:6] == ["runtime", "revert"] * 3 and "server c" in dest.read_text()
    # backing off (a review's finding: every 0.5 s, each time applying the change and undoing it)
    assert waits[1] > 1.5 * waits[0] and waits[2] > 1.5 * waits[1], waits
    assert afresh < waits[1]  # a file written in between: a new failure starts from the first delay


def test_a_retry_whose_template_renders_nothing_waits_its_backoff_instead_of_waking_the_loop_at_once(
    tmp_path: Path,
) -> None:
    """A review's reading: a retry came due while its template could not render (an error, data it
    waits for) stayed due in the past, and the loop woke every 10 ms for it."""
    reports: list[RendererError] = []
    door = delivery(reports)
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "missing" / "out.cfg", command="true")

    async def first() -> Outcome:
        return (await door.deliver(target, "x\n")).outcome

    assert asyncio.run(first()) is Outcome.FAILED
    due = door.next_retry()
    assert due is not None
    time.sleep(max(0.0, due - time.monotonic()) + 0.01)  # the retry is due …
    asyncio.run(door.not_delivered(target))  # … and the template rendered nothing
    again = door.next_retry()
    assert again is not None and again > time.monotonic() + RETRY_BASE_S  # its doubled backoff, not now


def haproxy_delivery(tmp_path: Path, live: str) -> tuple[Path, TemplateSpec, FakeApplier, Delivery]:
    """A live HAProxy file, its template (checked by `true`), the fake HAProxy side and a delivery."""
    dest = tmp_path / "haproxy.cfg"
    dest.write_text(live)
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="true")
    applier = FakeApplier()
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0, on_late_failure=lambda: None, haproxy=applier)
    return dest, target, applier, door


def test_while_a_reload_waits_for_its_gap_other_backends_servers_go_ahead_and_the_reload_follows(
    tmp_path: Path,
) -> None:
    """An attacker's review (/tmp/rev18): one service flipping its settings made a reload a second,
    and the delivery slept through each gap (`min_reload_interval`), so another service's new
    instance waited ~1.5 s for the next reload. Now the servers of backends the change leaves
    otherwise alone go through the Runtime API at once; the rest waits for the gap's end, when the
    loop delivers again (`next_retry`), and goes with the reload."""
    live = "backend evil\n    balance roundrobin\nbackend shop\n    server s1 10.0.0.1:80\n"
    dest, target, applier, door = haproxy_delivery(tmp_path, live)
    flipped = live.replace("roundrobin", "leastconn")
    content = flipped + "    server s2 10.0.0.2:80\n"

    async def scenario() -> tuple[Outcome, Outcome, Outcome]:
        applier.wait = 0.3
        waiting = await door.deliver(target, content)
        await door.flush()
        assert applier.calls == ["runtime"] and dest.read_text() == live + "    server s2 10.0.0.2:80\n"
        due = door.next_retry()
        assert due is not None and 0.2 < due - time.monotonic() <= 0.3
        nothing = await door.deliver(target, flipped.replace("leastconn", "first"))  # no server moved
        assert applier.calls == ["runtime", "runtime"]  # s2 goes: the file is what HAProxy runs
        applier.wait = 0.0  # the gap is over: the loop delivers again
        reloaded = await door.deliver(target, content)
        return waiting.outcome, nothing.outcome, reloaded.outcome

    assert asyncio.run(scenario()) == (Outcome.WAITING, Outcome.WAITING, Outcome.APPLIED)
    assert applier.calls[-1] == "reload" and dest.read_text() == content
    assert door.next_retry() is None


class GapApplier(FakeApplier):
    """A fake HAProxy side keeping a real reload gap: `reload_wait` counts from the last reload."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.interval, self.last = interval, 0.0

    def reload_wait(self) -> float:
        return max(0.0, self.last + self.interval - time.monotonic())

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        assert self.reload_wait() == 0.0, "a reload inside the gap (Applier.reload would sleep through it)"
        self.last = time.monotonic()
        self.calls.append(f"reload {spec.destination.name}")
        return ApplyOutcome(ApplyKind.RELOAD, 0.0)


def test_the_change_waiting_longest_for_the_reload_gap_goes_first_and_no_delivery_sleeps(tmp_path: Path) -> None:
    """Attackers' reviews: the gap is HAProxy's, shared by every template and the certificates. A
    registrant flapping its settings in one template reloaded first at each gap's end and restarted
    the gap, so another template's change waited for good (/tmp/rev22); letting that one go anyway
    had `Applier.reload` sleep through the gap in the delivery's thread at every other pass, every
    other service's new instance held back meanwhile (/tmp/rev24). The one waiting longest goes at
    the gap's end, and no reload is made inside a gap."""
    flapping, shop = tmp_path / "a.cfg", tmp_path / "b.cfg"
    flapping.write_text("backend evil\n    balance roundrobin\n")
    shop.write_text("backend shop\n    balance roundrobin\n")
    specs = [TemplateSpec(tmp_path / f"{p.stem}.j2", p, haproxy=True, check_command="true") for p in (flapping, shop)]
    applier = GapApplier(0.05)
    applier.last = time.monotonic()  # a reload just now: the gap runs
    door = Delivery(Config(templates=tuple(specs)), Status(templates=2), None, lambda _: 0.0, haproxy=applier)

    async def passes() -> list[Outcome]:
        outcomes = []
        for n in range(8):  # as the loop does: a pass, then the next at the retry (each gap's end)
            door.pass_begins()
            await door.deliver(specs[0], f"backend evil\n    balance {('first', 'leastconn')[n % 2]}\n")
            outcomes.append((await door.deliver(specs[1], "backend shop\n    balance leastconn\n")).outcome)
            due = door.next_retry()
            await asyncio.sleep(max(0.0, (due or time.monotonic()) - time.monotonic()) + 0.001)
        return outcomes

    outcomes = asyncio.run(passes())
    assert Outcome.APPLIED in outcomes[:3], outcomes  # at the first or second gap's end, not never
    assert shop.read_text() == "backend shop\n    balance leastconn\n"
    assert "reload a.cfg" in applier.calls  # the flapping one is served in its turn too


class RefusingGapApplier(GapApplier):
    """The reload gap kept, and every runtime step refused: an instance re-registered with other
    keywords while its old entry drains, say (runtime.py)."""

    def apply_runtime(self, plan: list[ServerChange]) -> ApplyOutcome:
        self.calls.append("runtime")
        raise RuntimeApplyError("`add server evil/s2` refused: s2 still drains with other keywords")


def two_gap_templates(tmp_path: Path, applier: GapApplier) -> tuple[list[TemplateSpec], Delivery]:
    """Two HAProxy templates (`a.cfg`: backend evil, one server; `b.cfg`: backend shop) sharing
    `applier`'s gap, which has just begun (a reload a moment ago)."""
    evil, shop = tmp_path / "a.cfg", tmp_path / "b.cfg"
    evil.write_text("backend evil\n    server s1 10.0.0.1:80\n")
    shop.write_text("backend shop\n    balance roundrobin\n")
    specs = [TemplateSpec(tmp_path / f"{p.stem}.j2", p, haproxy=True, check_command="true") for p in (evil, shop)]
    applier.last = time.monotonic()
    return specs, Delivery(Config(templates=tuple(specs)), Status(templates=2), None, lambda _: 0.0, haproxy=applier)


def test_a_refused_runtime_step_reloads_in_its_turn_at_the_gaps_end(tmp_path: Path) -> None:
    """An attacker's review (/tmp/rev25): a runtime step HAProxy refused reloaded at once, past the
    gap's turns, and `Applier.reload` slept through the gap in the delivery's thread; an attacker
    whose registration HAProxy refuses at every pass took each gap's end, and another template's
    change waiting for it never went. The refused change now waits for the gap and its turn."""
    applier = RefusingGapApplier(0.05)
    specs, door = two_gap_templates(tmp_path, applier)

    async def passes() -> list[tuple[Outcome, Outcome]]:
        outcomes = []
        for n in range(8):  # as the loop does: a pass, then the next at the retry
            door.pass_begins()
            evil = "backend evil\n    server s1 10.0.0.1:80\n" + ("    server s2 10.0.0.2:80\n" if n % 2 else "")
            first = await door.deliver(specs[0], evil)
            second = await door.deliver(specs[1], "backend shop\n    balance leastconn\n")
            outcomes.append((first.outcome, second.outcome))
            due = door.next_retry()
            assert due is None or due > time.monotonic() - 0.01, "a retry already due: the loop would spin"
            await asyncio.sleep(max(0.0, (due or time.monotonic() + 0.01) - time.monotonic()) + 0.001)
        return outcomes

    outcomes = asyncio.run(passes())  # GapApplier asserts that no reload is made inside a gap
    assert Outcome.FAILED not in [outcome for pair in outcomes for outcome in pair]  # no reload inside a gap
    assert Outcome.WAITING in [first for first, _ in outcomes]  # the refused one waited for the gap
    assert "reload b.cfg" in applier.calls[:4], applier.calls  # the shop went at a gap's end, not never
    assert "reload a.cfg" in applier.calls  # and the refused one in its turn


class RefusingEvilGapApplier(GapApplier):
    """The reload gap kept; HAProxy refuses every runtime step in backend `evil` (an instance
    re-registered with other keywords while its old entry drains) and takes the others."""

    def apply_runtime(self, plan: list[ServerChange]) -> ApplyOutcome:
        self.calls.append("runtime " + " ".join(step.describe() for step in plan))
        if any(step.backend == "evil" for step in plan):
            raise RuntimeApplyError("`add server evil/s2` refused: s2 still drains with other keywords")
        return ApplyOutcome(ApplyKind.RUNTIME, 0.0)


def test_while_a_refused_backend_waits_for_the_reload_the_other_backends_servers_go_at_once(tmp_path: Path) -> None:
    """An attacker's review (/tmp/rev28): after a runtime step HAProxy refused, the whole template's
    state was unknown until the reload at the gap's end, so every other service's new instance in
    it waited for that reload (up to a storm's gap) where a settings flap held back none. Only the
    refused plan's backends are unknown now; the others' servers go through the Runtime API."""
    live = "backend evil\n    server s1 10.0.0.1:80\nbackend shop\n    server a 10.0.1.1:80\n"
    dest = tmp_path / "haproxy.cfg"
    dest.write_text(live)
    spec = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="true")
    applier = RefusingEvilGapApplier(0.3)
    applier.last = time.monotonic()  # a reload just now: the gap runs
    door = Delivery(Config(templates=(spec,)), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    evil = live.replace("10.0.0.1:80\n", "10.0.0.1:80\n    server s2 10.0.0.2:80\n")
    shop_b = evil.replace("10.0.1.1:80\n", "10.0.1.1:80\n    server b 10.0.1.2:80\n")
    shop_c = shop_b.replace("10.0.1.2:80\n", "10.0.1.2:80\n    server c 10.0.1.3:80\n")

    async def scenario() -> list[Outcome]:
        outcomes = [(await door.deliver(spec, evil)).outcome]
        for content in (shop_b, shop_c):  # the shop's new instances, while the reload waits
            outcomes.append((await door.deliver(spec, content)).outcome)
            await door.flush()
        written = dest.read_text()  # what HAProxy is known to run: the shop's servers, not evil's
        assert "10.0.1.3:80" in written and "10.0.0.2" not in written
        due = door.next_retry()
        assert due is not None
        await asyncio.sleep(max(0.0, due - time.monotonic()) + 0.001)
        door.pass_begins()
        outcomes.append((await door.deliver(spec, shop_c)).outcome)  # the gap's end: the reload
        return outcomes

    assert asyncio.run(scenario()) == [Outcome.WAITING, Outcome.WAITING, Outcome.WAITING, Outcome.APPLIED]
    assert applier.calls == [
        "runtime add evil/s2 10.0.0.2:80",
        "runtime add shop/b 10.0.1.2:80",
        "runtime add shop/c 10.0.1.3:80",
        "reload haproxy.cfg",
    ]
    assert dest.read_text() == shop_c and door.next_retry() is None


class FailingOnceGapApplier(GapApplier):
    """The reload gap kept, and the first reload fails (the master CLI timed out, say)."""

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        if "failed" not in self.calls:
            self.calls.append("failed")
            raise ReloadError("master CLI: no answer to `reload` within 5 s")
        return super().apply(spec)


def test_a_pending_applys_retry_waits_for_the_gap_and_its_turn_without_spinning(tmp_path: Path) -> None:
    """A pending apply (a reload failed, HAProxy's state unknown) was retried past the gap's turns:
    `Applier.reload` slept through the gap in the delivery's thread (/tmp/rev25). Its retry now
    waits for the gap's end, and meanwhile the loop is not woken for its backoff, already over."""
    applier = FailingOnceGapApplier(0.2)
    specs, door = two_gap_templates(tmp_path, applier)
    applier.last = 0.0  # no gap: the first reload may go, and fails
    structural = "backend evil\n    balance leastconn\n    server s1 10.0.0.1:80\n"

    async def scenario() -> tuple[Outcome, Outcome, Outcome]:
        failed = await door.deliver(specs[0], structural)
        applier.last = time.monotonic()  # another template's reload: the gap runs
        await asyncio.sleep(RETRY_BASE_S + 0.01)  # the retry's backoff is over …
        applier.last = time.monotonic()  # … and another reload just began a gap again
        waiting = await door.deliver(specs[0], structural)
        due = door.next_retry()
        assert due is not None and due - time.monotonic() > 0.15  # the gap's end, not the past backoff
        await asyncio.sleep(due - time.monotonic() + 0.001)
        door.pass_begins()
        return failed.outcome, waiting.outcome, (await door.deliver(specs[0], structural)).outcome

    assert asyncio.run(scenario()) == (Outcome.FAILED, Outcome.WAITING, Outcome.APPLIED)
    assert applier.calls == ["failed", "reload a.cfg"] and door.next_retry() is None


def test_a_change_behind_an_older_waiter_that_reloads_nothing_goes_at_the_next_pass(tmp_path: Path) -> None:
    """At the gap's end the older waiter goes first; when its delivery then reloads nothing (its
    content went back to what HAProxy runs), the change behind it waited a whole interval for a
    reload that never came (the last note's item). It goes at the next pass now."""
    applier = GapApplier(1.0)
    specs, door = two_gap_templates(tmp_path, applier)
    evil = "backend evil\n    balance first\n    server s1 10.0.0.1:80\n"

    async def scenario() -> tuple[Outcome, Outcome, Outcome]:
        await door.deliver(specs[1], "backend shop\n    balance leastconn\n")  # the older waiter
        await door.deliver(specs[0], evil)
        applier.last -= 1.0  # the gap's end; a pass delivers in the templates' order:
        door.pass_begins()
        behind = await door.deliver(specs[0], evil)
        gone_back = await door.deliver(specs[1], "backend shop\n    balance roundrobin\n")  # what HAProxy runs
        due = door.next_retry()
        assert due is not None and due - time.monotonic() < 0.05, "a whole interval for a reload that never came"
        await asyncio.sleep(max(0.0, due - time.monotonic()) + 0.001)
        door.pass_begins()
        return behind.outcome, gone_back.outcome, (await door.deliver(specs[0], evil)).outcome

    assert asyncio.run(scenario()) == (Outcome.WAITING, Outcome.UNCHANGED, Outcome.APPLIED)
    assert applier.calls == ["reload a.cfg"]


def test_a_delivery_ahead_that_declines_keeps_the_turn_of_a_change_waiting_for_the_gap(tmp_path: Path) -> None:
    """A review (/tmp/rev24): a delivery ahead of its turn (an HAProxy template listed after plain
    files) cleared the wait it declined, so its change lost its place at the gap's end."""
    _, target, applier, door = haproxy_delivery(tmp_path, "backend evil\n    balance roundrobin\n")
    changed = "backend evil\n    balance leastconn\n"

    async def scenario() -> tuple[Outcome, Delivered | None]:
        applier.wait = 0.05
        waiting = await door.deliver(target, changed)
        return waiting.outcome, await door.deliver_ahead(target, changed)

    assert asyncio.run(scenario()) == (Outcome.WAITING, None)
    due = door.next_retry()
    assert due is not None and due > time.monotonic()  # still due at the gap's end


def test_a_pass_that_does_not_deliver_after_the_gap_does_not_keep_the_loop_awake(tmp_path: Path) -> None:
    _, target, applier, door = haproxy_delivery(tmp_path, "backend evil\n    balance roundrobin\n")

    async def scenario() -> None:
        applier.wait = 0.05
        assert (await door.deliver(target, "backend evil\n    balance leastconn\n")).outcome is Outcome.WAITING
        assert applier.calls == []  # no server changed: nothing goes ahead
        await asyncio.sleep(0.06)
        assert door.retry_due()
        door.pass_begins()  # a pass whose render waits for data: it never delivers
        assert not door.retry_due() and door.next_retry() is None

    asyncio.run(scenario())


class NoRuntimeGapApplier(GapApplier):
    """The reload gap kept and no Runtime API (`apply = "reload"`, or no master socket's runtime):
    every change to an HAProxy file is a reload."""

    def hitless(self, spec: TemplateSpec) -> bool:
        return False


async def two_passes(door: Delivery, deliveries: list[tuple[TemplateSpec, str]]) -> list[Outcome]:
    """The deliveries in a pass, then again in the pass at `next_retry` (the gap's end)."""
    outcomes = [(await door.deliver(target, content)).outcome for target, content in deliveries]
    due = door.next_retry()
    assert due is not None
    await asyncio.sleep(max(0.0, due - time.monotonic()) + 0.001)
    door.pass_begins()
    return outcomes + [(await door.deliver(target, content)).outcome for target, content in deliveries]


@pytest.mark.parametrize("runtime_api", [True, False])
def test_every_reload_takes_the_gaps_turns_a_new_file_and_without_the_runtime_api_too(
    tmp_path: Path, runtime_api: bool
) -> None:
    """The last note's open items: a change to a destination whose file was missing, and every
    change of a template HAProxy takes only by reloading (`apply = "reload"`), went past the gap's
    turns, and `Applier.reload` slept through the gap in the delivery's thread. Each waits now,
    and goes at the gap's end (GapApplier fails a reload inside the gap)."""
    applier = GapApplier(0.1) if runtime_api else NoRuntimeGapApplier(0.1)
    specs, door = two_gap_templates(tmp_path, applier)
    specs[1].destination.unlink()  # b.cfg: a new file
    new = "backend shop\n    balance leastconn\n"
    membership = "backend evil\n    server s1 10.0.0.1:80\n    server s2 10.0.0.2:80\n"
    outcomes = asyncio.run(two_passes(door, [(specs[1], new), (specs[0], membership)]))
    if runtime_api:  # the server goes through the Runtime API at once; the new file waits for the gap
        assert outcomes[:2] == [Outcome.WAITING, Outcome.APPLIED], outcomes
        assert applier.calls == ["runtime", "reload b.cfg"]
    else:  # both wait, and the one waiting longer goes first; the other at the next gap's end
        assert outcomes == [Outcome.WAITING, Outcome.WAITING, Outcome.APPLIED, Outcome.WAITING], outcomes
        assert applier.calls == ["reload b.cfg"]
    assert specs[1].destination.read_text() == new


def test_once_brings_haproxy_back_to_the_live_file_when_the_undo_is_refused(tmp_path: Path) -> None:
    """An undo HAProxy refuses no longer reloads inside `revert_runtime` (outside the gap's turns):
    the apply is left pending for delivery's turns. --once has no later delivery: it reloads the
    live file at once, and still reports the check's failure."""
    dest = tmp_path / "haproxy.cfg"
    good = "backend web\n    server a 10.0.0.1:80\n"
    dest.write_text(good)
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="sh -c '! grep -q BAD $0' {path}")
    applier = UndoFails()
    door = Delivery(Config(once=True), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    delivered = asyncio.run(door.deliver(target, good + "    server BAD 10.0.0.2:80\n"))
    assert isinstance(delivered.error, ValidationError)
    assert applier.calls == ["runtime", "revert", "reload"] and dest.read_text() == good


class UndoFailsGap(GapApplier):
    """The reload gap kept, and HAProxy refuses every undo of runtime changes."""

    def revert_runtime(self, applied: str, running: str) -> None:
        self.calls.append("revert")
        raise RuntimeApplyError("`del server web/BAD` refused")


def bad_server_refused_undo(tmp_path: Path) -> tuple[Path, TemplateSpec, UndoFailsGap, Delivery, str]:
    """A live HAProxy file (backends web and shop), a template whose check refuses a server named
    BAD, a HAProxy side refusing undos and keeping a 0.1 s gap, and the delivery."""
    dest = tmp_path / "haproxy.cfg"
    good = "backend web\n    server a 10.0.0.1:80\nbackend shop\n    server s1 10.0.0.5:80\n"
    dest.write_text(good)
    target = TemplateSpec(tmp_path / "t.j2", dest, haproxy=True, check_command="sh -c '! grep -q BAD $0' {path}")
    applier = UndoFailsGap(0.1)
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0, on_late_failure=lambda: None, haproxy=applier)
    return dest, target, applier, door, good


def test_after_a_refused_undo_the_live_file_is_reloaded_in_turn_though_the_template_renders_nothing(
    tmp_path: Path,
) -> None:
    """An attacker's review (/tmp/rev32): since the undo's reload waits for delivery's turns, a
    template that rendered nothing after it (a render error, data it waits for) postponed it, up
    to 30 s at a time, and HAProxy ran the servers of content that had failed its check."""
    dest, target, applier, door, good = bad_server_refused_undo(tmp_path)

    async def next_pass() -> None:
        due = door.next_retry()
        assert due is not None and due - time.monotonic() <= RETRY_BASE_S
        await asyncio.sleep(max(0.0, due - time.monotonic()) + 0.001)
        door.pass_begins()

    async def scenario() -> None:
        await door.deliver(target, good.replace("backend shop", "    server BAD 10.0.0.9:80\nbackend shop"))
        await door.flush()  # the check fails, and HAProxy refuses the undo: its retry backs off
        await door.not_delivered(target)  # the template renders nothing
        await next_pass()  # the backoff's end …
        applier.last = time.monotonic()  # … just after another reload: the gap runs
        await door.not_delivered(target)  # still nothing rendered
        assert applier.calls == ["runtime", "revert"]  # not inside the gap
        await next_pass()
        await door.not_delivered(target)  # still nothing rendered: the live file, at the gap's end

    asyncio.run(scenario())
    assert applier.calls == ["runtime", "revert", "reload haproxy.cfg"] and dest.read_text() == good
    assert door.next_retry() is None


def test_a_server_line_a_write_behind_check_names_is_left_out_and_the_rest_delivered_again(tmp_path: Path) -> None:
    """The runtime changes go first and the file is checked behind them; when that check names one
    server line (as `haproxy -c` does: `[file:LINE]`), the change is undone, that line left out of
    this and later renders, and the rest delivered again at once (no integration test drives this
    path since host-named servers are added by reload, fc8df08)."""
    live = "backend web\n    server a 10.0.0.1:80\n"
    dest, target, applier, door = haproxy_delivery(tmp_path, live)
    names_b = (
        "n=$(grep -n 'server b ' {path} | cut -d: -f1); [ -z \"$n\" ] || "
        "{ echo \"[ALERT]    (1) : config : [{path}:$n] : 'server web/b' : cannot resolve\" >&2; exit 1; }"
    )
    target = TemplateSpec(target.source, dest, haproxy=True, check_command=names_b)
    content = live + "    server b 10.0.0.2:80\n    server c 10.0.0.3:80\n"

    async def scenario() -> None:
        await door.deliver(target, content)
        await door.flush()  # the check behind the runtime changes fails, naming b's line: undone
        assert door.retry_due()  # the rest goes again at once
        await door.deliver(target, content)
        await door.flush()

    asyncio.run(scenario())
    assert applier.calls == ["runtime", "revert", "runtime"]
    assert dest.read_text() == live + "    server c 10.0.0.3:80\n"
    assert any("server b" in part for part in door.left_out(dest)), door.left_out(dest)


class TakenPortApplier(FakeApplier):
    """HAProxy's reload refuses every file that binds port 6379: another program took that port
    after the bind pre-check (HAProxy 2.8's startup log, as measured)."""

    def __init__(self, reason: str = "Address already in use", port: int = 6379) -> None:
        super().__init__()
        self.reason, self.port = reason, port

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        lines = spec.destination.read_text().splitlines()
        if f"    bind *:{self.port}" not in lines:
            return super().apply(spec)
        self.calls.append("refused")
        line = lines.index(f"    bind *:{self.port}") + 1
        raise ReloadError(
            "HAProxy refused the reload; old workers keep serving:\n"
            f"[ALERT]    (12) : Binding [{spec.destination}:{line}] for proxy redis: cannot bind socket "
            f"({self.reason}) for [0.0.0.0:{self.port}]\n"
            "[ALERT]    (12) : [haproxy.main()] Some protocols failed to start their listeners! Exiting."
        )


@pytest.mark.parametrize("before", ["", "listen redis\n    bind *:6380\n    server r 10.0.0.5:6379\n"])
def test_a_listener_haproxy_could_not_bind_at_its_reload_is_left_out_and_nothing_freezes(
    tmp_path: Path, before: str
) -> None:
    """A program took a TCP service's port between the bind pre-check and the reload: the reload
    failed, and so did every reload after it (the file binding the port was applied again, never
    checked again): no change reached HAProxy while that program held the port (end to end:
    test_service_settings). The listener is left out now, as the pre-check leaves one out (the
    version HAProxy runs stands in for it: a port change keeps the old port), and the port is
    remembered as that program's."""
    daemon = socket.socket()  # the program that took the port: it listens (a connection's port is not learnt)
    daemon.bind(("127.0.0.1", 0))
    daemon.listen()
    port = daemon.getsockname()[1]
    applier, reports = TakenPortApplier(port=port), []
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    door = Delivery(Config(templates=(target,)), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    front = "frontend http\n    bind *:80\n    default_backend web\n\nbackend web\n    server a 10.0.0.1:80\n"
    redis = f"listen redis\n    bind *:{port}\n    server r 10.0.0.5:6379\n"

    async def scenario() -> list[Outcome]:
        outcomes = [(await door.deliver(target, front + before)).outcome]
        outcomes.append((await door.deliver(target, front + redis)).outcome)
        later = front.replace("10.0.0.1:80\n", "10.0.0.1:80\n    server b 10.0.0.2:80\n")
        delivered = await door.deliver(target, later + redis)  # through the Runtime API: no reload
        await door.flush()
        reports.append(delivered.error)
        return [*outcomes, delivered.outcome]

    with daemon:
        assert asyncio.run(scenario()) == [Outcome.APPLIED, Outcome.APPLIED, Outcome.APPLIED]
    written = target.destination.read_text()
    assert f"bind *:{port}" not in written and "server b 10.0.0.2:80" in written
    assert (before in written) if before else "listen redis\n" in written  # the old port, or an empty stand-in
    assert applier.calls == ["reload", "refused", "reload", "runtime"]  # one refusal, then none
    (left,) = door.left_out(target.destination)
    assert "listen redis" in left and "HAProxy's reload" in left and "Address already in use" in left
    kept = json.loads((tmp_path / ".haproxy.cfg.busy-ports.json").read_text())
    assert str(port) in kept and reports == [None]


class FakeChild:
    """`--exec-haproxy`'s child, recording the file it was started on."""

    def __init__(self) -> None:
        self.started_on: list[Path] = []

    @property
    def started(self) -> bool:
        return bool(self.started_on)

    async def start(self, config: Path) -> None:
        self.started_on.append(config)


def test_exec_mode_starts_haproxy_on_a_live_file_that_holds_the_render_already(tmp_path: Path) -> None:
    """A restart of the renderer (the live file kept) rendered what the file held: nothing to do, so
    HAProxy was never started, and the check said "already live when the renderer started"."""
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    content = "frontend http\n    bind *:80\n    default_backend web\n\nbackend web\n    server a 10.0.0.1:80\n"
    target.destination.write_text(content)  # the last run's file
    child, applier = FakeChild(), FakeApplier()
    door = Delivery(Config(templates=(target,)), Status(templates=1), None, lambda _: 0.0, None, child, haproxy=applier)  # type: ignore[arg-type]
    delivered = asyncio.run(door.deliver(target, content))
    assert (delivered.outcome, delivered.kind) == (Outcome.APPLIED, ApplyKind.START)
    assert child.started_on == [target.destination] and applier.calls == []  # started, no reload
    assert target.destination.read_text() == content


def test_a_listener_haproxy_may_not_bind_is_left_out_without_a_reload_at_each_try(tmp_path: Path) -> None:
    """Not "in use" (a privileged port, HAProxy not root): the bind probe cannot tell, and each try
    of the listener (the quarantine's, every 5 minutes) would be a failed reload."""
    applier = TakenPortApplier("Permission denied")
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    door = Delivery(Config(templates=(target,)), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    front = "frontend http\n    bind *:80\n    default_backend web\n\nbackend web\n    server a 10.0.0.1:80\n"
    redis = "listen redis\n    bind *:6379\n    server r 10.0.0.5:6379\n"
    outcomes = [asyncio.run(door.deliver(target, content)).outcome for content in (front, front + redis)]
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED] and "bind *:6379" not in target.destination.read_text()
    (left,) = door.left_out(target.destination)
    kept = tmp_path / ".haproxy.cfg.busy-ports.json"  # the host's own listeners may be in it (its scanner)
    assert "Permission denied" in left and "6379" not in (json.loads(kept.read_text()) if kept.exists() else {})
    busy = door._installer._busy_ports(target.destination)
    assert busy.judge("listen", "0.0.0.0", 6379, False) is not None  # the next try: refused without a reload


def test_a_frontend_haproxy_could_not_bind_is_neither_left_out_nor_learnt(tmp_path: Path) -> None:
    """helper-150's F4: the frontend's port (an operator changing http_port in the race) was kept
    as another program's, and the log said no catalog service would be given it."""
    applier = TakenPortApplier()
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    door = Delivery(Config(templates=(target,)), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    front = "frontend http\n    bind *:6379\n    default_backend web\n\nbackend web\n    server a 10.0.0.1:80\n"
    assert asyncio.run(door.deliver(target, front)).outcome is Outcome.FAILED
    busy = door._installer._busy_ports(target.destination)
    assert 6379 not in busy.seen and busy.judge("listen", "0.0.0.0", 6379, False) is None


def test_only_the_outputs_haproxys_master_reloads_take_its_reload_as_confirmed(tmp_path: Path) -> None:
    """helper-151's B: one output's confirmed reload was counted as every output's, and an output
    applied by a command (another HAProxy, perhaps) learnt a port its HAProxy still listened on."""
    reloaded = TemplateSpec(tmp_path / "a.j2", tmp_path / "a.cfg", haproxy=True, check_command="true")
    commanded = TemplateSpec(tmp_path / "b.j2", tmp_path / "b.cfg", haproxy=True, check_command="true", command="true")
    config = Config(templates=(reloaded, commanded))
    door = Delivery(config, Status(templates=2), None, lambda _: 0.0, haproxy=FakeApplier())
    for target in (reloaded, commanded):
        asyncio.run(door.deliver(target, "frontend http\n    bind *:80\n    default_backend web\n"))
    assert door._installer._master_loads == {reloaded.destination}


def test_after_a_refused_reload_later_deliveries_compare_with_what_haproxy_runs(tmp_path: Path) -> None:
    """helper-151's D: what HAProxy's old workers run was known for one delivery only; the next
    compared with the refused live file again (a frontend's port, not left out, then not probed)."""
    daemon = socket.socket()
    daemon.bind(("127.0.0.1", 0))
    daemon.listen()
    port = daemon.getsockname()[1]
    applier = TakenPortApplier(port=port)
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    door = Delivery(Config(templates=(target,)), Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    served = "frontend http\n    bind *:80\n    default_backend web\n\nbackend web\n    server a 10.0.0.1:80\n"
    with daemon:
        moved = served.replace(":80\n", f":{port}\n", 1)  # the frontend's port, taken in the race
        outcomes = [asyncio.run(door.deliver(target, text)).outcome for text in (served, moved)]
    assert outcomes == [Outcome.APPLIED, Outcome.FAILED]
    state = door._destination(target.destination).apply
    assert door._installer.change(target, state, served).base == served  # not the refused file


def test_another_outputs_reload_ends_what_a_refused_reload_knew_of_haproxy(tmp_path: Path) -> None:
    """helper-152's F3: A's reload refused (a frontend's port taken) left A comparing with what the
    old workers ran; B's reload then made HAProxy read every file, A's live one too."""
    daemon = socket.socket()
    daemon.bind(("127.0.0.1", 0))
    daemon.listen()
    port = daemon.getsockname()[1]
    applier = TakenPortApplier(port=port)
    a, b = (TemplateSpec(tmp_path / f"{n}.j2", tmp_path / f"{n}.cfg", haproxy=True, check_command="true") for n in "ab")
    door = Delivery(Config(templates=(a, b)), Status(templates=2), None, lambda _: 0.0, haproxy=applier)
    served = "frontend http\n    bind *:80\n    default_backend web\n\nbackend web\n    server a 10.0.0.1:80\n"
    refused = served.replace("bind *:80\n", f"bind *:80\n    bind *:{port}\n")

    async def scenario() -> list[Outcome]:
        outcomes = [(await door.deliver(spec, text)).outcome for spec, text in ((a, served), (b, "frontend b\n"))]
        with daemon:
            outcomes.append((await door.deliver(a, refused)).outcome)
        applier.port = 1  # the program left: HAProxy binds it now
        door._reload_wait = lambda *_: 0.0  # no reload gap here
        outcomes.append((await door.deliver(b, "frontend b\n    bind *:82\n")).outcome)
        return outcomes

    assert asyncio.run(scenario()) == [Outcome.APPLIED, Outcome.APPLIED, Outcome.FAILED, Outcome.APPLIED]
    state = door._destination(a.destination).apply
    assert state.pending and door._installer.change(a, state, refused + "\n").base == refused  # the live file
