"""Hitless membership changes under the load that can fail: keep-alive clients sending POSTs (which
HAProxy never retries elsewhere), slow requests in flight while their server is removed, and the
removed instance stopped once the drain is over — 0 failed requests, no reload."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, wait_until
from lab.webapp import WebApp
from tests.helpers import consul_client, register, reloads, runtime_servers, settled_reloads, start_stack

pytestmark = pytest.mark.integration


@dataclass
class KeepAlivePosts:
    """Threads, each on one keep-alive connection, POSTing to a slow path back to back."""

    port: int
    threads: int = 6
    path: str = "/slow/80"
    seen: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> KeepAlivePosts:
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("POST", self.path, body=b"order=1", headers={"Content-Type": "text/plain"})
                answer = conn.getresponse()
                body = answer.read().decode().strip()
                if answer.status != 200:
                    self.failures.append(f"HTTP {answer.status}: {body[:60]}")
                else:
                    self.seen[body] += 1
                if answer.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as err:
                self.failures.append(repr(err))
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(15)

    def served_by(self, instance: str, timeout: float = 20) -> None:
        before = self.seen[instance]
        wait_until(lambda: self.seen[instance] > before, timeout, f"POSTs answered by {instance}")


def test_keep_alive_posts_in_flight_survive_adds_and_removals(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    apps = {name: backends(name) for name in ("web-a", "web-b")}
    for app in apps.values():
        register(consul_agent, app, check=False)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: "web-b" in stack.config_path.read_text(), 30, "both instances in the file")
    before = settled_reloads(stack, "web", {"dev_web-a", "dev_web-b"})
    load = KeepAlivePosts(stack.http_port).start()
    removed: set[str] = set()
    try:
        load.served_by("web-a")
        load.served_by("web-b")
        for round_ in range(3):
            fresh = backends(f"web-new-{round_}")
            register(consul_agent, fresh, check=False)
            load.served_by(fresh.state.instance_id)
            # Remove one while slow POSTs are in flight on it; stop it only after the drain.
            gone = next(iter(apps))
            consul_client(consul_agent).agent.service.deregister(apps[gone].state.instance_id)
            wait_until(lambda g=gone: g not in stack.config_path.read_text(), 20, f"{gone} out of the file")
            time.sleep(2.0)  # the drain: requests already sent to it finish
            apps.pop(gone).stop()
            removed.add(f"dev_{gone}")
            apps[fresh.state.instance_id] = fresh
            time.sleep(0.5)
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert sum(load.seen.values()) > 100
    assert reloads(stack) == before  # every change applied through the Runtime API
    # Each removed server is gone from HAProxy itself (`show servers state`), not only from traffic.
    expected = {f"dev_{name}" for name in apps}
    wait_until(lambda: runtime_servers(stack, "web") == expected, 10, f"only {sorted(expected)} left in HAProxy")
    assert len(removed) == 3 and not removed & runtime_servers(stack, "web")
    print(f"\nkeep-alive POSTs: {sum(load.seen.values())} answered, {len(load.failures)} failed, 0 reloads")
