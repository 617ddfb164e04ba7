"""Applying an installed file: a template's command, or nothing; never a runtime plan for a command."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import Applier, ReloadPace
from renderer.errors import ApplyKind, ReloadError


def spec(tmp_path: Path, command: str | None) -> TemplateSpec:
    return TemplateSpec(tmp_path / "t.j2", tmp_path / "out.cfg", command=command)


def test_a_template_command_runs_and_its_failure_is_a_reload_error_with_its_output(tmp_path: Path) -> None:
    applier = Applier(Config())
    assert applier.apply(spec(tmp_path, "true")).kind is ApplyKind.COMMAND
    with pytest.raises(ReloadError, match=r"command `echo nope; false` for .*out.cfg failed \(1\): nope"):
        applier.apply(spec(tmp_path, "echo nope; false"))


def test_no_command_and_no_haproxy_means_nothing_to_apply(tmp_path: Path) -> None:
    assert Applier(Config()).apply(spec(tmp_path, None)).kind is ApplyKind.NONE


def test_a_command_template_never_takes_the_runtime_path(tmp_path: Path) -> None:
    config = Config(haproxy_master_socket="/nonexistent/master.sock")
    assert not Applier(config).hitless(spec(tmp_path, "true"))


def test_reloads_are_a_second_apart_by_default(tmp_path: Path) -> None:
    """An attacker's review (/tmp/rev16): one registrant flipping its own service's settings every
    100 ms made 186 reloads in 20 s, and HAProxy kept 188 workers (each old one lives up to
    hard-stop-after). By default a reload waits until a second has passed since the last one."""
    from types import SimpleNamespace

    class Master:
        def __init__(self) -> None:
            self.at: list[float] = []

        def reload(self) -> SimpleNamespace:
            self.at.append(time.monotonic())
            return SimpleNamespace(duration_s=0.0, worker_pid=1)

    config = Config(haproxy_master_socket=str(tmp_path / "master.sock"))
    applier, master = Applier(config), Master()
    applier._master = master  # type: ignore[assignment]
    for _ in range(3):
        assert applier.reload("").kind is ApplyKind.RELOAD
    gaps = [b - a for a, b in zip(master.at, master.at[1:], strict=False)]
    assert config.min_reload_interval == 1.0 and all(gap >= 1.0 for gap in gaps), gaps


def test_a_storm_of_reloads_settles_at_one_every_few_seconds_and_a_burst_goes_at_the_floor() -> None:
    """An attacker's review (/tmp/rev16): a service flipping its own settings every 100 ms made a
    reload every `min_reload_interval` (1 s) for good, and old workers, with every service's long
    connections, were cut after 20 reloads or 30 s. Past a burst, the gap grows (`ReloadPace`)."""
    pace, now, at = ReloadPace(1.0), 1000.0, []
    for _ in range(120):  # a structural change always waiting: each reload goes when the gap allows
        now += pace.wait(now)
        pace.reloaded(now)
        at.append(now)
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert [round(gap, 1) for gap in gaps[:5]] == [1.0] * 5  # a burst: the floor
    assert all(5.0 < gap < 10.0 for gap in gaps[-20:]), gaps  # about one every 7 s, not one a second
    assert max(gaps) <= 30.0
    assert pace.wait(now + 30.0) == 0.0  # quiet for the longest gap: the next goes at once
    calm = ReloadPace(1.0)
    for minute in range(10):  # a deploy's few reloads a minute keep the floor
        for k in range(3):
            calm.reloaded(1000.0 + 60 * minute + k * 5)
    assert calm.gap(1000.0 + 60 * 9 + 10) == 1.0
    assert pace.gap(now) > 5.0 and pace.gap(now + 300.0) == 1.0  # a storm five minutes over: the floor again
    assert ReloadPace(0.0).gap(now) == 0.0  # min_reload_interval 0: no gap, storm or not
    plain = ReloadPace(1.0, grows=False)  # apply = "reload": every change a reload, the plain gap
    for k in range(30):
        plain.reloaded(1000.0 + k)
    assert plain.gap(1030.0) == 1.0


def test_an_undo_haproxy_refuses_raises_for_delivery_to_reload_in_turn(tmp_path: Path) -> None:
    """`revert_runtime` reloaded the live file itself when HAProxy refused the undo: at once, past
    the reload gap's turns, sleeping through the gap while the runtime lock was held. It raises
    now, and delivery reloads in turn (test_delivery)."""
    config = Config(haproxy_master_socket=str(tmp_path / "master.sock"))
    applier = Applier(config)
    reloads: list[str] = []
    applier.reload = lambda content: reloads.append(content)  # type: ignore[assignment,method-assign,return-value]
    live = "backend web\n    server a 10.0.0.1:80\n"
    with pytest.raises(ReloadError, match="no runtime path back"):  # a structural difference: no plan
        applier.revert_runtime("backend web\n    balance first\n    server a 10.0.0.1:80\n", live)
    assert reloads == [] and applier.apply_reloads(TemplateSpec(tmp_path / "t.j2", tmp_path / "h.cfg", haproxy=True))
