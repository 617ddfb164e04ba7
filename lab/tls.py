"""TLS for the lab's Consul agents, made as an operator would: `consul tls ca create` and
`consul tls cert create -server`. The agent then serves HTTPS (HTTP/2 by ALPN) on its own port."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentTLS:
    """A CA and a server certificate (127.0.0.1 and localhost) for the agents of datacenter dc1."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def hcl(self, https_port: int) -> tuple[str, ...]:
        """The agent settings that serve HTTPS on `https_port` (clients need no certificate)."""
        return (
            f"ports {{ https = {https_port} }}",
            f'ca_file = "{self.ca_file}"',
            f'cert_file = "{self.cert_file}"',
            f'key_file = "{self.key_file}"',
            "verify_incoming = false",
            "verify_incoming_https = false",
        )


def make_agent_tls(consul_bin: str, directory: Path, extra_ips: tuple[str, ...] = ()) -> AgentTLS:
    """A new CA and server certificate in `directory` (created), valid for 127.0.0.1 and `extra_ips`."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([consul_bin, "tls", "ca", "create"], cwd=directory, check=True, capture_output=True, timeout=60)
    ips = [f"-additional-ipaddress={ip}" for ip in extra_ips]
    cmd = [consul_bin, "tls", "cert", "create", "-server", "-dc", "dc1", *ips]
    subprocess.run(cmd, cwd=directory, check=True, capture_output=True, timeout=60)
    return AgentTLS(
        directory / "consul-agent-ca.pem",
        directory / "dc1-server-consul-0.pem",
        directory / "dc1-server-consul-0-key.pem",
    )
