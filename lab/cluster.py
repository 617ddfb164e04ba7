"""The production topology on one machine: 3 Consul servers, 2 load balancers, 3 web hosts, a client.

    srv1..srv3   Consul servers (raft_multiplier 1: an election takes 2-4 s here), UI on :8500
    lb1, lb2     a Consul client agent, HAProxy and the renderer talking to its local agent;
                 lb2's renderer reads with max_stale (from any server, within a bound)
    web1..web3   a Consul client agent and web apps, each under `consul-renderer register`
    client       where the load comes from

The numbers of load balancers (1-10: lb1..lb10, only lb2 with max_stale), web hosts (1-10) and
apps per web host are fields of `Cluster`; the defaults are the topology above. The renderers
watch over their agent's HTTPS port (HTTP/2) unless `renderer_https` is False (plain HTTP).

Every host is a network namespace on one bridge (lab.netns); every agent listens on the default
ports on its own address, as on real hosts, and is reachable from the root namespace. Every
process is started through `on_start` (so a test can show its log and stop it) and stopped by
PID in `stop()`, which also removes every namespace, even after a failed start.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from lab import CHECKOUT
from lab.netns import SUBNET, Host, Network
from lab.processes import ManagedProcess, get_json, http_get, spawn, wait_until
from lab.stack import DEFAULT_TEMPLATE, LocalStack, start_local_stack
from lab.tls import AgentTLS, make_agent_tls

HTTP_PORT = 8080
STATS_PORT = 1936
STATUS_PORT = 9464
CONSUL_HTTP = 8500
CONSUL_HTTPS = 8501  # every agent serves HTTPS too (a CA made at start); the renderers use it, over HTTP/2
WEB_PORT = 8001  # web apps on a web host use 8001, 8002, …
LB2_MAX_STALE = "10s"
MAX_BALANCERS = 10  # lb<n> is 10.231.0.(20+n), web<n> 10.231.0.(30+n): ten of each fit before the next block
MAX_WEB_HOSTS = 10
# The load balancers' status servers bind every address of their host: the page and /status then
# ask for a login (status_auth); the lab's own.
STATUS_AUTH = "lab:lab-status-page"

T = TypeVar("T")


def run_as_lab_script(measure: Callable[[Callable[[str], None]], T]) -> T | None:
    """A lab script's run: None (said why) unless root; SIGTERM goes through `finally` (the cluster
    stops); `measure` gets a progress printer that stamps each line with the seconds since start."""
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces, veth, a bridge)", file=sys.stderr)
        return None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    return measure(lambda line: print(f"[{time.monotonic() - began:6.1f}s] {line}", flush=True))


def spoken(names: list[str]) -> str:
    """["lb1", "lb2", "lb3"] as "lb1, lb2 and lb3"."""
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1])))


@dataclass
class Agent:
    """A Consul agent on its host; `data_dir` survives a restart (the node keeps its identity)."""

    host: Host
    server: bool
    data_dir: Path
    log_path: Path
    process: ManagedProcess | None = None

    @property
    def http(self) -> str:
        return f"http://{self.host.address}:{CONSUL_HTTP}"

    @property
    def raft_address(self) -> str:
        return f"{self.host.address}:8300"

    def get(self, path: str, timeout: float = 2.0) -> object:
        return get_json(f"{self.http}{path}", timeout)

    def put(self, path: str, body: object, timeout: float = 5.0) -> None:
        data = json.dumps(body).encode()
        req = urllib.request.Request(f"{self.http}{path}", data=data, method="PUT")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()


@dataclass
class Balancer:
    host: Host
    agent: Agent
    workdir: Path
    stack: LocalStack | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{HTTP_PORT}/"

    @property
    def status_url(self) -> str:
        return f"http://{self.host.address}:{STATUS_PORT}"

    def rendered(self) -> str:
        assert self.stack is not None
        return self.stack.config_path.read_text()

    def routes(self) -> str:
        assert self.stack is not None
        return (self.stack.config_path.parent / "routes.map").read_text()

    def status(self) -> dict[str, Any]:
        """The renderer's /status snapshot (applies by kind, watch errors, problems)."""
        login = base64.b64encode(STATUS_AUTH.encode()).decode()
        request = urllib.request.Request(f"{self.status_url}/status", headers={"Authorization": f"Basic {login}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            snapshot = json.loads(resp.read())
        assert isinstance(snapshot, dict)
        return snapshot

    def servers_in_file(self) -> int:
        return sum(1 for line in self.rendered().splitlines() if line.strip().startswith("server "))

    def renderer_log(self) -> str:
        assert self.stack is not None
        return self.stack.renderer.log_text(10**7)


@dataclass
class WebHost:
    host: Host
    agent: Agent
    apps: dict[str, ManagedProcess] = field(default_factory=dict)  # each under `consul-renderer register`
    spares: dict[str, ManagedProcess] = field(default_factory=dict)  # running, registered by hand

    def register(self, instance: str, port: int, timeout: float = 5.0) -> None:
        """Register an instance that is running here, with no check (passing at once), as `web`."""
        body = {"Name": "web", "ID": instance, "Address": self.host.address, "Port": port, "Tags": ["lb"]}
        self.agent.put("/v1/agent/service/register", body, timeout)

    def deregister(self, instance: str, timeout: float = 5.0) -> None:
        self.agent.put(f"/v1/agent/service/deregister/{instance}", None, timeout)


@dataclass
class Cluster:
    workdir: Path
    consul_bin: str
    haproxy_bin: str
    apps_per_host: int = 2
    balancer_count: int = 2  # lb1..lb<n>, at most MAX_BALANCERS
    web_host_count: int = 3  # web1..web<n>, at most MAX_WEB_HOSTS
    renderer_https: bool = True  # the renderers watch over the agents' HTTPS port (HTTP/2); False: plain HTTP
    template: Path = DEFAULT_TEMPLATE
    on_start: Callable[[ManagedProcess], ManagedProcess] = lambda proc: proc
    network: Network = field(default_factory=Network)
    servers: list[Agent] = field(default_factory=list)
    balancers: list[Balancer] = field(default_factory=list)
    web_hosts: list[WebHost] = field(default_factory=list)
    client: Host | None = None
    tls: AgentTLS | None = None  # made at start: the CA and the agents' certificate
    _processes: list[ManagedProcess] = field(default_factory=list)

    # --- start -------------------------------------------------------------------------------

    def start(self, progress: Callable[[str], None] = lambda _: None) -> Cluster:
        """Build the network and start everything; on any failure everything started is stopped."""
        try:
            self._plan()
            progress(f"network: {len(self.network.hosts)} hosts on {SUBNET}.0/24")
            self.network.create()
            addresses = tuple(h.address for h in self.network.hosts)
            self.tls = make_agent_tls(self.consul_bin, self.workdir / "tls", extra_ips=addresses)
            progress(f"TLS: a CA and the agents' certificate in {self.workdir / 'tls'} (HTTPS on port {CONSUL_HTTPS})")
            progress("consul servers: srv1 srv2 srv3, waiting for a leader")
            for agent in self.servers:
                self.start_agent(agent)
            wait_until(self.leader, 60, "a Consul leader")
            clients = [b.agent for b in self.balancers] + [w.agent for w in self.web_hosts]
            progress(f"leader: {self.leader()}; client agents on {' '.join(a.host.name for a in clients)}")
            for agent in clients:
                self.start_agent(agent)
            for agent in clients:
                wait_until(partial(self._joined, agent), 30, f"the agent on {agent.host.name} to join")
            progress(f"web apps: {self.apps_per_host} per web host, each under `consul-renderer register`")
            for web in self.web_hosts:
                for n in range(1, self.apps_per_host + 1):
                    self.start_app(web, f"{web.host.name}-{n}", WEB_PORT + n - 1)
            wait_until(lambda: len(self.passing("web")) == len(self.all_apps()), 30, "every web app to pass")
            progress(f"load balancers: HAProxy + the renderer on {spoken([b.host.name for b in self.balancers])}")
            for balancer in self.balancers:
                self._start_balancer(balancer)
        except BaseException:
            self.stop()
            raise
        return self

    def _plan(self) -> None:
        if not 1 <= self.balancer_count <= MAX_BALANCERS:
            raise ValueError(f"balancer_count must be 1-{MAX_BALANCERS}, not {self.balancer_count}")
        if not 1 <= self.web_host_count <= MAX_WEB_HOSTS:
            raise ValueError(f"web_host_count must be 1-{MAX_WEB_HOSTS}, not {self.web_host_count}")
        for n in (1, 2, 3):
            host = self.network.add(f"srv{n}", 10 + n)
            self.servers.append(self._agent(host, server=True))
        for n in range(1, self.balancer_count + 1):
            host = self.network.add(f"lb{n}", 20 + n)
            self.balancers.append(Balancer(host, self._agent(host, server=False), self.workdir / host.name))
        for n in range(1, self.web_host_count + 1):
            host = self.network.add(f"web{n}", 30 + n)
            self.web_hosts.append(WebHost(host, self._agent(host, server=False)))
        self.client = self.network.add("client", 41)

    def _agent(self, host: Host, server: bool) -> Agent:
        return Agent(host, server, self.workdir / host.name / "consul-data", self.workdir / host.name / "consul.log")

    def _spawn(self, name: str, host: Host, cmd: list[str], log_path: Path, cwd: Path | None = None) -> ManagedProcess:
        proc = self.on_start(spawn(name, host.command(cmd), log_path, cwd=cwd))
        self._processes.append(proc)
        return proc

    def agent_command(self, agent: Agent) -> list[str]:
        cmd = [
            self.consul_bin, "agent", "-node", agent.host.name, "-bind", agent.host.address,
            "-client", "0.0.0.0", "-data-dir", str(agent.data_dir),
            "-hcl", "performance { raft_multiplier = 1 }", "-hcl", "ports { grpc = -1 }",
            "-hcl", 'log_level = "INFO"', "-hcl", "disable_update_check = true",
        ]  # fmt: skip
        for server in self.servers:
            cmd += ["-retry-join", server.host.address]
        if self.tls is not None:
            for setting in self.tls.hcl(CONSUL_HTTPS):
                cmd += ["-hcl", setting]
        if agent.server:
            cmd += ["-server", "-bootstrap-expect", str(len(self.servers)), "-ui"]
        return cmd

    def start_agent(self, agent: Agent) -> ManagedProcess:
        agent.data_dir.mkdir(parents=True, exist_ok=True)
        agent.process = self._spawn(f"consul-{agent.host.name}", agent.host, self.agent_command(agent), agent.log_path)
        wait_until(lambda: agent.get("/v1/agent/self") is not None, 30, f"the agent on {agent.host.name}")
        return agent.process

    def _joined(self, agent: Agent) -> bool:
        return bool(agent.get("/v1/status/leader"))

    def start_app(self, web: WebHost, instance: str, port: int, register: bool = True) -> ManagedProcess:
        """A web app on `web`; registered through `consul-renderer register` unless `register` is False."""
        app = [sys.executable, "-m", "lab.webapp", "--host", "0.0.0.0", "--port", str(port)]
        app += ["--id", instance]
        cmd = app
        if register:
            cmd = [
                sys.executable, "-m", "renderer", "register", "--consul-addr", f"127.0.0.1:{CONSUL_HTTP}",
                "--name", "web", "--id", instance, "--port", str(port), "--address", web.host.address,
                "--tag", "lb", "--check-http", "/health", "--check-interval", "1s",
                "--deregister-critical-after", "1m", "--", *app,
            ]  # fmt: skip
        proc = self._spawn(instance, web.host, cmd, self.workdir / web.host.name / f"{instance}.log")
        (web.apps if register else web.spares)[instance] = proc
        url = f"http://{web.host.address}:{port}/health"
        wait_until(lambda: http_get(url)[0] == 200, 15, f"{instance} to listen")
        return proc

    def _start_balancer(self, balancer: Balancer) -> None:
        extra: tuple[str, ...] = ("--wait", "0s:0s", "--status-auth", STATUS_AUTH)
        consul_addr = f"127.0.0.1:{CONSUL_HTTP}"
        if self.tls is not None and self.renderer_https:  # the agent's HTTPS port: HTTP/2, precise watches
            consul_addr = f"https://127.0.0.1:{CONSUL_HTTPS}"
            extra += ("--ca-file", str(self.tls.ca_file))
        if balancer.host.name == "lb2":
            extra += ("--max-stale", LB2_MAX_STALE)
        balancer.stack = start_local_stack(
            balancer.workdir,
            consul_addr,
            self.haproxy_bin,
            template=self.template,
            http_port=HTTP_PORT,
            stats_port=STATS_PORT,
            status_port=STATUS_PORT,
            extra_args=extra,
            on_start=self._track,
            wrap=balancer.host.command,
            bind_address="0.0.0.0",
            host=balancer.host.address,
            relative_paths=True,
        )

    def start_load(self, out: Path) -> ManagedProcess:
        """Constant load from the client host through both load balancers (lab.load), into `out`."""
        assert self.client is not None
        cmd = [sys.executable, "-m", "lab.load", "--out", str(out), *(b.url for b in self.balancers)]
        return self._spawn("load", self.client, cmd, self.workdir / "load.log", cwd=CHECKOUT)

    def _track(self, proc: ManagedProcess) -> ManagedProcess:
        self._processes.append(proc)
        return self.on_start(proc)

    # --- observe -----------------------------------------------------------------------------

    def live_servers(self) -> list[Agent]:
        return [s for s in self.servers if s.process is not None and s.process.alive()]

    def leader(self) -> str | None:
        """The leader's raft address as a live server sees it, or None during an election."""
        for server in self.live_servers():
            try:
                leader = server.get("/v1/status/leader", timeout=1)
            except OSError:
                continue
            if leader:
                return str(leader)
        return None

    def leader_agent(self) -> Agent:
        leader = wait_until(self.leader, 30, "a Consul leader")
        return next(s for s in self.servers if s.raft_address == leader)

    def passing(self, service: str) -> list[str]:
        entries = self.servers[0].get(f"/v1/health/service/{service}?passing=1")
        assert isinstance(entries, list)
        return sorted(str(e["Service"]["ID"]) for e in entries)

    def all_apps(self) -> list[str]:
        return sorted(name for web in self.web_hosts for name in web.apps)

    # --- act ---------------------------------------------------------------------------------

    def kill(self, agent: Agent, signum: int = signal.SIGKILL) -> None:
        assert agent.process is not None
        agent.process.signal(signum)
        agent.process.popen.wait(10)

    def crash(self, web: WebHost) -> None:
        """The host dies: its agent and every app (with its `register` wrapper) get SIGKILL at once,
        so nothing deregisters; Consul finds out by itself."""
        procs = [*web.apps.values(), *web.spares.values()]
        if web.agent.process is not None:
            procs.append(web.agent.process)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: the wrapper's web app too
        for proc in procs:
            proc.popen.wait(10)

    def revive(self, web: WebHost) -> None:
        """Start a crashed web host's agent and apps again, on the same ports."""
        self.restart(web.agent)
        for n, instance in enumerate(list(web.apps), start=1):
            self.start_app(web, instance, WEB_PORT + n - 1)

    def restart(self, agent: Agent) -> None:
        """Start a stopped agent again with its data dir: the same node rejoins."""
        self.start_agent(agent)
        if agent.server:
            wait_until(lambda: self._raft_has(agent), 60, f"{agent.host.name} to be a raft voter again")
            wait_until(lambda: self._caught_up(agent), 60, f"{agent.host.name} to catch up with the leader")

    def _caught_up(self, agent: Agent) -> bool:
        """A restarted server's state equals the leader's. Until the leader tells it the commit
        index it holds only its last raft snapshot (none yet in a young cluster: an empty
        catalog), and a scenario that then takes the other servers away reads that from it (our
        reading of 2 of 8 `make test` runs today, whose survivor rendered `web` empty)."""
        leader = self.leader_agent()
        paths = ("/v1/catalog/services", "/v1/catalog/nodes")
        return all(agent.get(f"{path}?stale") == leader.get(path) for path in paths)

    def _raft_has(self, agent: Agent) -> bool:
        config = agent.get("/v1/operator/raft/configuration")
        assert isinstance(config, dict)
        return self.leader() is not None and any(s["Address"] == agent.raft_address for s in config["Servers"])

    # --- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Every process by PID (newest first), then every namespace, link and the bridge."""
        try:
            for proc in self._processes:
                proc.signal(signal.SIGTERM)  # all at once: agents take a second or two to leave
            for proc in reversed(self._processes):
                proc.stop()
        finally:  # an interrupt while the processes stop still takes the network down
            self.network.destroy()
