"""README promises around the loop and `consul-renderer register`, needing no Consul:

- "`max_data_age` is read at start (a SIGHUP does not change it)": a whole --dry Runner in this
  process, whose template needs no Consul data, given a SIGHUP with a new configuration;
- "`--address` defaults to the address this host uses to reach the agent": what the Registrar
  sends (its `_put`, our seam, records the body) against the local address of a real TCP
  connection to the agent's host and port."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from lab.processes import free_port
from renderer.cli import build_parser
from renderer.config import Config, ConsulSettings, TemplateSpec
from renderer.errors import ConfigError
from renderer.registration.register import Registrar, Registration
from renderer.runner import Runner
from renderer.status.contact import Freshness
from renderer.wakeups import Wake

STARTED_WITH_S = 30.0
RELOADED_WITH_S = 0.001  # were it taken, the data (as old as the run) would be critical at once


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_max_data_age_is_read_at_start_and_a_sighup_does_not_change_it(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("static\n")  # no Consul data needed
    spec = TemplateSpec(tmp_path / "t.j2", tmp_path / "o")
    consul = ConsulSettings(addr=f"127.0.0.1:{free_port()}")  # nothing listens there; nothing is asked
    started = Config(consul=consul, templates=(spec,), dry=True, max_data_age=STARTED_WITH_S)
    reloaded = Config(consul=consul, templates=(spec,), dry=True, max_data_age=RELOADED_WITH_S)
    runner = Runner(started, reload_config=lambda: reloaded, out=io.StringIO())

    async def scenario() -> None:
        run = asyncio.create_task(runner.run())
        try:
            await eventually(lambda: runner.status.contact() is not None or run.done())
            contact = runner.status.contact()
            assert contact is not None and contact.max_data_age_s == STARTED_WITH_S
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)  # the runner's own
            os.kill(os.getpid(), signal.SIGHUP)
            await eventually(lambda: runner.config.max_data_age == RELOADED_WITH_S or run.done())  # reloaded
            contact = runner.status.contact()
            assert contact is not None
            assert contact.max_data_age_s == STARTED_WITH_S, "a SIGHUP does not change max_data_age"
            assert contact.freshness is Freshness.FRESH  # the watchdog still judges by the value read at start
        finally:
            runner.request_stop()
            assert await asyncio.wait_for(run, 5) == 0

    asyncio.run(scenario())


def run_with_changing_addresses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Runner], None],
    reload_config: Callable[[], Config] | None = None,
) -> Runner:
    """A whole --dry Runner whose template needs no Consul data, on a host whose interfaces (psutil,
    patched) gain 198.51.100.8 before `change(runner)`; returns once its template's address policy
    holds that address (or fails after 5 s), the runner stopped."""
    (tmp_path / "t.j2").write_text("static\n")
    spec = TemplateSpec(tmp_path / "t.j2", tmp_path / "o")
    consul = ConsulSettings(addr=f"127.0.0.1:{free_port()}")  # nothing listens there; nothing is asked
    config = Config(consul=consul, templates=(spec,), dry=True)
    runner = Runner(config, reload_config=reload_config, out=io.StringIO())
    nic = [SimpleNamespace(family=socket.AF_INET, address="198.51.100.7")]
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {"eth0": nic})

    async def scenario() -> None:
        run = asyncio.create_task(runner.run())
        try:
            await eventually(lambda: hasattr(runner, "_cycle") or run.done())
            (state,) = runner._cycle.templates
            assert state.renderer.policy.own == frozenset({"198.51.100.7"})
            nic.append(SimpleNamespace(family=socket.AF_INET, address="198.51.100.8"))
            change(runner)
            await eventually(lambda: "198.51.100.8" in state.renderer.policy.own or run.done())
            assert runner._cycle.templates == [state]  # the same running template
        finally:
            runner.request_stop()
            assert await asyncio.wait_for(run, 5) == 0

    asyncio.run(scenario())
    return runner


def test_the_running_loop_reads_the_host_s_addresses_again_and_its_templates_take_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "The host's own addresses are read again every 30 s while running": the loop's timer, here
    shortened, re-reads them through psutil and every template's address policy takes the new set."""

    def shorten_the_timer(runner: Runner) -> None:
        runner._host.every_s = 0.05
        runner._wake.post(Wake.DUE)  # the loop computes its timers again

    run_with_changing_addresses(tmp_path, monkeypatch, shorten_the_timer)


def test_a_rejected_sighup_still_gives_the_templates_the_host_s_new_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP reads the host's addresses; a new configuration that is then rejected kept the
    running templates on the old ones, and the next timer read saw no change (a review's finding):
    a registration at a VIP just gained stayed allowed."""

    def rejected() -> Config:
        raise ConfigError("a broken file")

    run_with_changing_addresses(tmp_path, monkeypatch, lambda _: os.kill(os.getpid(), signal.SIGHUP), rejected)


@contextlib.contextmanager
def agent_port(host: str) -> Iterator[tuple[int, str]]:
    """A listener standing for the agent on `host`: its port, and the local address a real TCP
    connection to it leaves from (the address this host uses to reach it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection((host, port), timeout=2) as connection:
            yield port, str(connection.getsockname()[0])


def this_hosts_address() -> str | None:
    """This host's address on its default route (not loopback), or None (no network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, a route is chosen
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def ipv6_loopback() -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return None
    return "::1"


def registered_body(agent: str, registration: Registration, monkeypatch: pytest.MonkeyPatch) -> Mapping[str, Any]:
    """The body `Registrar.register` sends to the agent at `agent` (HOST:PORT)."""
    sent: list[tuple[str, Mapping[str, Any] | None]] = []
    monkeypatch.setattr(Registrar, "_put", lambda self, path, body: sent.append((path, body)))
    Registrar(ConsulSettings(addr=agent)).register(registration)
    assert [path for path, _ in sent] == ["/v1/agent/service/register"]
    body = sent[0][1]
    assert body is not None
    return body


@pytest.mark.parametrize("where", ["loopback", "ipv6 loopback", "this host's address"])
def test_register_without_address_registers_the_address_this_host_uses_to_reach_the_agent(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = {"loopback": "127.0.0.1", "ipv6 loopback": ipv6_loopback(), "this host's address": this_hosts_address()}[
        where
    ]
    if host is None:
        pytest.skip(f"no {where} here")
    args = build_parser().parse_args(["register", "--name", "web", "--port", "8080"])
    assert args.address is None  # no --address: the default is left to the registrar
    with agent_port(host) as (port, local):
        bracketed = f"[{host}]" if ":" in host else host
        body = registered_body(f"{bracketed}:{port}", Registration("web", 8080, address=args.address), monkeypatch)
    assert body["Address"] == local


def test_register_with_address_registers_that_address(monkeypatch: pytest.MonkeyPatch) -> None:
    with agent_port("127.0.0.1") as (port, _local):
        body = registered_body(f"127.0.0.1:{port}", Registration("web", 8080, address="10.9.8.7"), monkeypatch)
    assert body["Address"] == "10.9.8.7"
