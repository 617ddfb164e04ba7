"""What operators see: the renderer's state, its Prometheus metrics and the status server.

`Status` is the one place the runner reports to; every report updates both the state (read by
`/status`, `/ready` and the TTL check of registration/sidecar.py) and the metrics (read by
`/metrics`). Nothing is global: each Status owns its own Prometheus registry.

`Status.check()` is what the TTL check of the self-registered `consul-renderer` service says:
- passing  when the last render and apply of every template succeeded;
- warning  when a template's last render failed validation or rendering (output: template, reason);
- critical when HAProxy is unreachable (apply failed: master socket missing, reload refused).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from renderer.errors import ApplyKind, FailureReason

log = logging.getLogger(__name__)

CONVERGENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


_BACKEND = re.compile(r"^[ \t]*backend[ \t]", re.MULTILINE)
_SERVER = re.compile(r"^[ \t]*server[ \t]", re.MULTILINE)
_LEFT_OUT = re.compile(r"#[ \t]*left out:[ \t]*(.*)$", re.MULTILINE)
MAX_LEFT_OUT_SHOWN = 3


@dataclass
class Served:
    """What one template's output that HAProxy (or the command) runs holds, and how it got there.

    The counts are taken from the content when first asked for (the check, `/status`), not on the
    path of a change: a 10,000-server file takes milliseconds to scan.
    """

    content: str = field(repr=False)
    kind: ApplyKind  # how the last change was applied
    after_change_ms: float | None  # from the Consul change to applied
    at: float  # wall-clock time of the last apply

    @classmethod
    def of(cls, content: str, kind: ApplyKind, after_change_s: float) -> Served:
        after = round(after_change_s * 1000, 1) if after_change_s == after_change_s else None
        return cls(content, kind, after, time.time())

    @functools.cached_property
    def counts(self) -> tuple[int, int, tuple[str, ...]]:
        """(backends, servers, the template's "left out: …" comments)."""
        text = self.content
        return len(_BACKEND.findall(text)), len(_SERVER.findall(text)), tuple(_LEFT_OUT.findall(text))

    def as_dict(self) -> dict[str, Any]:
        backends, servers, left_out = self.counts
        return {"backends": backends, "servers": servers, "left_out": list(left_out), "kind": self.kind,
                "after_change_ms": self.after_change_ms, "at": self.at}  # fmt: skip

    def describe(self, name: str) -> str:
        backends, servers, left_out = self.counts
        lag = f" {self.after_change_ms:.0f} ms after the Consul change" if self.after_change_ms is not None else ""
        when = time.strftime("%H:%M:%S", time.localtime(self.at))
        if self.kind is ApplyKind.ALREADY_LIVE:
            text = f"{name}: {backends} backend(s), {servers} server(s); already live when the renderer started"
        else:
            text = f"{name}: {backends} backend(s), {servers} server(s); last applied by {self.kind}{lag} at {when}"
        if left_out:
            more = len(left_out) - MAX_LEFT_OUT_SHOWN
            text += f"; left out: {'; '.join(left_out[:MAX_LEFT_OUT_SHOWN])}" + (
                f" (and {more} more)" if more > 0 else ""
            )
        return text


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
    waiting_for: list[str] = field(default_factory=list)
    served: dict[str, Served] = field(default_factory=dict)  # per template: what runs now
    left_out: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per template: unsafe instances
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
            "Instances and parts left out of a template because a catalog value is unsafe for where it goes",
            ["template"],
            registry=r,
        )
        r.register(_WatchErrors(self))

    # -- reports from the runner ----------------------------------------------------------------

    def render_ok(self) -> None:
        self.renders += 1
        self._renders.inc()

    def applied(self, kind: ApplyKind) -> None:
        self.applies[kind] = self.applies.get(kind, 0) + 1
        self._applies.labels(kind=kind).inc()

    def set_left_out(self, template: str, items: tuple[str, ...]) -> None:
        if items or template in self.left_out:
            self.left_out[template] = items
            self._left_out.labels(template=template).set(len(items))

    def found_serving(self, template: str, content: str) -> None:
        """The live file already held this content when the renderer first rendered it."""
        if template not in self.served:
            self.served[template] = Served.of(content, ApplyKind.ALREADY_LIVE, float("nan"))

    def now_serving(self, template: str, content: str, kind: ApplyKind, after_change_s: float) -> None:
        """A template's new output is live: remember what it holds (for the check and `status`). A
        change HAProxy needed nothing for (kind "none", e.g. comments) keeps the last apply's facts."""
        served = Served.of(content, kind, after_change_s)
        previous = self.served.get(template)
        if kind is ApplyKind.NONE and previous is not None:
            served = replace(served, kind=previous.kind, after_change_ms=previous.after_change_ms, at=previous.at)
        self.served[template] = served

    def converged(self, seconds: float) -> None:
        """From the Consul change to the change applied."""
        if seconds == seconds:  # not NaN
            self._convergence.observe(seconds)

    def template_ok(self, template: str) -> None:
        self.problems.pop(template, None)
        self.rendered.add(template)
        self.last_success = time.time()
        self._last_success.set(self.last_success)
        self._ready.set(1 if self.ready else 0)

    def fail(self, template: str, reason: FailureReason, message: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self._failures.labels(reason=reason).inc()
        self.problems[template] = Problem(reason, message)

    # -- what operators read --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.templates > 0 and len(self.rendered) >= self.templates

    def check(self) -> tuple[str, str]:
        """(Consul check status, output) for the TTL check."""
        unreachable = [p for p in self.problems.values() if p.reason is FailureReason.RELOAD]
        if unreachable:
            return "critical", f"HAProxy unreachable or refusing: {unreachable[0].message}"
        if self.problems:
            template, problem = next(iter(self.problems.items()))
            return "warning", f"{template}: {problem.reason} failed: {problem.message}"
        if not self.ready:
            waiting = ", ".join(self.waiting_for) or "Consul"
            return "warning", f"not ready: waiting for {waiting}"
        left_out = [item for items in self.left_out.values() for item in items]
        if left_out:
            shown = "; ".join(left_out[:MAX_LEFT_OUT_SHOWN])
            more = f" (and {len(left_out) - MAX_LEFT_OUT_SHOWN} more)" if len(left_out) > MAX_LEFT_OUT_SHOWN else ""
            return "warning", f"left out (unsafe catalog value): {shown}{more}; the rest is served"
        if self.served:
            return "passing", " | ".join(served.describe(Path(t).name) for t, served in sorted(self.served.items()))
        return "passing", f"{self.templates} template(s) rendered and applied"

    def snapshot(self) -> dict[str, Any]:
        status, output = self.check()
        return {
            "ready": self.ready,
            "check": status,
            "output": output,
            "renders": self.renders,
            "applies": dict(self.applies),
            "failures": dict(self.failures),
            "watch_errors": self.watch_errors,
            "last_success": self.last_success,
            "problems": {t: {"reason": p.reason, "message": p.message} for t, p in self.problems.items()},
            "waiting_for": list(self.waiting_for),
            "served": {t: served.as_dict() for t, served in self.served.items()},
            "left_out": {t: list(items) for t, items in self.left_out.items() if items},
        }


class _WatchErrors(Collector):
    def __init__(self, status: Status) -> None:
        self._status = status

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily("consul_renderer_watch_errors", "Failed Consul queries (retried)")
        family.add_metric([], self._status.watch_errors)
        requests = CounterMetricFamily("consul_renderer_consul_requests", "HTTP requests sent to the Consul agent")
        requests.add_metric([], self._status.consul_requests_source())
        return [family, requests]


class StatusServer:
    """`/metrics` (Prometheus), `/health` (the process runs), `/ready` (everything applied), `/status`."""

    def __init__(self, status: Status, host: str, port: int) -> None:
        self._status = status
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/status", self._snapshot)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("status server on http://%s:%d/ (/metrics, /health, /ready, /status)", self._host, self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._status.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready(self, _request: web.Request) -> web.Response:
        ready = self._status.ready
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "not ready\n")

    async def _snapshot(self, _request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self._status.snapshot(), indent=2) + "\n", content_type="application/json")
