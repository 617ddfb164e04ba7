"""Service names a URL must encode, read from a real Consul over both protocols.

Consul accepts almost any service name. Each goes into a request path quoted once, by the key that
asks for it (dependency.py). Over HTTP/1.1 py-consul's `uri()` quoted it a second time: `sp ace`
was asked as `sp%2520ace`, Consul answered 200 with no instance, and the backend was rendered
empty while the service had a passing one. Here each name is registered with one instance and read
back through the renderer's client, as a held query would be and as a sweep reads it, over the
agent's HTTP port and its HTTPS port (HTTP/2).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from lab.processes import ManagedProcess
from lab.stack import renderer_command
from renderer.config import ConsulSettings
from renderer.source.client import ConsulClient
from renderer.source.dependency import HealthService

pytestmark = pytest.mark.integration

NAMES = ["sp ace", "café", "a%41", "a%2Fb", "api!", "api?", "x#y", "a+b", "a;b", "a&b=c", "ünï cödé"]


def register_each(agent: ManagedProcess) -> None:
    for n, name in enumerate(NAMES):
        body = {"ID": f"odd-{n}", "Name": name, "Address": "127.0.0.1", "Port": 8000 + n}
        request = urllib.request.Request(
            f"http://{agent.extra['http_addr']}/v1/agent/service/register", data=json.dumps(body).encode(), method="PUT"
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200


async def read_each(settings: ConsulSettings, protocol: str) -> dict[str, list[tuple[str, int]]]:
    """{name: [(instance id, port)]} for each name, read held (a blocking query's first read) and
    not held (a sweep's read), which must agree."""
    client = ConsulClient(settings)
    try:
        await client.open(blocking_connections=1)
        assert client.protocol == protocol
        found: dict[str, list[tuple[str, int]]] = {}
        for name in NAMES:
            key = HealthService(name)
            path, params = key.request()
            answers = [await client.get(path, params, 0, held=held) for held in (True, False)]
            seen = [[(i.id, i.port) for i in key.parse(answer.decoded())] for answer in answers]
            assert seen[0] == seen[1], (name, seen)
            found[name] = seen[0]
        return found
    finally:
        await client.close()


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
def test_a_name_a_url_must_encode_reads_its_own_instance(tls_agent: ManagedProcess, protocol: str) -> None:
    register_each(tls_agent)
    if protocol == "HTTP/2":
        settings = ConsulSettings(
            addr=f"https://127.0.0.1:{tls_agent.extra['https_port']}", ca_file=str(tls_agent.extra["ca_file"])
        )
    else:
        settings = ConsulSettings(addr=str(tls_agent.extra["http_addr"]))
    found = asyncio.run(asyncio.wait_for(read_each(settings, protocol), 60))
    assert found == {name: [(f"odd-{n}", 8000 + n)] for n, name in enumerate(NAMES)}


def put_key(agent: ManagedProcess, key: str, value: str) -> None:
    request = urllib.request.Request(
        f"http://{agent.extra['http_addr']}/v1/kv/{key}", data=value.encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
def test_a_path_with_dot_segments_reads_no_other_key_and_holds_nothing(
    tls_agent: ManagedProcess, tmp_path: Path, protocol: str
) -> None:
    """`key "t/../secret"` (a name built from data, say) was normalised by aiohttp to `secret` and
    that key's value rendered; Consul itself redirects such a path to its cleaned form, and the
    redirect was followed. Now the path goes out as written, the redirect is refused, the key is
    served empty and said to be left out, and `--once` ends with the rest rendered."""
    put_key(tls_agent, "secret", "s3cret")
    put_key(tls_agent, "t/ok", "fine")
    template = tmp_path / "t.j2"
    template.write_text(
        '[{{ key_or_default("t/../secret", "none") }}] [{{ key_or_default("t/./secret", "none") }}] '
        '[{{ key_or_default("t//secret", "none") }}] [{{ key("t/ok") }}]\n'
    )
    dest = tmp_path / "out.txt"
    if protocol == "HTTP/2":
        consul = ["--consul-addr", f"https://127.0.0.1:{tls_agent.extra['https_port']}"]
        consul += ["--ca-file", str(tls_agent.extra["ca_file"])]
    else:
        consul = ["--consul-addr", str(tls_agent.extra["http_addr"])]
    proc = subprocess.run(
        renderer_command("run", "--once", *consul, "--template", f"{template}:{dest}", "--log-level", "warning"),
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == "[none] [none] [none] [fine]\n"
    assert "s3cret" not in proc.stderr + proc.stdout
    assert proc.stderr.count("not followed") >= 3 or "redirects its path" in proc.stderr, proc.stderr
