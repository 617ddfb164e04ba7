"""The renderer's state as operators read it: one model behind the check, `/status`, the page and
`consul-renderer status`, and the Prometheus metrics.

`Status` is the one place the runner and the deliver stage report to; every report updates both
the state and the metrics. Every figure is computed here once: the page, the CLI and the Consul
check only show what `snapshot()` and `check()` say. Nothing is global: each Status owns its own
Prometheus registry.

`Status.check()` is what the TTL check of the self-registered `consul-renderer` service says:
- critical when HAProxy is unreachable (apply failed: master socket missing, reload refused), or
  Consul has not answered for twice `max_data_age`;
- warning  when Consul has not answered for `max_data_age`, when a template's last render failed
  validation or rendering (output: template, reason), before everything is ready, while an
  instance is left out, or while a storm of reloads slows them;
- passing  otherwise, saying what is served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from renderer.errors import ApplyKind, FailureReason
from renderer.status.contact import STALE, ConsulContact, Freshness
from renderer.status.served import LeftOut, Served, fairly_listed, first_few
from renderer.status.timeline import AppliedChange, Timeline

CONVERGENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Problem:
    reason: FailureReason
    message: str


@dataclass
class Status:
    """The renderer's state and metrics; the runner reports here, operators read from here."""

    renders: int = 0
    applies: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_success: float | None = None
    problems: dict[str, Problem] = field(default_factory=dict)  # per template, the current problem
    templates: int = 0
    rendered: set[str] = field(default_factory=set)  # templates rendered and applied at least once
    watch_errors_source: Callable[[], int] = lambda: 0
    consul_requests_source: Callable[[], int] = lambda: 0
    consul_answer_bytes_source: Callable[[], int] = lambda: 0
    contact_source: Callable[[], ConsulContact] | None = None  # set once the watcher runs
    # (the gap HAProxy's next reload keeps, min_reload_interval): see Delivery.reload_pace
    reload_pace_source: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)
    waiting_for: list[str] = field(default_factory=list)
    served: dict[str, Served] = field(default_factory=dict)  # per template: what runs now
    left_out: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per template: unsafe instances
    # per template: how many times `left_out` was set, so that what is made of its items (the
    # /left-out answer) can be kept without holding items since replaced (helper-140)
    left_out_serial: dict[str, int] = field(default_factory=dict)
    # per template: the items `left_out` lists (`fairly_listed`), for the items they were chosen from:
    # chosen at each /status and check, 100,000 items cost 0.75 s of every second (helper-135)
    _listed: dict[str, tuple[tuple[str, ...], list[str]]] = field(default_factory=dict, repr=False)
    timeline: Timeline = field(default_factory=Timeline)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def watch_errors(self) -> int:
        return self.watch_errors_source()

    def __post_init__(self) -> None:
        r = self.registry
        self._renders = Counter("consul_renderer_renders", "Complete renders of a template", registry=r)
        self._applies = Counter("consul_renderer_applies", "Changes applied, by kind", ["kind"], registry=r)
        self._failures = Counter("consul_renderer_failures", "Failures, by reason", ["reason"], registry=r)
        self._convergence = Histogram(
            "consul_renderer_convergence_seconds",
            "From the Consul change to the change applied in HAProxy",
            buckets=CONVERGENCE_BUCKETS,
            registry=r,
        )
        self._last_success = Gauge(
            "consul_renderer_last_success_timestamp_seconds", "Time of the last successful apply", registry=r
        )
        self._ready = Gauge("consul_renderer_ready", "1 once every template rendered and applied", registry=r)
        self._left_out = Gauge(
            "consul_renderer_left_out_instances",
            "Instances, services, settings and parts a template left out or ignored for a catalog value "
            "(unsafe where it goes, or outside serve_services or tcp_ports)",
            ["template"],
            registry=r,
        )
        self._cert_expiry = Gauge(
            "consul_renderer_certificate_expiry_seconds",
            "Seconds until each served TLS certificate (--certs) expires",
            ["name"],
            registry=r,
        )
        self.certificates: dict[str, float] = {}  # name → seconds to expiry, when last synced
        self.certificate_notes: tuple[str, ...] = ()  # certificates refused or expiring within 14 days
        r.register(_ConsulCollector(self))

    # -- reports from the runner and the deliver stage -------------------------------------------

    def render_ok(self) -> None:
        self.renders += 1
        self._renders.inc()

    def applied(self, kind: ApplyKind) -> None:
        self.applies[kind] = self.applies.get(kind, 0) + 1
        self._applies.labels(kind=kind).inc()

    def set_left_out(self, destination: str, items: tuple[str, ...]) -> None:
        if items or destination in self.left_out:
            self.left_out[destination] = items
            self.left_out_serial[destination] = self.left_out_serial.get(destination, 0) + 1
            self._left_out.labels(template=destination).set(len(items))

    def set_certificates(self, expiries: Mapping[str, float]) -> None:
        """The served certificates and the seconds until each expires (gone ones are dropped)."""
        for name in set(self.certificates) - set(expiries):
            self._cert_expiry.remove(name)
        for name, seconds in expiries.items():
            self._cert_expiry.labels(name=name).set(seconds)
        self.certificates = dict(expiries)

    def set_certificate_notes(self, notes: tuple[str, ...]) -> None:
        """Certificates that need a person: refused (the old one serves on) or expiring soon."""
        self.certificate_notes = notes

    def rendered_from(
        self, destination: str, keys: Mapping[str, tuple[int, float]], generation: int | None = None
    ) -> None:
        """The Consul keys a render for `destination` read: key → (index, monotonic time of its last
        change); only those changed since `rendered_since(destination)` are needed."""
        self.timeline.rendered_from(destination, keys, generation)

    def rendered_since(self, destination: str) -> int | None:
        """The Store's generation at the last render of `destination` that was applied, if known."""
        return self.timeline.changed_since(destination)

    def serving(self, destination: str) -> str | None:
        """The content HAProxy (or the command) runs now for `destination`, if known."""
        served = self.served.get(destination)
        return served.content if served is not None else None

    def found_serving(self, destination: str, content: str) -> None:
        """The live file already held this content when the renderer first rendered it."""
        if destination not in self.served:
            self.served[destination] = Served.of(content, ApplyKind.ALREADY_LIVE, float("nan"))
            self.timeline.baseline(destination)

    def now_serving(
        self, destination: str, content: str, kind: ApplyKind, after_change_s: float, what: AppliedChange | None = None
    ) -> None:
        """A template's new output is live: remember what it holds (for the check, `status` and the
        diff) and, when HAProxy took a change, put it on the timeline. A change HAProxy needed
        nothing for (kind "none", e.g. comments) keeps the last apply's facts."""
        previous = self.served.get(destination)
        served = Served.of(content, kind, after_change_s, previous)
        if kind is ApplyKind.NONE and previous is not None:
            served = replace(served, kind=previous.kind, after_change_ms=previous.after_change_ms, at=previous.at)
        self.served[destination] = served
        if kind not in (ApplyKind.NONE, ApplyKind.ALREADY_LIVE):
            self.timeline.record(destination, kind, served.after_change_ms, what or AppliedChange())

    def converged(self, seconds: float) -> None:
        """From the Consul change to the change applied."""
        if seconds == seconds:  # not NaN
            self._convergence.observe(seconds)

    def destination_ok(self, destination: str) -> None:
        self.problems.pop(destination, None)
        self.rendered.add(destination)
        self.last_success = time.time()
        self._last_success.set(self.last_success)
        self._ready.set(1 if self.ready else 0)

    def fail(self, destination: str, reason: FailureReason, message: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self._failures.labels(reason=reason).inc()
        self.problems[destination] = Problem(reason, message)

    # -- what operators read --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.templates > 0 and len(self.rendered) >= self.templates

    def contact(self) -> ConsulContact | None:
        return self.contact_source() if self.contact_source is not None else None

    def check(self, contact: ConsulContact | None = None) -> tuple[str, str]:
        """(Consul check status, output) for the TTL check; `contact`: one already read."""
        contact = contact or self.contact()
        freshness = contact.freshness if contact is not None else Freshness.OFF
        unreachable = [p for p in self.problems.values() if p.reason is FailureReason.RELOAD]
        if unreachable:
            return "critical", f"HAProxy unreachable or refusing: {unreachable[0].message}"
        if contact is not None and freshness in STALE:
            return str(freshness), contact.describe()
        if self.problems:
            template, problem = next(iter(self.problems.items()))
            return "warning", f"{template}: {problem.reason} failed: {problem.message}"
        if not self.ready:
            waiting = ", ".join(self.waiting_for) or "Consul"
            return "warning", f"not ready: waiting for {waiting}"
        warnings = self._warnings()
        if warnings:
            return "warning", " | ".join(warnings)
        if self.served:
            return "passing", " | ".join(served.describe(Path(t).name) for t, served in sorted(self.served.items()))
        return "passing", f"{self.templates} template(s) rendered and applied"

    def _warnings(self) -> list[str]:
        """What is wrong while everything is served, the operator's own matters first: a registrant
        can always add a left-out instance, and one hid an expiring certificate and a reload storm
        from the check (helper-133, /tmp/rev79)."""
        warnings = []
        if self.certificate_notes:
            warnings.append(f"{first_few(self.certificate_notes)} (renew or fix it in KV; all else is served)")
        gap, floor = self.reload_pace_source()
        if gap > floor:
            warnings.append(
                f"HAProxy reloads slowed to one every {gap:.0f} s by a storm of them: something keeps changing "
                "what needs a reload (a service's settings, services coming and going; the timeline says which). "
                "Server changes still go at once; a new service waits for the next reload"
            )
        if any(self.left_out.values()):
            total = len({item for items in self.left_out.values() for item in items})
            listed = list(dict.fromkeys(item for template in self.left_out for item in self._listed_of(template)))
            shown = first_few(listed, total=total)
            warnings.append(f"left out or ignored (catalog values): {shown}; the rest is served")
        return warnings

    def _listed_of(self, template: str) -> list[str]:
        """The items left out of `template` that /status and the check list (`fairly_listed`)."""
        items = self.left_out.get(template, ())
        cached = self._listed.get(template)
        if cached is None or (cached[0] is not items and cached[0] != items):  # a render's new tuple, alike
            cached = self._listed[template] = (items, fairly_listed(items))
        return cached[1]

    def snapshot(self) -> dict[str, Any]:
        """Everything operators read, once: `/status`, the page and `consul-renderer status` show this."""
        contact = self.contact()
        status, output = self.check(contact)
        return {
            "ready": self.ready,
            "check": status,
            "output": output,
            "renders": self.renders,
            "applies": dict(self.applies),
            "failures": dict(self.failures),
            "watch_errors": self.watch_errors,
            "consul_requests": self.consul_requests_source(),
            "consul_answer_bytes": self.consul_answer_bytes_source(),
            "last_success": self.last_success,
            "problems": {t: {"reason": p.reason, "message": p.message} for t, p in self.problems.items()},
            "waiting_for": list(self.waiting_for),
            "served": {t: served.as_dict() for t, served in sorted(self.served.items())},
            # At most MAX_LEFT_OUT_LISTED a template, each service in turn (each item cut where it
            # names an id or a key): `left_out_total` and the metric count them all.
            "left_out": {t: self._listed_of(t) for t, items in self.left_out.items() if items},
            "left_out_reasons": {
                t: [LeftOut.parse(item).as_dict() for item in self._listed_of(t)]
                for t, items in self.left_out.items()
                if items
            },
            "left_out_total": {t: len(items) for t, items in self.left_out.items() if items},
            "reload_gap_s": round(self.reload_pace_source()[0], 3),
            "certificate_notes": list(self.certificate_notes),
            "consul": contact.as_dict() if contact is not None else None,
            "changes": [change.as_dict() for change in self.timeline.recent()],
            "latency": self.timeline.last_hour(),
            "now": time.time(),
        }

    def diff(self, destination: str) -> tuple[str, str] | None:
        """(previous, live) content of `destination`, or None when there is no earlier file to compare."""
        served = self.served.get(destination)
        if served is None or served.previous is None:
            return None
        return served.previous, served.content


class _ConsulCollector(Collector):
    """The figures read at scrape time: watch errors, requests sent, and the data's age."""

    def __init__(self, status: Status) -> None:
        self._status = status

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily("consul_renderer_watch_errors", "Failed Consul queries (retried)")
        family.add_metric([], self._status.watch_errors)
        requests = CounterMetricFamily("consul_renderer_consul_requests", "HTTP requests sent to the Consul agent")
        requests.add_metric([], self._status.consul_requests_source())
        answer_bytes = CounterMetricFamily(
            "consul_renderer_consul_answer_bytes",
            "Bytes of the answers' bodies received from the Consul agent (as sent: gzipped where asked)",
        )
        answer_bytes.add_metric([], self._status.consul_answer_bytes_source())
        gap = GaugeMetricFamily(
            "consul_renderer_reload_gap_seconds",
            "The gap HAProxy's next reload keeps from the last: min_reload_interval, longer in a storm of reloads",
        )
        gap.add_metric([], self._status.reload_pace_source()[0])
        families: list[Metric] = [family, requests, answer_bytes, gap]
        contact = self._status.contact()
        if contact is not None:
            age = GaugeMetricFamily(
                "consul_renderer_data_age_seconds",
                "Seconds since the watched Consul data was last known current (0 while Consul answers)",
            )
            age.add_metric([], contact.data_age_s)
            limit = GaugeMetricFamily(
                "consul_renderer_max_data_age_seconds", "max_data_age: warning past it, critical past twice it"
            )
            limit.add_metric([], contact.max_data_age_s)
            stale = GaugeMetricFamily(
                "consul_renderer_data_stale", "1 while the data is older than max_data_age, 2 past twice it, else 0"
            )
            stale.add_metric([], {Freshness.WARNING: 1, Freshness.CRITICAL: 2}.get(contact.freshness, 0))
            families += [age, limit, stale]
        return families
