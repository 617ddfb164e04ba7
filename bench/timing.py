"""Timing one change through HAProxy with a probe: from the Consul call returning to the instance's
first response (it appears) or last response (it disappears). None means a timeout, never 0 ms."""

from __future__ import annotations

from bench.load import Probe
from bench.stats import Kind
from lab.processes import wait_until


def delay_after(seen: float | None, since: float) -> float | None:
    """Seconds from `since` to a sighting; None when there was none. A sighting before `since`
    (the change landed before the Consul call returned to us) counts as 0."""
    return None if seen is None else max(0.0, seen - since)


def gone(probe: Probe, instance: str, since: float, quiet_s: float) -> bool:
    """`instance` has not answered for `quiet_s` (counted from `since` or its last answer, the later)
    while other instances kept answering: a frontend that answers nothing proves nothing."""
    last = probe.last_seen.get(instance)
    quiet_from = since if last is None else max(last, since)
    return probe.last_answer - quiet_from >= quiet_s


def first_response(probe: Probe, instance: str, since: float, timeout_s: float) -> float | None:
    try:
        wait_until(lambda: instance in probe.first_seen, timeout_s, f"{instance} answering", interval=0.001)
    except TimeoutError:
        return None
    return delay_after(probe.first_seen.get(instance), since)


def last_response(probe: Probe, instance: str, since: float, timeout_s: float, quiet_s: float) -> float | None:
    """The last response after `since`. An instance the probe never saw (since its last `forget`)
    gives None: a removal of something never seen is not measured, it is not 0 ms."""
    try:
        wait_until(lambda: gone(probe, instance, since, quiet_s), timeout_s, f"{instance} gone", interval=0.01)
    except TimeoutError:
        return None
    return delay_after(probe.last_seen.get(instance), since)


def time_change(probe: Probe, instance: str, kind: Kind, since: float, quiet_s: float = 0.3) -> float | None:
    """Waits up to 15 s for an instance to appear, 30 s for one to disappear."""
    if kind.appears:
        return first_response(probe, instance, since, 15)
    return last_response(probe, instance, since, 30, quiet_s)
