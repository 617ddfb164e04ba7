"""The hitless install's decisions, with our own Applier seam faked (never Consul or HAProxy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from renderer.commands import BACKGROUND_NICE
from renderer.config import TemplateSpec
from renderer.deliver.install import ApplyState, Installer, RuntimeRefused
from renderer.errors import RendererError, ValidationError
from renderer.status import Status
from tests.helpers import Pace, normal_nice, record_nice
from tests.unit.fakes import FakeApplier

OLD = "backend web\n    server a 10.0.0.1:80\n"
NEW = OLD + "    server b 10.0.0.2:80\n"  # membership only: the hitless path
ONE, TWO = NEW + "    server c 10.0.0.3:80\n", NEW + "    server d 10.0.0.4:80\n"


def setup(tmp_path: Path, check: str) -> tuple[TemplateSpec, Path]:
    dest = tmp_path / "haproxy.cfg"
    dest.write_text(OLD)
    return TemplateSpec(tmp_path / "t.j2", dest, check_command=check, haproxy=True), dest


def installer(fake: FakeApplier, errors: list[RendererError] | None) -> Installer:
    on_error = None if errors is None else (lambda spec, err, content: errors.append(err))
    return Installer(fake, Status(templates=1), "/bin/true", lambda _: 0.0, on_file_error=on_error)


async def install(inst: Installer, spec: TemplateSpec, content: str, state: ApplyState | None = None) -> None:
    state = state or ApplyState()
    await inst.install(spec, state, inst.change(spec, state, content))


def test_failed_check_undoes_runtime_changes_and_keeps_the_file(tmp_path: Path) -> None:
    fake, errors = FakeApplier(), list[RendererError]()
    spec, dest = setup(tmp_path, "false")

    async def scenario() -> None:
        inst = installer(fake, errors)
        await install(inst, spec, NEW)
        await inst.flush()

    asyncio.run(scenario())
    assert fake.calls == ["runtime", "revert"]
    assert [type(e) for e in errors] == [ValidationError]
    assert dest.read_text() == OLD


def test_without_an_error_handler_the_check_failure_is_raised(tmp_path: Path) -> None:
    fake = FakeApplier()
    spec, dest = setup(tmp_path, "false")
    with pytest.raises(ValidationError):
        asyncio.run(install(installer(fake, None), spec, NEW))
    assert fake.calls == ["runtime", "revert"]
    assert dest.read_text() == OLD


def test_passing_check_installs_after_runtime(tmp_path: Path) -> None:
    fake = FakeApplier()
    spec, dest = setup(tmp_path, "true")

    async def scenario() -> None:
        inst = installer(fake, [])
        await install(inst, spec, NEW)
        await inst.flush()

    asyncio.run(scenario())
    assert fake.calls == ["runtime"]
    assert dest.read_text() == NEW


def test_the_check_behind_runtime_changes_runs_at_a_lower_priority_the_one_before_a_reload_does_not(
    tmp_path: Path, pace: Pace
) -> None:
    """HAProxy already runs a membership change when its file is checked (write-behind): that check
    must not compete with HAProxy or the next change for the CPU. A check a reload waits for keeps
    the renderer's own priority."""
    niceness = tmp_path / "nice"
    record = f"{record_nice(niceness)}; true"
    fake = FakeApplier()
    spec, dest = setup(tmp_path, record)

    async def scenario() -> None:
        inst = installer(fake, [])
        await install(inst, spec, NEW)  # membership only: runtime, then the file behind it
        await eventually(lambda: dest.read_text() == NEW, pace(5))  # not flush(): it would hurry the check
        await install(inst, spec, "frontend f\n    bind :8080\n" + NEW)  # structural: checked, then reloaded

    asyncio.run(scenario())
    assert fake.calls == ["runtime", "reload"]
    assert niceness.read_text().split() == [str(BACKGROUND_NICE), normal_nice()]


def test_a_reload_behind_a_low_priority_check_has_it_run_at_normal_priority(tmp_path: Path, pace: Pace) -> None:
    """A reload (and shutdown) waits for the file written behind runtime changes; that check must
    not make it wait for what a busy CPU leaves a low-priority process: it is run again at the
    normal priority at once (here the low-priority run would take 10 s)."""
    niceness = tmp_path / "nice"
    first_slow = f"[ $(wc -l < {niceness}) -gt 1 ] || exec sleep 10"  # exec: a killed run leaves no sleep
    record = f"{record_nice(niceness)}; {first_slow}; test -f {{path}}"
    fake = FakeApplier()
    spec, dest = setup(tmp_path, record)
    waited: list[float] = []

    async def scenario() -> None:
        inst = installer(fake, [])
        await install(inst, spec, NEW)
        await eventually(lambda: niceness.exists() and niceness.read_text().count("\n") == 1, pace(3))
        started = time.monotonic()
        await install(inst, spec, "frontend f\n    bind :8080\n" + NEW)
        waited.append(time.monotonic() - started)

    asyncio.run(scenario())
    normal = normal_nice()
    assert fake.calls == ["runtime", "reload"] and waited[0] < pace(2), f"the reload waited {waited[0]:.2f}s"
    assert niceness.read_text().split() == [str(BACKGROUND_NICE), normal, normal]  # hurried, then the reload's
    assert dest.read_text().startswith("frontend f")


