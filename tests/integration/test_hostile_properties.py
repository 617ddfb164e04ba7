"""Property: whatever the catalog holds, the rendered file passes the real `haproxy -c` (or the
instance is named and left out), and every Runtime API command matches the grammar.

300 examples in `make test`; HOSTILE_EXAMPLES=10000 for the long run.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.stack import DEFAULT_TEMPLATE
from renderer.config import TemplateSpec
from renderer.deliver.quarantine import MAX_ROUNDS, LeftOut, repair
from renderer.deliver.runtime import change_commands, plan_runtime
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import CatalogServices, HealthService

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "300"))
# A command word: only what runtime_grammar lets through; one space between words.
COMMAND = re.compile(r"[A-Za-z0-9._:/@+,=%\[\]-]+( [A-Za-z0-9._:/@+,=%\[\]-]+)*")

hostile_chars = [*"ab-_.:/ #;\"'\\%@$`{}[]~!?\t\u00a0\u2028\u0663\uff18", "\n", "\r", "\x00"]
nasty = (
    st.text(alphabet=st.sampled_from(hostile_chars), max_size=10)
    | st.text(max_size=8)
    | st.sampled_from(["web", "api", "stats", "http", "web_1", "web~1", "x", "api!", "api?", "a" * 300])
)
addresses = nasty | st.sampled_from(
    [
        "10.0.0.1", "::1", "fe80::1", "2001:db8::1", "fe80::1%eth0", 'fe80::1%x";@1 disable frontend http;"',
        'fe80::1%a"', "host.example", "-bad.example", "10.0.0.1 backup", "1.2.3.4;", "",
    ]
)  # fmt: skip
meta_values = st.dictionaries(
    st.sampled_from(["weight", "health_path", "other", "weight "]),
    nasty | st.sampled_from(["0", "256", "257", "-1", "٣", "８", "/health", "/x'", "/a b", "/ok/path"]),
    max_size=3,
)
instance = st.fixed_dictionaries(
    {
        "node": nasty,
        "id": nasty,
        "address": addresses,
        "port": st.integers(min_value=-2, max_value=70000) | st.sampled_from([0, 1, 65535, 65536, 10**12]),
        "tags": st.lists(nasty, max_size=2),
        "meta": meta_values,
    }
)
catalog = st.dictionaries(
    nasty | st.sampled_from(["web", "api", "stats"]),
    st.lists(instance, max_size=3, unique_by=lambda i: (i["node"], i["id"])),  # Consul: one ID per node
    min_size=1,
    max_size=3,
)


class Data:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, key: str) -> tuple[bool, Any]:
        return key in self.values, self.values.get(key)


def entries(name: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "Node": {"Node": i["node"], "Address": "10.9.9.9"},
            "Service": {"ID": i["id"], "Service": name, "Address": i["address"], "Port": i["port"],
                        "Tags": i["tags"], "Meta": i["meta"]},
            "Checks": [{"Status": "passing"}],
        }
        for i in items
    ]  # fmt: skip


def render(services: dict[str, list[dict[str, Any]]], tmp: Path) -> Any:
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({n: ["lb"] for n in services})}
    for name in {*services, "web"}:
        values[HealthService(name).key] = HealthService(name).parse(entries(name, services.get(name, [])))
    variables = {"http_port": "18080", "stats_port": "19936", "bind_address": "127.0.0.1"}
    return TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, tmp / "haproxy.cfg"), variables).render(Data(values))


def checked_as_delivery_does(content: str, path: Path, haproxy_bin: str) -> tuple[str, list[LeftOut]]:
    """The real `haproxy -c`, and what delivery leaves out when it names a part (quarantine)."""
    left_out: list[LeftOut] = []
    for _ in range(MAX_ROUNDS + 1):
        path.write_text(content)
        check = subprocess.run([haproxy_bin, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
        if check.returncode == 0:
            return content, left_out
        repaired = repair(content, check.stdout + check.stderr, None)
        assert repaired is not None, f"{check.stderr}\n---\n{content}"
        content, parts = repaired
        left_out += parts
    raise AssertionError(f"still rejected after {MAX_ROUNDS} rounds:\n{content}")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(services=catalog)
def test_any_catalog_renders_a_file_haproxy_accepts_and_commands_in_grammar(
    services: dict[str, list[dict[str, Any]]], tmp_path: Path, haproxy_bin: str
) -> None:
    result = render(services, tmp_path)
    assert result.content is not None, result.error  # never a failed render: left out instead
    content, repaired = checked_as_delivery_does(result.content, tmp_path / "haproxy.cfg", haproxy_bin)
    # Only a server line may be left out at that stage (a host name HAProxy cannot resolve now).
    assert all(part.text.lstrip().startswith("server ") for part in repaired), repaired
    served = sum(1 for line in content.splitlines() if line.strip().startswith("server ")) + len(repaired)
    dropped = {name for name in services if any(x.startswith(f"service {name!r}: ") for x in result.left_out)}
    total = sum(len(items) for name, items in services.items() if name not in dropped)  # those: reported whole
    # Every instance is served or named as left out (an unhealthy one is neither: all are passing here).
    assert served + sum(1 for x in result.left_out if ", instance " in x) >= total
    empty = render({name: [] for name in services}, tmp_path)
    assert empty.content is not None
    plan = plan_runtime(empty.content, content)
    for change in plan or []:
        for command in change_commands(change):
            assert COMMAND.fullmatch(command), command
