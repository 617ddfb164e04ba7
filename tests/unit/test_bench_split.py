"""bench.split cuts a change at the renderer's own log lines (synthetic lines and records here)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.split import read_log, report, split

T0 = datetime(2026, 12, 2, 3, 10, 27, 831000, tzinfo=UTC).timestamp()


def at(ms: float) -> str:
    return datetime.fromtimestamp(T0 + ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S,%f")[:23]


LOG = "\n".join([
    f"{at(8)} DEBUG renderer.source.watch: watch health.service(svc-0625): new data at index 10070",
    f"{at(13)} DEBUG renderer.runner: rendered haproxy.cfg.j2 in 2.0 ms, 2.1 ms after the last Consul change",
    f"{at(17)} INFO  renderer.deliver.runtime: runtime: add svc-0625/dev_extra 127.0.0.1:56019 (3 commands, 1.0 ms)",
    f"{at(18)} DEBUG renderer.runner: rendered routes.map.j2 in 1.5 ms, 9.0 ms after the last Consul change",
])  # fmt: skip


def test_a_change_is_cut_at_its_answer_render_and_commands(tmp_path: Path) -> None:
    log = tmp_path / "renderer.log"
    log.write_text(LOG + "\n")
    change = {"service": "svc-0625", "kind": "add", "cold": True, "seconds": 0.020, "at": T0}
    parts = split(change, read_log(log))
    assert parts == pytest.approx((8.0, 3.0, 2.0, 3.0, 1.0, 3.0, 20.0), abs=0.01)
    assert report([change], read_log(log)).splitlines()[0] == "1 of 1 changes found in the log; medians in ms"


def test_a_change_without_its_lines_is_left_out(tmp_path: Path) -> None:
    log = tmp_path / "renderer.log"
    log.write_text(LOG + "\n")
    other = {"service": "svc-0001", "kind": "add", "cold": True, "seconds": 0.020, "at": T0}
    timed_out = {"service": "svc-0625", "kind": "add", "cold": True, "seconds": None, "at": T0}
    assert split(other, read_log(log)) is None and split(timed_out, read_log(log)) is None