def test_a_write_behind_waited_for_checks_the_newest_content_without_its_pause(tmp_path: Path, pace: Pace) -> None:
    """Under a stream of changes the write-behind pauses between two checks (at most half the time
    checking); a reload waiting for it must not wait out that pause as well (helper-126)."""
    runs = tmp_path / "runs"
    record = f"echo x >> {runs}; [ $(wc -l < {runs}) -gt 1 ] || exec sleep 10; sleep 0.2; test -f {{path}}"
    fake = FakeApplier()
    spec, dest = setup(tmp_path, record)
    waited: list[float] = []

    async def scenario() -> None:
        inst = installer(fake, [])
        await install(inst, spec, ONE)
        await eventually(lambda: runs.exists(), pace(3))
        await asyncio.sleep(2.5)  # the low-priority check has run this long: the pause after it would be 2 s
        await install(inst, spec, TWO)  # sent while ONE is checked: checked next
        started = time.monotonic()
        await install(inst, spec, "frontend f\n    bind :8080\n" + TWO)
        waited.append(time.monotonic() - started)

    asyncio.run(scenario())
    assert fake.calls == ["runtime", "runtime", "reload"]
    assert waited[0] < pace(1.6), f"the reload waited {waited[0]:.2f}s (three 0.2 s checks, and no pause)"
    assert dest.read_text().startswith("frontend f")


def test_a_reload_behind_a_check_of_replaced_content_has_the_newest_checked_at_once(tmp_path: Path, pace: Pace) -> None:
    """A reload hurries the write-behind's low-priority check; when that check's content was
    replaced meanwhile, it is not run again: the newest content is checked next (helper-127's
    finding 4: one check's time more for the reload behind it)."""
    runs = tmp_path / "runs"
    which = "if grep -q frontend {path}; then w=R; elif grep -q 'server d' {path}; then w=TWO; else w=ONE; fi"
    record = f"{which}; echo $w >> {runs}; [ $w != ONE ] || [ $(wc -l < {runs}) -gt 1 ] || exec sleep 10; true"
    fake = FakeApplier()
    spec, dest = setup(tmp_path, record)

    async def scenario() -> None:
        inst = installer(fake, [])
        await install(inst, spec, ONE)
        await eventually(lambda: runs.exists(), pace(3))
        await install(inst, spec, TWO)  # sent while ONE is checked at the low priority
        await install(inst, spec, "frontend f\n    bind :8080\n" + TWO)

    asyncio.run(scenario())
    assert fake.calls == ["runtime", "runtime", "reload"]
    assert runs.read_text().split() == ["ONE", "TWO", "R"]  # ONE stopped, not checked again
    assert dest.read_text().startswith("frontend f")


def test_changes_a_failed_write_behind_undid_time_the_apply_that_carries_them_again(tmp_path: Path, pace: Pace) -> None:
    """HAProxy ran ONE's change until its file failed the check and it was undone; the next apply
    of new content carries that change again and is timed from it, the one after from its own
    (helper-127's finding 6: the render had moved on, and the figure started at the newer change)."""
    quiet = pace(0.3)
    fake, errors = FakeApplier(), list[RendererError]()
    spec, dest = setup(tmp_path, "! grep -q 'server c' {path}")  # ONE fails its check
    told = [time.monotonic()]
    status = Status(templates=1)
    inst = Installer(fake, status, "/bin/true", lambda _: told[0], on_file_error=lambda s, e, c: errors.append(e))

    def after_ms() -> float:
        figure = status.served[str(dest)].after_change_ms
        assert figure is not None
        return figure

    async def scenario() -> list[float]:
        await install(inst, spec, ONE)
        await inst.flush()
        assert [type(e) for e in errors] == [ValidationError] and fake.calls == ["runtime", "revert"]
        await asyncio.sleep(quiet)
        told[0] = time.monotonic()
        await install(inst, spec, TWO)  # carries ONE's undone change again
        figures = [after_ms()]
        await inst.flush()
        await asyncio.sleep(quiet)
        told[0] = time.monotonic()
        await install(inst, spec, NEW)
        figures.append(after_ms())
        await inst.flush()
        return figures

    again, after = asyncio.run(scenario())
    assert again >= quiet * 1000, f"timed from the newer change only: {again:.1f} ms"
    assert after < quiet * 1000, f"the undone change carried twice: {after:.1f} ms"
    assert dest.read_text() == NEW


