"""Issue #20's targets, checked on a bench run: `python -m bench.targets RESULT.json`.

Each target gets a verdict: "met", "MISSED", or "not measured" (the run did not include that
set-up, size or protocol, or could not take the figure; never counted as met). A run fails
(exit 1) when any target is MISSED, not when one is only not measured.

- Everywhere: 0 timeouts and 0 failed requests for each `ours-*` set-up, each scale row (size ×
  protocol) and each soak; each row ran over the protocol it claims (asked `h2`, watched over
  HTTP/1.1: MISSED, and that row's HTTP/2 figures are not judged).
- 1,000 services over HTTP/2 (`h2`): cold and hot changes p50 ≤ 20 ms, p95 ≤ 100 ms, max ≤ 250 ms;
  the first change after start ≤ 250 ms; ≤ 16 connections to the agent (peak, start to end);
  ≤ 3 requests per change; answers' bytes per change ≤ 2× the changed service's own answer;
  ≤ 10 requests per idle minute, judged only when the idle window covers two blocking-query waits
  (each with Consul's jitter of up to 1/16): a shorter window misses their expiry and looks cheap.
- 1,000 services over plain HTTP (`http`): hot p50 ≤ 20 ms; cold p50 ≤ 100 ms; cold max ≤ 500 ms,
  the first change after start included.

- The hostile part (bench/hostile.py: one registrant's storms, the others' changes timed while they
  run): the steady service's failed requests 0; past the storms' first minute, at most
  STORM_RELOADS reloads in any minute and HAProxy's reload gap at its 1 s floor (ReloadPace's burst
  is never passed); at most MAX_UNBACKED names serving the attacker's value at once; a server added
  to a service ≤ 500 ms (the plain-HTTP cold max); each brand-new service ≤ 2,000 ms (the 1 s reload
  gap and a reload; without the holds 4.8-5.6 s).

A percentile on which a timeout falls has the value "TO" and misses its limit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from bench.agent import Protocol
from bench.setups import SETUPS
from renderer.config import parse_duration
from renderer.errors import ConfigError
from renderer.render.flaps import MAX_UNBACKED
from renderer.runner import held_wait

TARGET_SERVICES = 1000
OURS = tuple(s.name for s in SETUPS if s.kind == "ours")
JITTER = 1 / 16  # Consul adds up to wait/16 to a blocking query's wait
TIMEOUT = "TO"
STORM_RELOADS = 6  # reloads in a minute of a storm past its first: ReloadPace's burst (deliver/apply.py)
RELOAD_FLOOR_S = 1.0  # the reload gap at rest (`min_reload_interval`'s default, which the bench keeps)
Value = float | str | None


class Verdict(StrEnum):
    MET = "met"
    MISSED = "MISSED"
    NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Target:
    """One promise: `value` against `limit` (a number: at most; a text: exactly)."""

    name: str
    limit: float | str
    value: Value
    verdict: Verdict
    why: str


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _rows(value: object) -> list[Mapping[str, Any]]:
    return [_mapping(v) for v in value] if isinstance(value, list) else []


def _number(value: object) -> float | None:
    """A finite number from the JSON, else None (absent, null, text, a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def at_most(
    name: str, limit: float, value: Value, why: str = "", unmeasured: str = "not in the run's figures"
) -> Target:
    """`value` ≤ `limit`; None: not measured (`unmeasured` says why); "TO": a timeout, missed."""
    if value is None:
        return Target(name, limit, None, Verdict.NOT_MEASURED, unmeasured)
    if value == TIMEOUT:
        return Target(name, limit, value, Verdict.MISSED, why or "a timeout falls there")
    met = isinstance(value, int | float) and value <= limit
    return Target(name, limit, value, Verdict.MET if met else Verdict.MISSED, why)


def zero(name: str, value: object, what: str) -> Target:
    count = _number(value)
    return at_most(name, 0, count, why=f"{what}: {count:g}" if count else "", unmeasured=f"no count of {what}")


def percentile(name: str, stats: Mapping[str, Any], key: str, limit: float) -> Target:
    """A latency figure of a `Stats` (count, median_ms, p95_ms, max_ms) in the JSON."""
    count = _number(stats.get("count")) or 0
    if not count:
        return at_most(name, limit, None, unmeasured="no change of this kind was timed")
    value = _number(stats.get(key))
    timeouts = _number(stats.get("timeouts")) or 0
    why = f"{count:g} change{'s' if count != 1 else ''}" + (f", {timeouts:g} timed out" if timeouts else "")
    return at_most(name, limit, TIMEOUT if value is None else value, why=why)


def label(row: Mapping[str, Any]) -> str:
    return f"{row.get('protocol')} {row.get('services')}"


def setup_targets(report: Mapping[str, Any]) -> Iterator[Target]:
    """Our set-ups' convergence runs; HAProxy's own DNS discovery is compared, not judged."""
    ran = {str(r.get("name")): r for r in _rows(report.get("convergence"))}
    for name in OURS:
        result = ran.get(name)
        if result is None:
            why = f"{name} was not in this run (--only)"
            yield at_most(f"{name}: timeouts", 0, None, unmeasured=why)
            yield at_most(f"{name}: failed requests", 0, None, unmeasured=why)
            continue
        yield zero(f"{name}: timeouts", result.get("timeouts"), "changes not seen in time")
        yield zero(f"{name}: failed requests", result.get("failed_requests"), "non-2xx answers and socket errors")


def claimed(row: Mapping[str, Any]) -> str | None:
    """What the row's protocol should have negotiated, None for a protocol this bench does not know."""
    try:
        return Protocol(str(row.get("protocol"))).expected
    except ValueError:
        return None


def protocol_target(row: Mapping[str, Any]) -> Target:
    expected, got = claimed(row), row.get("negotiated")
    name = f"{label(row)}: protocol"
    if expected is None:
        return Target(
            name, "http or h2", str(row.get("protocol")), Verdict.MISSED, "a protocol the bench does not know"
        )
    if got == expected:
        return Target(name, expected, got, Verdict.MET, "")
    said = "the renderer never said which protocol it watches Consul over" if got is None else f"it ran {got}"
    why = f"asked {row.get('protocol')}, {said}: its figures are not {expected}'s"
    return Target(name, expected, None if got is None else str(got), Verdict.MISSED, why)


def row_targets(report: Mapping[str, Any]) -> Iterator[Target]:
    """Every scale row: the protocol it claims, its timeouts and failed requests, its soak's."""
    for row in _rows(report.get("scale")):
        yield protocol_target(row)
        yield zero(f"{label(row)}: timeouts", row.get("timeouts"), "changes not seen in time")
        yield zero(f"{label(row)}: failed requests", row.get("probe_failed_requests"), "the probes' failed requests")
        soak = _mapping(row.get("soak"))
        if soak:
            yield zero(f"{label(row)} soak: timeouts", soak.get("timeouts"), "additions not seen within 15 s")
            yield zero(f"{label(row)} soak: failed requests", soak.get("failed_requests"), "failed requests under load")


def idle_window_needed(report: Mapping[str, Any], protocol: Protocol) -> float | None:
    """Seconds of idle window covering two blocking-query waits with their jitter, as the renderer
    held them in this run; None when the run's `block_wait` cannot be read."""
    text = _mapping(report.get("scale_settings")).get("block_wait") or 0
    try:
        seconds = parse_duration(text, "block_wait")
    except ConfigError:
        return None
    return round(2 * held_wait(seconds, protocol == Protocol.H2) * (1 + JITTER), 1)


def idle_target(report: Mapping[str, Any], row: Mapping[str, Any]) -> Target:
    name, limit = f"{label(row)}: requests per idle minute", 10
    value = _number(row.get("consul_requests_per_idle_minute"))
    window = _number(row.get("idle_seconds")) or _number(_mapping(report.get("scale_settings")).get("idle_seconds"))
    needed = idle_window_needed(report, Protocol.H2)
    if value is None or window is None or needed is None:
        return at_most(name, limit, None, unmeasured="no idle window measured, or the run's block_wait unreadable")
    if window < needed:
        why = (
            f"the idle window ({window:g} s) is shorter than two blocking-query waits with their jitter "
            f"({needed:g} s): the queries' expiry is not in it; run with --idle-seconds {math.ceil(needed)} "
            "or a shorter --block-wait"
        )
        return Target(name, limit, value, Verdict.NOT_MEASURED, why)
    return at_most(name, limit, value, why=f"over {window:g} s idle")


def bytes_target(row: Mapping[str, Any]) -> Target:
    name = f"{label(row)}: kB per change"
    answer = _number(row.get("service_answer_kb"))
    if answer is None:
        return Target(name, "2 × the service's answer", None, Verdict.NOT_MEASURED, "the service's answer not sized")
    value = _number(row.get("consul_answer_kb_per_change"))
    unmeasured = "the renderer's /metrics gave no answer bytes"
    return at_most(name, round(2 * answer, 1), value, why=f"2 × {answer:g} kB", unmeasured=unmeasured)


def connections_target(row: Mapping[str, Any]) -> Target:
    conns = _mapping(row.get("connections_to_agent"))
    failed = _number(conns.get("failed_samples")) or 0
    why = f"{_number(conns.get('samples')) or 0:g} samples" + (f", {failed:g} failed" if failed else "")
    name = f"{label(row)}: connections to the agent (peak)"
    return at_most(name, 16, _number(conns.get("peak")), why=why, unmeasured=f"no sample taken ({why})")


def h2_targets(report: Mapping[str, Any], row: Mapping[str, Any]) -> Iterator[Target]:
    changes = _mapping(row.get("all_changes"))
    for side in ("cold", "hot"):
        stats = _mapping(changes.get(side))
        for key, what, limit in (("median_ms", "p50", 20), ("p95_ms", "p95", 100), ("max_ms", "max", 250)):
            yield percentile(f"{label(row)}: {side} {what} ms", stats, key, limit)
    yield percentile(f"{label(row)}: first change ms", _mapping(row.get("first_change")), "max_ms", 250)
    yield connections_target(row)
    per_change = _number(row.get("consul_requests_per_change"))
    yield at_most(f"{label(row)}: requests per change", 3, per_change, unmeasured="the renderer's /metrics gave none")
    yield bytes_target(row)
    yield idle_target(report, row)


def cold_max_with_first(row: Mapping[str, Any]) -> Target:
    """The slowest cold change, the first change after start included (a timeout in either: "TO")."""
    name, limit = f"{label(row)}: cold max ms (first change included)", 500
    parts = [_mapping(_mapping(row.get("all_changes")).get("cold")), _mapping(row.get("first_change"))]
    timed = [p for p in parts if _number(p.get("count"))]
    if not timed:
        return at_most(name, limit, None, unmeasured="no cold change was timed")
    values = [_number(p.get("max_ms")) for p in timed]
    numbers = [v for v in values if v is not None]
    if len(numbers) < len(values):
        return at_most(name, limit, TIMEOUT)
    return at_most(name, limit, max(numbers), why=f"{_number(parts[0].get('count')) or 0:g} cold changes")


def http_targets(report: Mapping[str, Any], row: Mapping[str, Any]) -> Iterator[Target]:
    changes = _mapping(row.get("all_changes"))
    yield percentile(f"{label(row)}: hot p50 ms", _mapping(changes.get("hot")), "median_ms", 20)
    yield percentile(f"{label(row)}: cold p50 ms", _mapping(changes.get("cold")), "median_ms", 100)
    yield cold_max_with_first(row)


def not_measured(targets: Iterable[Target], why: str) -> list[Target]:
    return [replace(t, value=None, verdict=Verdict.NOT_MEASURED, why=why) for t in targets]


def size_targets(report: Mapping[str, Any], protocol: Protocol) -> Iterator[Target]:
    """The targets at 1,000 services over `protocol`: judged on each such row that ran over it,
    else listed as not measured with the reason."""
    judge = h2_targets if protocol == Protocol.H2 else http_targets
    rows = [
        r
        for r in _rows(report.get("scale"))
        if _number(r.get("services")) == TARGET_SERVICES and str(r.get("protocol")) == protocol.value
    ]
    if not rows:
        placeholder = {"services": TARGET_SERVICES, "protocol": protocol.value}
        settings = _mapping(report.get("scale_settings"))
        ran = f"sizes {settings.get('sizes', '-')}, protocols {settings.get('protocols', '-')}"
        yield from not_measured(judge(report, placeholder), f"no {TARGET_SERVICES}-service row over {protocol} ({ran})")
    for row in rows:
        if row.get("negotiated") != protocol.expected:
            got = row.get("negotiated") or "an unsaid protocol"
            yield from not_measured(judge(report, row), f"asked {protocol}, ran {got}: see its protocol target")
        else:
            yield from judge(report, row)


def slowest(values: object) -> Value:
    """The largest of timed changes, "TO" when one was not seen; None for no change timed."""
    timed = values if isinstance(values, list) else []
    if not timed:
        return None
    numbers = [_number(v) for v in timed]
    return TIMEOUT if None in numbers else max(n for n in numbers if n is not None)


def hostile_targets(report: Mapping[str, Any]) -> Iterator[Target]:
    """The hostile part's promises: what one registrant's storms may cost the other services."""
    run = _mapping(report.get("hostile"))
    unmeasured = "the run skipped the hostile part (--skip-hostile)" if not run else "not in the hostile part's figures"
    minutes = [_number(m) for m in run.get("reloads_per_minute") or []]
    steady = [m for m in minutes[1:] if m is not None]
    past_first = "the storms' minutes past the first"
    yield zero("hostile: failed requests", run.get("failed_requests"), "the steady service's failed requests")
    yield at_most(
        "hostile: reloads in a minute", STORM_RELOADS, max(steady, default=None), why=past_first, unmeasured=unmeasured
    )
    gap = _number(run.get("reload_gap_steady_max_s"))
    yield at_most("hostile: reload gap s", RELOAD_FLOOR_S, gap, why=past_first, unmeasured=unmeasured)
    unbacked, samples = _number(run.get("unbacked_served_max")), _number(run.get("unbacked_samples")) or 0
    why = f"the most at once in {samples:g} samples"
    yield at_most("hostile: names serving the attacker's value", MAX_UNBACKED, unbacked, why, unmeasured)
    spare = slowest([run["spare_added_ms"]] if "spare_added_ms" in run else [])  # null: not seen in 30 s
    yield at_most("hostile: server added ms", 500, spare, unmeasured=unmeasured)
    brand_new = slowest(run.get("brand_new_ms"))
    yield at_most("hostile: brand-new service max ms", 2000, brand_new, unmeasured=unmeasured)


def check(report: Mapping[str, Any]) -> list[Target]:
    """Every target's verdict on a bench report (the JSON `python -m bench` writes)."""
    return [
        *setup_targets(report),
        *row_targets(report),
        *size_targets(report, Protocol.H2),
        *size_targets(report, Protocol.HTTP),
        *hostile_targets(report),
    ]


def exit_code(targets: Iterable[Target]) -> int:
    """1 when any target is MISSED; "not measured" alone does not fail a run."""
    return 1 if any(t.verdict == Verdict.MISSED for t in targets) else 0


def _cell(value: Value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def table(targets: list[Target]) -> str:
    width = max((len(t.name) for t in targets), default=6)
    head = f"{'target':<{width}} {'limit':>10} {'value':>10} {'verdict':>12}  why"
    rows = [head, "-" * len(head)]
    for t in targets:
        limit = f"≤ {_cell(t.limit)}" if isinstance(t.limit, int | float) else t.limit
        rows.append(f"{t.name:<{width}} {limit:>10} {_cell(t.value):>10} {t.verdict.value:>12}  {t.why}")
    counts = {v: sum(1 for t in targets if t.verdict == v) for v in Verdict}
    rows.append(
        ", ".join(f"{n} {v.value}" for v, n in counts.items()) + " (issue #20's targets, and the hostile part's)"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a bench run's JSON (bench/results/bench-*.json)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.result.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"cannot read the bench result {args.result}: {err}", file=sys.stderr)
        return 2
    if not isinstance(report, dict):
        print(f"{args.result} is not a bench result (a JSON object with scale and convergence)", file=sys.stderr)
        return 2
    targets = check(report)
    print(table(targets))
    return exit_code(targets)


if __name__ == "__main__":
    sys.exit(main())
