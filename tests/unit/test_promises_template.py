"""README promises about what templates see: `env()`'s allow-list, `nodes()` / `node(name)`, the
Jinja tests `valid_server`, `digit_string` and `contains`, and the routing map's lookup order.

Every template here is rendered by the real `TemplateRenderer` from data parsed by the real
dependencies (the boundary); only the DataSource is ours (a seam), as in test_template.py."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from renderer.config import Config, ConsulSettings, TemplateSpec
from renderer.haproxy.checked import DEFAULT_POLICY, AddressPolicy
from renderer.loop.templates import HostAddresses, compile_templates, host_addresses
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import CatalogNode, CatalogNodes, CatalogServices, HealthService

TOKEN = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


class Data:
    """Our own seam: a DataSource holding parsed values by dependency key."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, key: str) -> tuple[bool, Any]:
        return (key in self.values, self.values.get(key))


def render(
    tmp_path: Path,
    text: str,
    data: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    on_unsafe_value: str = "leave_out",
    policy: AddressPolicy = DEFAULT_POLICY,
    **variables: str,
) -> tuple[str | None, str | None]:
    """(content, error) of one render of `text`."""
    source = tmp_path / "t.j2"
    source.write_text(text)
    spec = TemplateSpec(source, tmp_path / "out", on_unsafe_value=on_unsafe_value)
    result = TemplateRenderer(spec, variables, environ=environ, policy=policy).render(Data(data or {}))
    return result.content, result.error


# -- env(): an allow-list, never a secret, never the Consul token ---------------------------------

ENVIRON = {
    "HOME": "/home/lb",
    "HOSTNAME": "lb1",
    "USER": "renderer",
    "LANG": "C.UTF-8",
    "TZ": "UTC",
    "HAPROXY_MAXCONN": "4000",
    "TEMPLATE_REGION": "eu-west",
    "PATH": "/usr/bin",
    "CONSUL_HTTP_ADDR": "127.0.0.1:8500",
    "CONSUL_HTTP_TOKEN": TOKEN,
    "CONSUL_HTTP_TOKEN_FILE": "/run/tokens/renderer",
    "HAPROXY_TOKEN": TOKEN,
    "HAPROXY_Consul_Token": TOKEN,
    "HAPROXY_SECRET": TOKEN,
    "TEMPLATE_DB_PASSWORD": TOKEN,
    "HAPROXY_PASSWD": TOKEN,
    "HAPROXY_API_KEY": TOKEN,
    "TEMPLATE_CREDENTIAL": TOKEN,
    "HAPROXY_STATS_AUTH": TOKEN,
    "HOMEDIR": "/elsewhere",
}


@pytest.mark.parametrize("name", ["HOME", "HOSTNAME", "USER", "LANG", "TZ", "HAPROXY_MAXCONN", "TEMPLATE_REGION"])
def test_env_shows_a_variable_on_the_allow_list(tmp_path: Path, name: str) -> None:
    content, error = render(tmp_path, f"{{{{ env('{name}') }}}}", environ=ENVIRON)
    assert (content, error) == (ENVIRON[name], None)


def test_env_gives_the_default_for_an_allowed_variable_that_is_not_set(tmp_path: Path) -> None:
    content, _ = render(tmp_path, "{{ env('HAPROXY_UNSET', 'fallback') }}|{{ env('TZ') }}", environ={})
    assert content == "fallback|"


@pytest.mark.parametrize(
    "name",
    [
        "CONSUL_HTTP_TOKEN",  # the Consul token itself
        "CONSUL_HTTP_TOKEN_FILE",
        "HAPROXY_TOKEN",  # on the allow-list's pattern, but a secret's name
        "HAPROXY_Consul_Token",  # in any case
        "HAPROXY_SECRET",
        "TEMPLATE_DB_PASSWORD",
        "HAPROXY_PASSWD",
        "HAPROXY_API_KEY",
        "TEMPLATE_CREDENTIAL",
        "HAPROXY_STATS_AUTH",
        "PATH",  # not on the allow-list
        "CONSUL_HTTP_ADDR",
        "HOMEDIR",  # HOME is allowed, not what starts with it
        "home",  # names are matched as written
        "HAPROXY_TOKEN\n",
    ],
)
def test_env_refuses_a_name_off_the_allow_list_or_holding_a_secret_word(tmp_path: Path, name: str) -> None:
    content, error = render(tmp_path, "{{ env(name, 'default') }}", environ=ENVIRON, name=name)
    assert content is None
    assert error is not None and "--var" in error  # the way to pass it instead
    assert TOKEN not in error


