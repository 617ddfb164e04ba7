"""The set-ups compared side by side: ours (apply=auto, apply=reload) and HAProxy's own DNS SRV discovery."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab.processes import ManagedProcess, free_port, start_haproxy
from lab.stack import start_local_stack
from renderer.haproxy.control import MasterCLI

DNS_CONFIG = """\
global
    maxconn 4000
    hard-stop-after 30s
    httpclient.ssl.verify none
defaults
    mode http
    option idle-close-on-response
    option redispatch
    retries 3
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    default-server inter 2s fall 2 rise 2
resolvers consul
    nameserver consul 127.0.0.1:{dns_port}
    # Without it Consul answers only 3 random SRV records and no truncation bit: slots flap.
    accepted_payload_size 8192
{tuning}
frontend http
    bind 127.0.0.1:{http_port}
    default_backend web
backend web
    balance roundrobin
    option httpchk GET /health
    # Instances share 127.0.0.1 here: allow-dup-ip, or HAProxy keeps only one of them.
    server-template web {slots} _web._tcp.service.consul resolvers consul resolve-opts allow-dup-ip resolve-prefer ipv4 init-addr none check
"""  # noqa: E501

TUNED = """\
    timeout resolve 100ms
    timeout retry 100ms
    hold valid 100ms
    hold obsolete 0s
"""


@dataclass
class Running:
    """A set-up that serves http://127.0.0.1:http_port/ and can be asked about its processes."""

    name: str
    http_port: int
    master: MasterCLI
    processes: list[ManagedProcess]

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()


@dataclass(frozen=True)
class Setup:
    name: str
    description: str
    kind: str  # "ours" or "dns"
    apply: str = "auto"
    tuned: bool = False

    def start(self, workdir: Path, consul_addr: str, dns_port: int, haproxy_bin: str) -> Running:
        workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "ours":
            args = ("--apply", self.apply, "--var", f"state_file={workdir / 'server-state'}")
            stack = start_local_stack(workdir, consul_addr, haproxy_bin, extra_args=args)
            return Running(self.name, stack.http_port, MasterCLI(str(stack.master_socket)), stack.processes)
        http_port = free_port()
        config = workdir / "haproxy.cfg"
        tuning = TUNED if self.tuned else "    # HAProxy's default resolver timers\n"
        config.write_text(DNS_CONFIG.format(dns_port=dns_port, http_port=http_port, slots=16, tuning=tuning))
        master = workdir / "master.sock"
        haproxy = start_haproxy(haproxy_bin, config, master, workdir / "haproxy.log")
        return Running(self.name, http_port, MasterCLI(str(master)), [haproxy])


SETUPS = (
    Setup("ours-auto", "consul-renderer, apply=auto (Runtime API)", "ours", apply="auto"),
    Setup("ours-reload", "consul-renderer, apply=reload (like consul-template)", "ours", apply="reload"),
    Setup("dns-default", "HAProxy DNS SRV, default resolver timers", "dns"),
    Setup("dns-tuned", "HAProxy DNS SRV, 100 ms resolver timers", "dns", tuned=True),
)
