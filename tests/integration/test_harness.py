"""The harness itself against real processes: Consul dev agent, HAProxy master-worker, backends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from lab import CHECKOUT
from lab.processes import ManagedProcess, free_port, http_get, wait_until
from lab.webapp import WebApp
from renderer.deliver.write import process_alive
from renderer.haproxy.control import MasterCLI
from tests.helpers import Pace

pytestmark = pytest.mark.integration


def client(agent: ManagedProcess) -> consul.Consul:
    host, port = str(agent.extra["http_addr"]).split(":")
    return consul.Consul(host=host, port=int(port))


def test_registered_service_is_read_back_and_blocking_query_wakes(consul_agent: ManagedProcess) -> None:
    c = client(consul_agent)
    c.agent.service.register("web", service_id="web-1", address="127.0.0.1", port=9001, tags=["lb"])
    # The agent syncs a registration to the catalog asynchronously: poll, never sleep.
    index, nodes = wait_until(lambda: (r := c.health.service("web")) and r[1] and r, 10, "web-1 in catalog")
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    assert nodes[0]["Service"]["Tags"] == ["lb"]

    result: dict[str, tuple[Any, list[dict[str, Any]]]] = {}

    def blocking() -> None:
        # A blocking query may return early when an unrelated index moves: block again until web-2.
        current = index
        while True:
            current, found = c.health.service("web", index=current, wait="20s")
            if any(n["Service"]["ID"] == "web-2" for n in found):
                result["answer"] = (current, found)
                return

    waiter = threading.Thread(target=blocking, daemon=True)
    waiter.start()
    c.agent.service.register("web", service_id="web-2", address="127.0.0.1", port=9002)
    waiter.join(timeout=15)
    assert not waiter.is_alive(), "blocking query did not return after a second instance registered"
    new_index, new_nodes = result["answer"]
    assert int(new_index) > int(index)
    assert sorted(n["Service"]["ID"] for n in new_nodes) == ["web-1", "web-2"]


def two_server_config(tmp_path: Path, port: int, servers: list[WebApp]) -> Path:
    lines = [
        "global",
        "  maxconn 1000",
        "defaults",
        "  mode http",
        "  timeout connect 2s",
        "  timeout client 10s",
        "  timeout server 10s",
        "  option idle-close-on-response",
        "frontend fe",
        f"  bind 127.0.0.1:{port}",
        "  default_backend be",
        "backend be",
        "  balance roundrobin",
        *(f"  server s{i} 127.0.0.1:{app.port} check inter 200ms" for i, app in enumerate(servers)),
    ]
    path = tmp_path / "haproxy.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_haproxy_answers_from_both_servers_and_reload_keeps_serving(
    tmp_path: Path,
    haproxy_factory: Callable[[Path], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    apps = [backends("a"), backends("b")]
    port = free_port()
    proc = haproxy_factory(two_server_config(tmp_path, port, apps))
    url = f"http://127.0.0.1:{port}/"

    seen: set[str] = set()

    def both_answered() -> bool:
        status, body = http_get(url)
        if status == 200:
            seen.add(body.strip())
        return seen == {"a", "b"}

    wait_until(both_answered, 10, "responses from both servers")

    failures: list[str] = []
    ok = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                status, _ = http_get(url)
            except OSError as err:
                failures.append(repr(err))
                continue
            if status == 200:
                ok += 1
            else:
                failures.append(str(status))

    loader = threading.Thread(target=load)
    loader.start()
    cli = MasterCLI(str(proc.extra["master_socket"]))
    before = cli.show_proc()
    try:
        for _ in range(3):
            result = cli.reload()
            assert result.success
    finally:
        stop.set()
        loader.join(timeout=10)
    after = cli.show_proc()
    assert after.reloads == before.reloads + 3
    assert after.workers[0] != before.workers[0]
    assert ok > 0
    assert failures == []


@contextlib.contextmanager
def inner_run(tmp_path: Path, source: str) -> Iterator[subprocess.Popen[str]]:
    """An inner pytest run of `source` (with this suite's conftest), killed on the way out if it
    has not ended."""
    (tmp_path / "test_inner.py").write_text(source)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", str(tmp_path)],
        cwd=CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield run
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()


def stopped_run(tmp_path: Path, pace: Pace, source: str, ready: Path) -> tuple[int, str]:
    """An inner run of `source`, sent SIGTERM once `ready` exists: its exit code and output."""
    with inner_run(tmp_path, source) as run:
        wait_until(lambda: ready.exists() or run.poll() is not None, pace(30), "the inner run to get ready")
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=pace(30))
        return run.returncode, output


def test_a_run_stopped_by_sigterm_stops_what_it_started(tmp_path: Path, pace: Pace) -> None:
    """A cancelled CI job or a `kill` sends SIGTERM: the run's processes (each in a session of its
    own) outlived a run killed outright, and the next run met them (the lab cluster's network:
    "another lab run owns the network"). The run stops as on Ctrl-C, and its teardowns run."""
    pid_file = tmp_path / "pid"
    source = (
        "import time\n"
        "from pathlib import Path\n"
        "from lab.processes import spawn\n\n"
        "def test_waits(track):\n"
        f"    proc = track(spawn('sleeper', ['sleep', '600'], Path({str(tmp_path / 'sleeper.log')!r})))\n"
        f"    Path({str(pid_file)!r}).write_text(str(proc.pid))\n"
        "    time.sleep(600)\n"
    )
    try:
        code, output = stopped_run(tmp_path, pace, source, pid_file)
        alive = process_alive(int(pid_file.read_text()))
    finally:
        if pid_file.exists() and process_alive(sleeper := int(pid_file.read_text())):
            os.kill(sleeper, signal.SIGKILL)  # in a session of its own: the inner run's end leaves it
    assert not alive, f"the run's process outlived it:\n{output}"
    assert code == 2 and "KeyboardInterrupt: signal 15" in output, output


def test_a_sigterm_during_a_teardown_lets_it_finish(tmp_path: Path, pace: Pace) -> None:
    """pytest's teardown catches no KeyboardInterrupt: one raised in it skipped the rest of that
    teardown (a cluster's network left up after its processes stopped; helper-124, /tmp/rev70). It
    waits for the teardown's end, then stops the run before the next test."""
    began, ended = tmp_path / "began", tmp_path / "ended"
    source = (
        "import time\n"
        "from pathlib import Path\n"
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def slow_to_stop():\n"
        "    yield\n"
        f"    Path({str(began)!r}).write_text('')\n"
        "    time.sleep(2)\n"
        f"    Path({str(ended)!r}).write_text('')\n\n"
        "def test_first(slow_to_stop):\n"
        "    pass\n\n"
        "def test_second():\n"
        "    time.sleep(600)\n"
    )
    code, output = stopped_run(tmp_path, pace, source, began)
    assert ended.exists(), f"the teardown was cut short:\n{output}"
    assert code == 2 and "SIGTERM during a teardown" in output, output


def test_a_sigterm_after_an_in_process_event_loop_still_stops_the_run(tmp_path: Path, pace: Pace) -> None:
    """A loop that handled SIGTERM (the renderer's runner, run in-process by a unit test) sets it
    back to its default when it closes: the next SIGTERM killed the run outright (helper-124)."""
    ready = tmp_path / "ready"
    source = (
        "import asyncio, signal, time\n"
        "from pathlib import Path\n\n"
        "def test_first():\n"
        "    async def main():\n"
        "        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)\n"
        "    asyncio.run(main())\n\n"
        "def test_second():\n"
        f"    Path({str(ready)!r}).write_text('')\n"
        "    time.sleep(600)\n"
    )
    code, output = stopped_run(tmp_path, pace, source, ready)
    assert code == 2 and "KeyboardInterrupt: signal 15" in output, output


def test_a_forked_child_dies_of_sigterm_and_runs_none_of_the_parents_teardowns(tmp_path: Path, pace: Pace) -> None:
    """A child forked by a test inherits the handler: raised there, the KeyboardInterrupt would run
    the parent's teardowns in the child (stopping what the parent still uses). It dies of the
    signal as it would have without the handler, and the run goes on."""
    ready, status, teardowns = tmp_path / "ready", tmp_path / "status", tmp_path / "teardowns"
    source = (
        "import os, time\n"
        "from pathlib import Path\n"
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def marked():\n"
        "    yield\n"
        f"    with open({str(teardowns)!r}, 'a') as out:\n"
        "        out.write(f'{os.getpid()}\\n')\n\n"
        "def test_forks(marked):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        f"        Path({str(ready)!r}).write_text(str(os.getpid()))\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    _, code = os.waitpid(child, 0)\n"
        f"    Path({str(status)!r}).write_text(str(os.waitstatus_to_exitcode(code)))\n"
    )
    try:
        with inner_run(tmp_path, source) as run:
            wait_until(lambda: ready.exists() and ready.read_text() != "", pace(30), "the forked child to start")
            os.kill(int(ready.read_text()), signal.SIGTERM)
            output, _ = run.communicate(timeout=pace(30))
    finally:
        if ready.exists() and ready.read_text() and process_alive(child := int(ready.read_text())):
            os.kill(child, signal.SIGKILL)
    assert status.read_text() == str(-signal.SIGTERM), output
    assert teardowns.read_text().split() == [str(run.pid)], output
    assert run.returncode == 0, output


def test_a_second_sigterm_during_a_teardown_that_hangs_stops_the_run(tmp_path: Path, pace: Pace) -> None:
    """A teardown held against one SIGTERM must not need a SIGKILL when it hangs (which would leave
    every process the run started): the second SIGTERM stops it at once."""
    began = tmp_path / "began"
    source = (
        "import time\n"
        "from pathlib import Path\n"
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def hangs():\n"
        "    yield\n"
        f"    Path({str(began)!r}).write_text('')\n"
        "    time.sleep(600)\n\n"
        "def test_first(hangs):\n"
        "    pass\n"
    )
    with inner_run(tmp_path, source) as run:
        wait_until(lambda: began.exists() or run.poll() is not None, pace(30), "the teardown to begin")
        run.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(timeout=1.0)
        assert run.poll() is None, "the first SIGTERM did not wait for the teardown"
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=pace(30))
    assert run.returncode == 2 and "KeyboardInterrupt" in output, output