def test_env_never_shows_the_consul_token_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renderer builds its templates with the process's own environment (environ=None)."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    monkeypatch.setenv("HAPROXY_CONSUL_HTTP_TOKEN", TOKEN)
    for name in ("CONSUL_HTTP_TOKEN", "HAPROXY_CONSUL_HTTP_TOKEN"):
        content, error = render(tmp_path, f"{{{{ env('{name}') }}}}")
        assert content is None and error is not None and TOKEN not in error


def test_env_never_shows_the_token_copied_under_an_allowed_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator may copy the token into a variable on the allow-list (HAPROXY_X has no secret
    word in its name): the renderer, built from its config, refuses that value by what it is."""
    monkeypatch.setenv("HAPROXY_X", TOKEN)
    monkeypatch.setenv("HAPROXY_Y", "not-the-token")
    monkeypatch.setenv("TEMPLATE_URL", f"http://x/?token={TOKEN}")  # holding it counts too
    source = tmp_path / "t.j2"
    source.write_text("{{ env('HAPROXY_Y') }}")
    spec = TemplateSpec(source, tmp_path / "out")
    config = Config(templates=(spec,), consul=ConsulSettings(token=TOKEN))
    (state,) = compile_templates(config, {})
    assert state.renderer.render(Data({})).content == "not-the-token"
    for name in ("HAPROXY_X", "TEMPLATE_URL"):
        source.write_text(f"{{{{ env('{name}') }}}}")
        (state,) = compile_templates(config, {})
        result = state.renderer.render(Data({}))
        assert result.content is None and result.error is not None
        assert "Consul token" in result.error and TOKEN not in result.error
    padded = Config(templates=(spec,), consul=ConsulSettings(token=f" {TOKEN}\n"))  # as written in a flag
    (state,) = compile_templates(padded, {})
    assert state.renderer.render(Data({})).content is None


def test_the_load_balancer_host_s_own_addresses_are_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration at one of the host's own interface addresses reaches its services that listen
    on every address (the agent's 8500, HAProxy's stats) as loopback would: left out unless local
    addresses are allowed. Before, only loopback and the like were; the host's own IP passed."""
    nic = [  # as psutil lists them: IPv4, IPv6 (with its zone), the link layer's MAC
        SimpleNamespace(family=socket.AF_INET, address="203.0.113.9"),
        SimpleNamespace(family=socket.AF_INET6, address="2001:db8::9%eth0"),
        SimpleNamespace(family=psutil.AF_LINK, address="02:00:00:00:00:09"),
    ]
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {"eth0": nic})
    assert host_addresses() == frozenset({"203.0.113.9", "2001:db8::9"})
    source = tmp_path / "t.j2"
    source.write_text("{% for i in service('web') %}{{ i.endpoint }} {% endfor %}")
    spec = TemplateSpec(source, tmp_path / "out")
    addresses = ("203.0.113.9", "::ffff:203.0.113.9", "2001:db8:0::9", "203.0.113.10")
    entries = [instance(f"w{n}", address=address) for n, address in enumerate(addresses)]
    data = Data({HealthService("web").key: HealthService("web").parse(entries)})
    served = {}
    for local in (False, True):
        (state,) = compile_templates(Config(templates=(spec,), allow_local_addresses=local), {})
        served[local] = state.renderer.render(data)
    assert served[False].content == "203.0.113.10:80 "
    assert "an address of the load balancer host itself" in json.dumps(served[False].left_out)
    # each IP address in one spelling (helper-131: two spellings of one address made a reload each)
    assert served[True].content == "203.0.113.9:80 [::ffff:203.0.113.9]:80 [2001:db8::9]:80 203.0.113.10:80 "


