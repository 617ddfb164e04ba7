"""Render + apply time for one backend of 10, 100 and 1,000 instances, one instance added.

Runs the renderer's own stages in-process on the default template (data from a DataSource built
here, HAProxy real): render, stage + `haproxy -c` + swap, then the apply, both ways: Runtime API
(apply=auto) and a master-CLI reload (apply=reload). The stages run one after the other here;
in the renderer the runtime apply runs in parallel with the check, so with apply=auto traffic
follows after render + runtime, and the file is installed after render + check + swap.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from renderer.apply import Applier
from renderer.config import Config, TemplateSpec
from renderer.demo.processes import free_port, start_haproxy
from renderer.demo.stack import DEFAULT_TEMPLATE
from renderer.dependency import CatalogServices, HealthService
from renderer.haproxy import check_config
from renderer.template import TemplateRenderer
from renderer.write import write_atomically


class _Data:
    def __init__(self, instances: int) -> None:
        entries = [
            {
                "Node": {"Node": f"node-{i // 50}", "Address": "127.0.0.1"},
                "Service": {"ID": f"web-{i:04d}", "Service": "web", "Address": "127.0.0.1", "Port": 20000 + i},
                "Checks": [{"Status": "passing"}],
            }
            for i in range(instances)
        ]
        self.values: dict[str, Any] = {
            CatalogServices().key: CatalogServices().parse({"web": ["lb"]}),
            HealthService("web").key: HealthService("web").parse(entries),
        }

    def get(self, key: str) -> tuple[bool, Any]:
        return key in self.values, self.values.get(key)


@dataclass
class ScaleResult:
    instances: int
    render_ms: float
    validate_and_swap_ms: float
    runtime_apply_ms: float
    reload_apply_ms: float
    traffic_auto_ms: float  # render + runtime apply: when traffic follows, with apply=auto
    total_reload_ms: float  # render + check + swap + reload, with apply=reload


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def measure(size: int, workdir: Path, haproxy_bin: str) -> ScaleResult:
    workdir.mkdir(parents=True, exist_ok=True)
    dest = workdir / "haproxy.cfg"
    variables = {"http_port": str(free_port()), "stats_port": str(free_port()), "bind_address": "127.0.0.1"}
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, dest, haproxy=True), variables)
    first = renderer.render(_Data(size)).content
    assert first is not None
    write_atomically(dest, first)
    master = workdir / "master.sock"
    haproxy = start_haproxy(haproxy_bin, dest, master, workdir / "haproxy.log")
    try:
        renders, swaps, runtime, reloads = [], [], [], []
        for round_ in range(3):
            for apply in ("auto", "reload"):
                applier = Applier(Config(haproxy_master_socket=str(master), apply=apply))
                grow = _Data(size + 1) if round_ % 2 == 0 else _Data(size)
                running = dest.read_text()
                t0 = time.monotonic()
                content = renderer.render(grow).content
                t1 = time.monotonic()
                assert content is not None
                spec = TemplateSpec(DEFAULT_TEMPLATE, dest, haproxy=True)
                plan = applier.runtime_plan(spec, running, content)
                write_atomically(dest, content, lambda staged: check_config(haproxy_bin, staged))
                t2 = time.monotonic()
                outcome = applier.apply_runtime(plan) if plan is not None else applier.apply(spec)
                t3 = time.monotonic()
                renders.append(t1 - t0)
                swaps.append(t2 - t1)
                (runtime if outcome.kind == "runtime" else reloads).append(t3 - t2)
                # Undo, so that the next round changes one instance again (applied the same way).
                back = renderer.render(_Data(size) if round_ % 2 == 0 else _Data(size + 1)).content
                assert back is not None
                undo = applier.runtime_plan(spec, dest.read_text(), back)
                write_atomically(dest, back)
                applier.apply_runtime(undo) if undo is not None else applier.apply(spec)
    finally:
        haproxy.stop()
    render_ms, swap_ms = _ms(statistics.median(renders)), _ms(statistics.median(swaps))
    runtime_ms, reload_ms = _ms(statistics.median(runtime)), _ms(statistics.median(reloads))
    return ScaleResult(
        size, render_ms, swap_ms, runtime_ms, reload_ms,
        round(render_ms + runtime_ms, 1), round(render_ms + swap_ms + reload_ms, 1),
    )  # fmt: skip
