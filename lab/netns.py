"""Hosts on one machine: a Linux bridge and one network namespace per host, joined by veth pairs.

Needs root (`ip netns`, veth, a bridge). The root namespace gets the bridge's first address, so
the test process (and a user's browser) reach every host directly. A host's link can be cut and
healed from the root side: its processes keep running but nothing reaches them, as when a cable
is pulled or a switch port dies. Everything created is removed by `destroy()`, and a network left
behind by a run that died is removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from renderer.deliver.write import process_alive

PREFIX = "crl"  # every namespace, link and the bridge carry it, so leftovers are found by name
BRIDGE = f"{PREFIX}-br"
SUBNET = "10.231.0"  # /24; .1 is the root namespace's side of the bridge
OWNER_FILE = Path("/run") / f"consul-renderer-{PREFIX}.pid"


class NetworkError(RuntimeError):
    """A namespace, link or address could not be set up."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Host:
    """One host: a network namespace with one address on the bridge."""

    name: str
    address: str

    @property
    def namespace(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def link(self) -> str:
        """The root side of the host's veth pair: the switch port."""
        return f"{PREFIX}-{self.name}"

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside the host; `ip netns exec` execs it, so its PID is the command's own."""
        return ["ip", "netns", "exec", self.namespace, *cmd]

    def cut(self) -> None:
        """Pull the cable: the switch port goes down, nothing gets in or out."""
        ip("link", "set", self.link, "down")

    def heal(self) -> None:
        ip("link", "set", self.link, "up")


@dataclass
class Network:
    """A bridge plus hosts; `create()` builds it, `destroy()` removes all of it."""

    hosts: list[Host] = field(default_factory=list)
    gateway: str = f"{SUBNET}.1"
    owned: bool = field(default=False, init=False, compare=False)  # claimed by `create()`: only then removed

    def add(self, name: str, last_octet: int) -> Host:
        host = Host(name, f"{SUBNET}.{last_octet}")
        self.hosts.append(host)
        return host

    def create(self) -> None:
        take_over_leftovers()  # refuses while another live run owns the network: nothing is claimed
        OWNER_FILE.write_text(str(os.getpid()))
        self.owned = True
        try:
            ip("link", "add", BRIDGE, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", BRIDGE)
            ip("link", "set", BRIDGE, "up")
            _allow_bridge_forwarding(True)
            for host in self.hosts:
                _plug(host)
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Remove every namespace, link and the bridge; safe to call twice or after a failed create.
        A network this object never claimed is left alone: when `create()` refused because another
        live run owns it, the caller's cleanup must not pull that run's hosts from under it (two
        test runs at once did exactly that: every cluster test of the first one failed)."""
        if self.owned:
            remove_all()
            self.owned = False


def _plug(host: Host) -> None:
    ip("netns", "add", host.namespace)
    ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
    ip("link", "set", host.link, "master", BRIDGE, "up")
    ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
    ip("-n", host.namespace, "link", "set", "eth0", "up")
    ip("-n", host.namespace, "link", "set", "lo", "up")


def _allow_bridge_forwarding(allow: bool) -> None:
    """With br_netfilter loaded (dockerd loads it), bridged frames pass iptables' FORWARD chain,
    whose policy dockerd may set to DROP: accept our bridge's own traffic explicitly."""
    rule = ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]
    with contextlib.suppress(FileNotFoundError, subprocess.SubprocessError):
        present = subprocess.run(["iptables", "-C", *rule], capture_output=True, timeout=10).returncode == 0
        if allow and not present:
            subprocess.run(["iptables", "-I", *rule], capture_output=True, timeout=10, check=True)
        elif not allow and present:
            subprocess.run(["iptables", "-D", *rule], capture_output=True, timeout=10, check=True)


def take_over_leftovers() -> None:
    """Remove a network an earlier run left behind, unless that run is still alive."""
    with contextlib.suppress(OSError, ValueError):
        owner = int(OWNER_FILE.read_text())
        if owner != os.getpid() and process_alive(owner):
            raise NetworkError(
                f"another lab run (pid {owner}) owns the {SUBNET}.0/24 network; stop it first "
                f"(or remove {OWNER_FILE} if that pid is not a lab run)"
            )
    remove_all()


def remove_all() -> None:
    for namespace in ip("netns", "list", check=False).stdout.split():
        if namespace.startswith(f"{PREFIX}-"):
            ip("link", "del", namespace, check=False)  # the root side of its veth pair
            ip("netns", "del", namespace, check=False)
    ip("link", "del", BRIDGE, check=False)
    _allow_bridge_forwarding(False)
    with contextlib.suppress(OSError, ValueError):
        if int(OWNER_FILE.read_text()) == os.getpid():
            OWNER_FILE.unlink()