def test_an_address_the_host_gains_while_running_is_refused_at_the_next_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The host's own addresses are read again while running (every 30 s, a timer of the loop): an
    address it gains (a VIP moved to it, DHCP) is refused from the next render, even where the data
    did not move (no kept block serves it); one it loses is served again. Before, they were read at
    start and at SIGHUP only. A failed read keeps the known addresses."""
    source = tmp_path / "t.j2"  # a kept block, as the shipped template's backends are
    source.write_text(
        "{% call cached('b', 'web') %}{% for i in service('web') %}{{ i.endpoint }} {% endfor %}{% endcall %}"
    )
    config = Config(templates=(TemplateSpec(source, tmp_path / "out"),))
    entries = [instance("w", address="203.0.113.9"), instance("v", address="203.0.113.10")]
    data = Data({HealthService("web").key: HealthService("web").parse(entries)})
    reads: list[frozenset[str] | OSError] = [frozenset({"10.9.9.9"})]

    def read() -> frozenset[str]:
        answer = reads[-1]
        if isinstance(answer, OSError):
            raise answer
        return answer

    with caplog.at_level(logging.INFO):
        host = HostAddresses.start(read)
    assert caplog.records == []  # the first read is no change (a line on stderr would break `--once` output)
    (state,) = compile_templates(config, {}, host.known)
    assert state.renderer.render(data).content == "203.0.113.10:80 203.0.113.9:80 "
    reads.append(frozenset({"10.9.9.9", "203.0.113.9"}))
    assert host.refresh() is True
    host.apply([state])
    assert state.renderer.render(data).content == "203.0.113.10:80 "
    reads.append(OSError("no netlink"))
    assert host.refresh() is False and "203.0.113.9" in host.known
    reads.append(frozenset({"10.9.9.9"}))
    assert host.refresh() is True
    host.apply([state])
    assert state.renderer.render(data).content == "203.0.113.10:80 203.0.113.9:80 "
    assert host.refresh() is False and host.due_at() == host.checked_at + 30.0


def test_the_loop_s_templates_serve_the_addresses_the_config_allows(tmp_path: Path) -> None:
    """allow_local_addresses / allow_host_names reach every compiled template."""
    source = tmp_path / "t.j2"
    source.write_text("{% for i in service('web') %}{{ i.endpoint }} {% endfor %}")
    spec = TemplateSpec(source, tmp_path / "out")
    entries = [instance("lo", address="127.0.0.1"), instance("named", address="web-1.example.internal")]
    data = Data({HealthService("web").key: HealthService("web").parse(entries)})
    served = {}
    for local, names in ((False, False), (True, False), (False, True), (True, True)):
        config = Config(templates=(spec,), allow_local_addresses=local, allow_host_names=names)
        (state,) = compile_templates(config, {})
        assert (state.renderer.policy.local, state.renderer.policy.names) == (local, names)
        served[local, names] = state.renderer.render(data).content
    assert served == {
        (False, False): "",
        (True, False): "127.0.0.1:80 ",
        (False, True): "web-1.example.internal:80 ",
        (True, True): "127.0.0.1:80 web-1.example.internal:80 ",
    }


# -- nodes() / node(name): catalog nodes / one node with its services ------------------------------

NODES_ANSWER = [  # /v1/catalog/nodes, in Consul's order (not sorted)
    {"Node": "web-2", "Address": "10.0.0.12", "Datacenter": "dc1", "Meta": {"rack": "r2"}},
    {"Node": "lb-1", "Address": "10.0.0.2", "Datacenter": "dc1", "Meta": {}},
    {"Node": "web-1", "Address": "10.0.0.11", "Datacenter": "dc2", "Meta": {"rack": "r1"}},
]
NODE_ANSWER = {  # /v1/catalog/node/web-1
    "Node": {"Node": "web-1", "Address": "10.0.0.11", "Datacenter": "dc2", "Meta": {"rack": "r1"}},
    "Services": {
        "web-b": {"ID": "web-b", "Service": "web", "Address": "", "Port": 8081, "Tags": ["lb", "canary"]},
        "api-a": {"ID": "api-a", "Service": "api", "Address": "10.0.1.5", "Port": 9000, "Tags": []},
    },
}


def test_nodes_lists_the_catalogs_nodes_sorted_by_name(tmp_path: Path) -> None:
    data = {CatalogNodes().key: CatalogNodes().parse(NODES_ANSWER)}
    text = (
        "{% for n in nodes() %}{{ n.name }} {{ n.address }} {{ n.datacenter }} "
        "{{ n.meta.rack | default('-') }}\n{% endfor %}"
    )
    content, error = render(tmp_path, text, data)
    assert error is None
    assert content == "lb-1 10.0.0.2 dc1 -\nweb-1 10.0.0.11 dc2 r1\nweb-2 10.0.0.12 dc1 r2\n"


def test_node_gives_one_node_with_its_services(tmp_path: Path) -> None:
    data = {CatalogNode("web-1").key: CatalogNode("web-1").parse(NODE_ANSWER)}
    text = (
        "{% set n = node('web-1') %}{{ n.node.name }} {{ n.node.address }}\n"
        "{% for id, s in n.services.items() %}{{ id }} {{ s.name }} {{ s.address }}:{{ s.port }} "
        "{{ s.tags | join(',') }}\n{% endfor %}"
    )
    content, error = render(tmp_path, text, data)
    assert error is None
    # services by id; a service without its own address has its node's; tags sorted
    assert content == "web-1 10.0.0.11\napi-a api 10.0.1.5:9000 \nweb-b web 10.0.0.11:8081 canary,lb\n"


def test_node_of_a_name_the_catalog_does_not_know_is_none(tmp_path: Path) -> None:
    data = {CatalogNode("gone").key: CatalogNode("gone").parse(None)}  # Consul answers 404
    assert render(tmp_path, "{{ node('gone') is none }}", data) == ("True", None)


def test_nodes_and_node_wait_for_their_data_and_name_their_keys(tmp_path: Path) -> None:
    source = tmp_path / "t.j2"
    source.write_text("{{ nodes() | length }} {{ node('web-1') }}")
    result = TemplateRenderer(TemplateSpec(source, tmp_path / "out"), {}, environ={}).render(Data({}))
    assert result.content is None
    assert result.missing == ("catalog.nodes", "catalog.node(web-1)")


def test_a_node_value_with_a_newline_never_reaches_the_output_and_the_rest_is_served(tmp_path: Path) -> None:
    """Contained to the node: before, the render failed as a whole (the value reached `_finalize`)."""
    hostile = [*NODES_ANSWER, {"Node": "evil\nbackend injected", "Address": "10.0.0.9", "Datacenter": "dc1"}]
    data = {CatalogNodes().key: CatalogNodes().parse(hostile)}
    content, left_out = render_left_out(tmp_path, "{% for n in nodes() %}{{ n.name }}\n{% endfor %}", data)
    assert content == "lb-1\nweb-1\nweb-2\n"
    assert "node 'evil\\nbackend injected', field Node: character '\\n'" in left_out
    node = {"Node": {"Node": "web-1", "Address": "10.0.0.11", "Meta": {"rack": "r1\nbackend x"}}, "Services": {}}
    data = {CatalogNode("web-1").key: CatalogNode("web-1").parse(node)}
    content, left_out = render_left_out(tmp_path, "{{ node('web-1') is none }}", data)
    assert content == "True" and "node 'web-1', field Meta[rack]: character '\\n'" in left_out


def render_left_out(
    tmp_path: Path, text: str, data: dict[str, Any], policy: AddressPolicy = DEFAULT_POLICY
) -> tuple[str, str]:
    """(content, what was left out, as one text) of one render of `text`."""
    source = tmp_path / "t.j2"
    source.write_text(text)
    result = TemplateRenderer(TemplateSpec(source, tmp_path / "out"), {}, environ={}, policy=policy).render(Data(data))
    assert result.error is None and result.content is not None
    return result.content, "\n".join(result.left_out)


def test_nodes_leave_out_an_address_a_server_cannot_have_or_the_policy_refuses(tmp_path: Path) -> None:
    """A custom template may write `server {{ n.name }} {{ n.address }}:8500`: a node address that
    is not an address ("10.0.0.9 backup" would add a keyword) or that the address policy refuses
    (loopback, the metadata service) is left out and reported. Before, nodes() gave them all."""
    answer = [
        *NODES_ANSWER,
        {"Node": "spaced", "Address": "10.0.0.9 backup", "Datacenter": "dc1"},
        {"Node": "lo", "Address": "127.0.0.1", "Datacenter": "dc1"},
        {"Node": "meta", "Address": "169.254.169.254", "Datacenter": "dc1"},
    ]
    data = {CatalogNodes().key: CatalogNodes().parse(answer)}
    text = "{% for n in nodes() %}{{ n.name }} {% endfor %}"
    content, left_out = render_left_out(tmp_path, text, data, DEFAULT_POLICY)
    assert content == "lb-1 web-1 web-2 "
    assert "node 'spaced', field Address: '10.0.0.9 backup' is not an IPv4 or IPv6 address" in left_out
    assert "node 'lo', field Address: '127.0.0.1' is refused" in left_out and "allow_local_addresses" in left_out
    assert "node 'meta', field Address: '169.254.169.254' is refused" in left_out
    content, left_out = render_left_out(tmp_path, text, data, AddressPolicy(local=True))
    assert content == "lb-1 lo meta web-1 web-2 " and "spaced" in left_out


def test_node_leaves_out_a_service_the_checks_refuse_alone(tmp_path: Path) -> None:
    """Each service of node(name) is checked as service() checks an instance: a bad address, port
    or a control character in any of its strings leaves that service out, reported, and no other."""
    hostile = dict(NODE_ANSWER["Services"])
    hostile["inj"] = {"ID": "inj", "Service": "web", "Address": "10.0.1.6 disabled", "Port": 80}
    hostile["lo"] = {"ID": "lo", "Service": "web", "Address": "127.0.0.1", "Port": 80}
    hostile["bad-port"] = {"ID": "bad-port", "Service": "web", "Address": "10.0.1.7", "Port": "80 backup"}
    hostile["tag"] = {"ID": "tag", "Service": "web", "Address": "10.0.1.8", "Port": 80, "Tags": ["a\nb"]}
    hostile["none"] = {"ID": "none", "Service": "consul-like", "Address": "10.0.1.9"}  # no port: listed
    data = {CatalogNode("web-1").key: CatalogNode("web-1").parse({**NODE_ANSWER, "Services": hostile})}
    text = "{% for id, s in node('web-1').services.items() %}{{ id }}={{ s.address }}:{{ s.port }} {% endfor %}"
    content, left_out = render_left_out(tmp_path, text, data)
    assert content == "api-a=10.0.1.5:9000 none=10.0.1.9:0 web-b=10.0.0.11:8081 "
    assert "service web, instance 'inj' on node 'web-1', field Address: '10.0.1.6 disabled' is not an IPv4" in left_out
    assert "instance 'lo' on node 'web-1', field Address: '127.0.0.1' is refused" in left_out
    assert "instance 'bad-port' on node 'web-1', field Port: port '80 backup' is not 1-65535" in left_out
    assert "instance 'tag' on node 'web-1', field Tags: character '\\n'" in left_out


def test_a_node_address_that_is_no_address_or_refused_is_given_as_none(tmp_path: Path) -> None:
    """An instance served at an address of its own whose node's Address is `10.0.0.9 backup` (or the
    metadata service): its `node_address`, which a template may write, is empty. Before, it was
    given as registered (only a control character was checked there)."""
    entries = []
    for sid, node_address in (("spaced", "10.0.0.9 backup"), ("meta", "169.254.169.254"), ("ok", "10.0.0.1")):
        entry = instance(sid, address="10.0.1.5")
        entry["Node"] = {"Node": f"n-{sid}", "Address": node_address}
        entries.append(entry)
    data = {HealthService("web").key: HealthService("web").parse(entries)}
    text = "{% for i in service('web') %}{{ i.id }}={{ i.endpoint }}/{{ i.node_address }} {% endfor %}"
    content, left_out = render_left_out(tmp_path, text, data)
    # Not reported: the instance is served whole (a dev agent's node is at 127.0.0.1, say)
    assert (content, left_out) == ("meta=10.0.1.5:80/ ok=10.0.1.5:80/10.0.0.1 spaced=10.0.1.5:80/ ", "")
    content, left_out = render_left_out(tmp_path, text, data, AddressPolicy(local=True))
    assert (content, left_out) == ("meta=10.0.1.5:80/169.254.169.254 ok=10.0.1.5:80/10.0.0.1 spaced=10.0.1.5:80/ ", "")


def test_node_whose_own_address_the_policy_refuses_still_gives_its_services(tmp_path: Path) -> None:
    """A node registered with a host name (refused by default) or a local address: its services with
    an address of their own are given; those reached at the node's address are left out. Before
    (f3c9b9e), node(name) was none and `node('web-1').services` failed the whole render."""
    for node_address in ("web-1.internal", "127.0.0.1"):
        answer = {**NODE_ANSWER, "Node": {"Node": "web-1", "Address": node_address}}
        data = {CatalogNode("web-1").key: CatalogNode("web-1").parse(answer)}
        text = (
            "{% set n = node('web-1') %}[{{ n.node.address }}] {% for id, s in n.services.items() %}"
            "{{ s.server_name }} {{ s.endpoint }} [{{ s.node_address }}] {% endfor %}"
        )
        content, left_out = render_left_out(tmp_path, text, data)
        assert content == "[] web-1_api-a 10.0.1.5:9000 [] "  # the refused address is given nowhere
        assert f"node 'web-1', field Address: '{node_address}' is refused" in left_out
        assert f"instance 'web-b' on node 'web-1', field Address: '{node_address}' is refused" in left_out
        content, left_out = render_left_out(tmp_path, text, data, AddressPolicy(local=True, names=True))
        expected = f"[{node_address}] web-1_api-a 10.0.1.5:9000 [{node_address}] web-1_web-b {node_address}:8081 "
        assert content == expected + f"[{node_address}] " and not left_out


# -- the Jinja tests: valid_server, digit_string, contains ----------------------------------------


def instance(
    sid: str, address: str = "10.0.1.1", port: Any = 80, tags: tuple[str, ...] = ("lb",), **meta: str
) -> dict[str, Any]:
    """One entry of /v1/health/service/web."""
    return {
        "Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1"},
        "Service": {"ID": sid, "Service": "web", "Address": address, "Port": port, "Tags": list(tags), "Meta": meta},
        "Checks": [{"Status": "passing"}],
    }


GOOD_INSTANCES = [
    instance("v4"),
    instance("v6", address="2001:db8::1"),
    instance("host", address="web-1.example.internal"),
    instance("weighted", weight="256", health_path="/ready"),
]
HOSTILE_INSTANCES = [
    instance("newline-address", address="10.0.1.1\nbackend x"),
    instance("space-address", address="10.0.1.1 backup"),
    instance("hash-address", address="web#1"),
    instance("unicode-address", address="wéb.example"),
    instance("long-address", address="a" * 300 + ".example"),
    instance("unspecified", address="0.0.0.0"),
    instance("zone-id", address="fe80::1%eth0"),
    instance("digits-only-host", address="127.1"),
    instance("port-zero", port=0),
    instance("port-too-big", port=65536),
    instance("weight-257", weight="257"),
    instance("weight-unicode", weight="٣"),
    instance("path-space", health_path="/a b"),
    instance("path-hash", health_path="/#x"),
    instance("id\nnewline"),
]


def test_valid_server_accepts_exactly_the_instances_that_passed_the_boundary(tmp_path: Path) -> None:
    """With `on_unsafe_value = "fail"`, service() keeps the refused instances: `valid_server` tells."""
    data = {HealthService("web").key: HealthService("web").parse(GOOD_INSTANCES + HOSTILE_INSTANCES)}
    text = "{% for i in service('web') %}{{ i is valid_server }} {% endfor %}"
    ids = [i.id for i in data[HealthService("web").key]]  # the render's order
    # A host name is a good server only where the address policy takes names.
    content, error = render(tmp_path, text, data, on_unsafe_value="fail", policy=AddressPolicy(names=True))
    assert error is None and content is not None
    verdicts = dict(zip(ids, content.split(), strict=True))
    good = {"v4", "v6", "host", "weighted"}
    assert {sid for sid, verdict in verdicts.items() if verdict == "True"} == good
    assert len(verdicts) == len(GOOD_INSTANCES) + len(HOSTILE_INSTANCES)


def test_valid_server_refuses_what_the_address_policy_refuses(tmp_path: Path) -> None:
    entries = [*GOOD_INSTANCES, instance("loopback", address="127.0.0.1")]
    data = {HealthService("web").key: HealthService("web").parse(entries)}
    text = "{% for i in service('web') %}{{ i.id }}={{ i is valid_server }} {% endfor %}"
    content, error = render(tmp_path, text, data, on_unsafe_value="fail")
    assert error is None and content is not None
    verdicts = dict(pair.split("=") for pair in content.split())
    assert {sid for sid, verdict in verdicts.items() if verdict == "True"} == {"v4", "v6", "weighted"}


def test_valid_server_refuses_what_is_not_a_checked_instance(tmp_path: Path) -> None:
    text = (
        "{{ '10.0.0.1:80' is valid_server }} {{ {'endpoint': '10.0.0.1:80'} is valid_server }} "
        "{{ none is valid_server }}"
    )
    assert render(tmp_path, text) == ("False False False", None)


@pytest.mark.parametrize("value", ["0", "7", "0042", "65535", "1" * 10_000])
def test_digit_string_accepts_ascii_digits_only(tmp_path: Path, value: str) -> None:
    assert render(tmp_path, "{{ v is digit_string }}", v=value) == ("True", None)


@pytest.mark.parametrize(
    "value",
    [
        "",
        " 1",
        "1 ",
        "1\n",
        "\n1",
        "1\r",
        "1\x00",
        "1#",
        "#1",
        "-1",
        "+1",
        "1.0",
        "1e3",
        "0x1f",
        "١٢٣",  # Arabic-Indic digits: str.isdigit() is true for them
        "²",  # superscript two: isdigit() too
        "１２",  # fullwidth digits
        "1" * 10_000 + "a",
        "1" * 10_000 + "\n",
    ],
)
def test_digit_string_refuses_everything_else(tmp_path: Path, value: str) -> None:
    assert render(tmp_path, "{{ v is digit_string }}", v=value) == ("False", None)


def test_contains_is_exact_membership_in_tags_and_meta(tmp_path: Path) -> None:
    hostile_tags = ("lb\n", " lb", "lb ", "LB", "lЬ", "l#b", "x" * 10_000)  # `lЬ`: a Cyrillic soft sign
    entries = [instance("plain", tags=("lb", "x"), weight="5"), instance("hostile", tags=hostile_tags)]
    data = {HealthService("web").key: HealthService("web").parse(entries)}
    # With "fail", service() keeps the hostile instance (its "lb\n" tag), so the test sees its tags.
    text = (
        "{% for i in service('web') %}{{ i.id }}:{{ i.tags is contains('lb') }},"
        "{{ i.tags is contains('x' * 10000) }},{{ i.meta is contains('weight') }} {% endfor %}"
    )
    content, error = render(tmp_path, text, data, on_unsafe_value="fail")
    assert error is None
    assert content == "hostile:False,True,False plain:True,False,True "
    assert render(tmp_path, "{{ ['a', 'b'] is contains('a') }}{{ ['a', 'b'] is contains('c') }}") == (
        "TrueFalse",
        None,
    )


# -- the routing map: the whole host, then its first label, then the first path segment ----------


def shipped(tmp_path: Path, template: Path, variables: dict[str, str]) -> list[str]:
    names = {"web": ["lb"], "api": ["lb"], "Shop": ["lb"], "db": []}
    data = {CatalogServices().key: CatalogServices().parse(names)} | {HealthService(n).key: () for n in names}
    spec = TemplateSpec(template, tmp_path / template.stem)
    content = TemplateRenderer(spec, variables, environ={}).render(Data(data)).content
    assert content is not None
    return content.splitlines()


def test_the_routing_map_looks_up_the_host_then_its_first_label_then_the_first_path_segment(tmp_path: Path) -> None:
    from lab.stack import DEFAULT_TEMPLATE

    lines = [line.strip() for line in shipped(tmp_path, DEFAULT_TEMPLATE, {"routes_map": "/etc/haproxy/routes.map"})]
    lookups = [line for line in lines if "map(/etc/haproxy/routes.map)" in line]
    assert lookups == [
        "http-request set-var(txn.route) req.hdr(host),field(1,:),lower,map(/etc/haproxy/routes.map) if !by_address",
        "http-request set-var(txn.route) req.hdr(host),field(1,:),lower,field(1,.),map(/etc/haproxy/routes.map)"
        " if !{ var(txn.route) -m found } !by_address",
        "http-request set-var(txn.route) path,field(2,/),lower,map(/etc/haproxy/routes.map)"
        " if !{ var(txn.route) -m found }",
    ]
    route = lines.index(lookups[-1])
    assert lines[route + 1] == "use_backend %[var(txn.route)] if { var(txn.route) -m found }"
    assert not [line for line in lines if line.startswith("acl host_")]  # one lookup, not three ACLs per service


def test_the_routing_map_has_one_lower_case_key_per_http_service_naming_its_backend(tmp_path: Path) -> None:
    from lab.stack import DEFAULT_TEMPLATE, ROUTES_TEMPLATE

    entries = shipped(tmp_path, ROUTES_TEMPLATE, {})[1:]
    assert entries == ["api api", "shop Shop", "web web"]
    backends = {line.split()[1] for line in shipped(tmp_path, DEFAULT_TEMPLATE, {}) if line.startswith("backend ")}
    assert {entry.split()[1] for entry in entries} <= backends  # every route names a backend of the config


def test_a_flood_of_ignored_settings_brings_a_bounded_number_of_notes(tmp_path: Path) -> None:
    """400 instances with 64 `haproxy_*` meta values each that no setting takes (Consul's limit of
    meta keys): 3 notes an instance plus one counting the rest, not 64. Before, 25,600 notes were
    deduplicated by scanning a list: 23 s for the first render, 8.6 s for each next one, the event
    loop stopped meanwhile (a review's measurement; no timed assertion here, the count is the cause)."""
    bogus = {f"haproxy_x{n}": "v" for n in range(64)}
    entries = [instance(f"i{n:03}", address=f"10.0.{n // 200}.{n % 200 + 1}", **bogus) for n in range(400)]
    data = Data({HealthService("web").key: HealthService("web").parse(entries)})
    source = tmp_path / "t.j2"
    source.write_text("{% call cached('b') %}{% set s = settings(service('web')) %}x{% endcall %}")
    renderer = TemplateRenderer(TemplateSpec(source, tmp_path / "out"), {}, environ={})
    for _ in range(2):  # the second render reuses the kept block and its notes
        result = renderer.render(data)
        assert result.error is None and len(result.left_out) == 400 * 4
    assert "service web, instance 'i000' on node 'n1': 61 more haproxy_* meta values ignored" in result.left_out