def test_a_check_stopped_as_superseded_whose_content_came_back_is_checked_again(tmp_path: Path, pace: Pace) -> None:
    """helper-129 (/tmp/rev75): ONE's low-priority check was stopped as superseded (TWO sent), and
    ONE was sent again before the write-behind looked: it took ONE for checked and ended, the file
    behind what HAProxy runs for good. Here `wanted` answers False once, as in that race."""
    runs = tmp_path / "runs"
    record = f"echo x >> {runs}; [ $(wc -l < {runs}) -gt 1 ] || exec sleep 10; test -f {{path}}"
    fake = FakeApplier()
    spec, dest = setup(tmp_path, record)

    async def scenario() -> None:
        inst = installer(fake, [])
        await install(inst, spec, ONE)
        await eventually(lambda: runs.exists(), pace(3))
        inst._jobs[dest].hurry.wanted = lambda: False  # TWO was sent, and ONE again after it
        await inst.flush()

    asyncio.run(scenario())
    assert dest.read_text() == ONE and runs.read_text().count("x") == 2


def test_an_undone_change_is_carried_by_the_next_delivery_only(tmp_path: Path, pace: Pace) -> None:
    """helper-129 (/tmp/rev75): the undone change's time waited for the next apply of new content,
    however late: a render equal to what runs (the failing part left out) came first, and a change
    much later was timed from the undone one. The next delivery carries it, or nobody does."""
    quiet = pace(0.3)
    fake = FakeApplier()
    spec, dest = setup(tmp_path, "! grep -q 'server c' {path}")  # ONE fails its check
    told = [time.monotonic()]
    status = Status(templates=1)
    inst = Installer(fake, status, "/bin/true", lambda _: told[0], on_file_error=lambda s, e, c: None)

    async def scenario() -> float | None:
        await install(inst, spec, ONE)
        await inst.flush()
        await install(inst, spec, OLD)  # the next render leaves ONE's server out: what runs already
        await asyncio.sleep(quiet)
        told[0] = time.monotonic()
        await install(inst, spec, TWO)
        await inst.flush()
        return status.served[str(dest)].after_change_ms

    figure = asyncio.run(scenario())
    assert figure is not None and figure < quiet * 1000, f"timed from the undone change: {figure} ms"


async def eventually(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


def test_a_refused_runtime_step_leaves_its_backends_unknown_and_the_next_install_reloads_the_checked_file(
    tmp_path: Path,
) -> None:
    """The reload that settles a refusal is the caller's to schedule (delivery: in the reload gap's
    turns, after the files before it): the installer raises, the apply pending."""
    fake = FakeApplier(runtime_fails=True)
    spec, dest = setup(tmp_path, "true")
    inst, state = installer(fake, []), ApplyState()
    with pytest.raises(RuntimeRefused):
        asyncio.run(install(inst, spec, NEW, state))
    assert fake.calls == ["runtime"] and state.pending and state.known_running == OLD
    assert state.unknown == {"web"} and dest.read_text() == OLD
    asyncio.run(install(inst, spec, NEW, state))
    assert fake.calls == ["runtime", "reload"] and not state.pending
    assert dest.read_text() == NEW


def test_a_change_during_a_slow_check_is_applied_without_waiting_for_it(tmp_path: Path, pace: Pace) -> None:
    fake = FakeApplier()
    spec, dest = setup(tmp_path, "sleep 0.5; test -f {path}")
    waited: list[float] = []

    async def scenario() -> None:
        inst = installer(fake, [])
        await install(inst, spec, ONE)
        started = time.monotonic()
        await install(inst, spec, TWO)  # the check of "one" is still running
        waited.append(time.monotonic() - started)
        await inst.flush()

    asyncio.run(scenario())
    assert fake.calls == ["runtime", "runtime"]
    assert waited[0] < pace(0.4), f"the second change waited {waited[0]:.2f}s for the first check"
    assert dest.read_text() == TWO  # the write-behind ends on the newest content


def test_write_behind_jobs_done_leave_no_reference_cycle_holding_their_files(tmp_path: Path) -> None:
    """helper-134's port attack (/tmp/s25/gc1.out): each write-behind job was a reference cycle (its
    check's `wanted` closed over the job), garbage once done and frozen by the collector, with the
    rendered file it held, until the full collection 10 minutes on: ~0.6 MB a second at 1,000
    services beside a registrant's 70 writes a second."""
    import gc

    fake = FakeApplier()
    spec, dest = setup(tmp_path, "true")

    async def scenario() -> int:
        inst = installer(fake, [])
        await install(inst, spec, NEW)
        await inst.flush()
        gc.collect()
        gc.disable()
        try:
            for n in range(10):
                await install(inst, spec, ONE if n % 2 else TWO)
                await inst.flush()
            inst._jobs.clear()  # the last job too is done with
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(scenario()) == 0
    assert dest.read_text() == ONE
