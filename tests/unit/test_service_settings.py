"""Per-service settings from meta `haproxy_<key>`: checked, agreed by every instance, visible in the
file; an invalid or disputed value keeps the default and is reported. TCP services get a listener."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from lab.stack import DEFAULT_TEMPLATE, ROUTES_TEMPLATE
from renderer.config import CONSUL_PORTS, Config, ConsulSettings, TemplateSpec
from renderer.deliver.quarantine import duplicate_binds
from renderer.haproxy.checked import setting_problem
from renderer.render.flaps import HOLD_TURN_S, MAX_UNBACKED, UNBACKED_MAX_WAIT_S
from renderer.render.template import RenderResult, TemplateRenderer
from renderer.source.dependency import CatalogServices, HealthService

VARIABLES = {"http_port": "18080", "stats_port": "19936", "bind_address": "127.0.0.1"}


class Data:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, key: str) -> tuple[bool, Any]:
        return key in self.values, self.values.get(key)


def instance(name: str, sid: str, port: int = 8080, **meta: str) -> dict[str, Any]:
    return {
        "Node": {"Node": "n1", "Address": "10.0.0.1"},
        "Service": {"ID": sid, "Service": name, "Address": "10.0.1.1", "Port": port, "Meta": meta},
        "Checks": [],
    }


def render(services: dict[str, list[dict[str, Any]]], template: Path = DEFAULT_TEMPLATE) -> Any:
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({n: ["lb"] for n in services})}
    for name in {*services, "web"}:
        values[HealthService(name).key] = HealthService(name).parse(services.get(name, []))
    return TemplateRenderer(TemplateSpec(template, Path("/tmp/unused")), VARIABLES).render(Data(values))


@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        ("balance", "leastconn", "    balance leastconn\n"),
        ("timeout_server", "45s", "    timeout server 45s\n"),
        ("timeout_connect", "500ms", "    timeout connect 500ms\n"),
        ("check_path", "/ready", "    option httpchk GET /ready\n"),
        ("check_status", "204", "    http-check expect status 204\n"),
        ("sticky", "true", "    cookie SERVERID insert indirect nocache\n"),
        ("slowstart", "30s", "    default-server slowstart 30s\n"),
        ("maxconn", "50", "    default-server maxconn 50\n"),
    ],
)
def test_each_setting_reaches_its_backend_when_every_instance_agrees(key: str, value: str, line: str) -> None:
    meta = {f"haproxy_{key}": value}
    result = render({"api": [instance("api", "a1", **meta), instance("api", "a2", 8081, **meta)]})
    assert result.content is not None and line in result.content, result.content
    assert result.left_out == ()
    if key == "sticky":
        assert "server n1_a1 10.0.1.1:8080 check cookie n1_a1\n" in result.content


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("balance", "fastest"), ("balance", "roundrobin\n"), ("balance", "static-rr"), ("timeout_server", "5 s"),
        ("timeout_server", "1y"),
        ("check_path", "/x'"), ("check_status", "20"), ("check_status", "٢٠٠"), ("sticky", "yes"),
        ("slowstart", "-1s"), ("maxconn", "0"), ("maxconn", "100001"), ("mode", "udp"), ("port", "70000"),
        ("unknown", "x"),
    ],
)  # fmt: skip
def test_an_invalid_value_keeps_the_default_and_is_reported(key: str, value: str) -> None:
    result = render({"api": [instance("api", "a1", **{f"haproxy_{key}": value})]})
    assert result.content is not None and setting_problem(key, value) is not None
    assert any(f"Meta[haproxy_{key}]" in note for note in result.left_out), result.left_out
    if "\n" in value:  # a control character leaves the whole instance out (never near the file)
        assert "server n1_a1" not in result.content
    else:
        assert "backend api\n    balance roundrobin\n    option httpchk GET /health\n    server n1_a1" in result.content


def test_source_balance_hashes_consistently_so_its_servers_change_through_the_runtime_api() -> None:
    """helper-130 (/tmp/rev76): `balance source` alone is a static hash: HAProxy refuses `add
    server` there, and each flip of an instance's health reloaded it. With `hash-type consistent`
    (HTTP backend and TCP listener alike) servers come and go through the Runtime API."""
    meta = {"haproxy_balance": "source"}
    tcp = {**meta, "haproxy_mode": "tcp", "haproxy_port": "15432"}
    result = render({"api": [instance("api", "a1", **meta)], "db": [instance("db", "d1", 5432, **tcp)]})
    assert result.content is not None and result.left_out == ()
    assert "backend api\n    balance source\n    hash-type consistent\n" in result.content
    assert "    bind 127.0.0.1:15432\n    balance source\n    hash-type consistent\n" in result.content
    assert "static-rr" in (setting_problem("balance", "static-rr") or "") and "Runtime API" in (
        setting_problem("balance", "static-rr") or ""
    )


def test_instances_that_disagree_keep_the_default_and_are_reported() -> None:
    result = render({"api": [instance("api", "a1", **{"haproxy_balance": "first"}), instance("api", "a2", 8081)]})
    assert result.content is not None and "    balance roundrobin\n" in result.content
    assert any("instances disagree on meta haproxy_balance" in note for note in result.left_out)


def test_a_tcp_service_gets_its_own_listener_and_no_http_route() -> None:
    meta = {"haproxy_mode": "tcp", "haproxy_port": "15432"}
    services = {"db": [instance("db", "d1", 5432, **meta)], "web": [instance("web", "w1")]}
    result = render(services)
    assert result.content is not None
    assert "listen db\n    # TCP service" in result.content
    assert "    mode tcp\n" in result.content and "    bind 127.0.0.1:15432\n" in result.content
    assert "    balance leastconn\n" in result.content and "server n1_d1 10.0.1.1:5432 check" in result.content
    assert "acl host_db" not in result.content and "acl host_web" in result.content
    routes = render(services, ROUTES_TEMPLATE)
    assert routes.content is not None and "db db" not in routes.content and "web web" in routes.content


def test_a_tcp_service_on_a_port_already_bound_is_left_out() -> None:
    grab = {"haproxy_mode": "tcp", "haproxy_port": "18080"}  # the frontend's own port
    twice = {"haproxy_mode": "tcp", "haproxy_port": "15000"}
    result = render(
        {
            "a-grab": [instance("a-grab", "g1", **grab)],
            "b-one": [instance("b-one", "o1", **twice)],
            "c-two": [instance("c-two", "t1", **twice)],
        }
    )
    assert result.content is not None
    content, clashes = duplicate_binds(result.content)
    assert [c.section for c in clashes] == ["listen a-grab", "listen c-two"]
    assert "port 18080 is already bound by frontend http" in clashes[0].describe()
    assert "listen b-one" in content and "listen c-two" not in content and "listen a-grab" not in content
    assert duplicate_binds(content) == (content, [])


def test_every_checked_setting_is_a_field_of_the_template_settings() -> None:
    from dataclasses import fields

    from renderer.haproxy.checked import SETTINGS
    from renderer.render.template import ServiceSettings

    assert {f.name for f in fields(ServiceSettings)} == set(SETTINGS)


def test_a_tcp_service_on_the_stats_port_never_takes_the_stats_section_s_place() -> None:
    grab = {"haproxy_mode": "tcp", "haproxy_port": "19936"}  # VARIABLES' stats_port
    result = render({"evil": [instance("evil", "e1", **grab)]})
    assert result.content is not None
    content, clashes = duplicate_binds(result.content)
    assert [c.section for c in clashes] == ["listen evil"]
    assert "listen stats\n" in content and "listen evil" not in content


def test_a_rolling_change_keeps_the_last_agreed_value_until_every_instance_agrees() -> None:
    """Instances that disagree never flip the backend back to the default: the value every
    instance last agreed on holds (and the disagreement is reported) until they agree again."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)

    def backend(*balances: str | None) -> tuple[str, tuple[str, ...]]:
        metas = [{"haproxy_balance": b} if b else {} for b in balances]
        entries = [instance("api", f"a{n}", 8080 + n, **meta) for n, meta in enumerate(metas)]
        values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"api": ["lb"]})}
        values[HealthService("api").key] = HealthService("api").parse(entries)
        values[HealthService("web").key] = HealthService("web").parse([])
        result = renderer.render(Data(values))
        assert result.content is not None
        return result.content.split("backend api\n")[1].splitlines()[0], result.left_out

    assert backend("leastconn", "leastconn") == ("    balance leastconn", ())
    line, notes = backend("first", "leastconn")  # the rollout begins
    assert line == "    balance leastconn"
    assert any("instances disagree on meta haproxy_balance" in n and "'leastconn'" in n for n in notes), notes
    assert backend("first", "first") == ("    balance first", ())  # done: every instance agrees
    assert backend("first", "leastconn")[0] == "    balance first"  # and a rollback holds it too
    assert backend(None, None) == ("    balance roundrobin", ())  # nobody asks: the default
    assert backend("first", None)[0] == "    balance roundrobin"  # nothing agreed since: the default


def entry(sid: str, port: int, status: str = "passing", tags: tuple[str, ...] = (), **meta: str) -> dict[str, Any]:
    found = instance("api", sid, port, **meta)
    found["Service"]["Tags"] = list(tags)
    found["Checks"] = [{"CheckID": "c", "Status": status, "ServiceID": sid}]
    return found


def api_backend(renderer: TemplateRenderer, entries: list[dict[str, Any]]) -> list[str]:
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"api": ["lb"]})}
    values[HealthService("api").key] = HealthService("api").parse(entries)
    values[HealthService("web").key] = HealthService("web").parse([])
    content = renderer.render(Data(values)).content
    assert content is not None
    begins = max(content.find("\nbackend api\n"), content.find("\nlisten api\n"))
    assert begins >= 0, content
    return content[begins + 1 :].split("\n\n")[0].splitlines()


def test_one_instance_passing_alone_never_sets_the_settings_of_the_instances_registered_beside_it() -> None:
    """An attacker's review (/tmp/rev16): an instance of `api` asking `haproxy_check_status 418`,
    the only one passing for a moment (the others critical, a redeploy), agreed with itself; its
    value then held as the last agreed one once the others passed again, so HAProxy marked them down
    and sent all of `api` to it. A value becomes the last agreed one only when every instance
    registered (whatever its health) carries it."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    evil = entry("evil", 9000, haproxy_check_status="418", haproxy_balance="first")
    for status in ("passing", "critical", "passing"):
        lines = api_backend(renderer, [entry("a0", 8080, status), entry("a1", 8081, status), evil])
    assert "    balance roundrobin" in lines and not any("418" in line for line in lines), lines
    assert "    server n1_a0 10.0.1.1:8080 check" in lines and "    server n1_evil 10.0.1.1:9000 check" in lines


def test_no_instance_that_is_never_served_vetoes_what_the_served_ones_agree_on() -> None:
    """The next review (/tmp/rev18) of a first fix that made every registered instance vote: one
    critical registration pointing nowhere held a rolling change back for good, and a restart beside
    it (or beside an instance left out for a tab in a tag) turned a TCP service into an HTTP one."""
    fresh = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    api_backend(fresh, [entry("a0", 8080, haproxy_balance="leastconn"), entry("a1", 8081, haproxy_balance="leastconn")])
    rolled = [entry("a0", 8080, haproxy_balance="first"), entry("a1", 8081, haproxy_balance="first")]
    for never_served in (entry("evil", 9, "critical"), entry("evil", 9, "critical", tags=("x\ty",))):
        assert "    balance first" in api_backend(fresh, [*rolled, never_served])
    tcp = {"haproxy_mode": "tcp", "haproxy_port": "15432"}
    for never_served in (entry("evil", 9, "critical"), entry("a2", 8082, tags=("build\t7",), **tcp)):
        restarted = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
        lines = api_backend(restarted, [entry("a0", 8080, **tcp), entry("a1", 8081, **tcp), never_served])
        assert lines[0] == "listen api", lines


def test_one_critical_registration_does_not_keep_a_value_the_owners_left_remembered() -> None:
    """The next review (/tmp/rev20): with every registered instance having to carry a value before
    it was remembered, one critical registration without it kept the owners' old port remembered;
    at their next rolling change the listener went back to it. Most of them carrying it is enough."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)

    def tcp(port: str) -> dict[str, str]:
        return {"haproxy_mode": "tcp", "haproxy_port": port}

    evil = entry("evil", 9, "critical", **tcp("15432"))
    assert "    bind 127.0.0.1:15432" in api_backend(renderer, [entry("a0", 8080, **tcp("15432")), evil])
    moved = [entry("a0", 8080, **tcp("15433")), entry("a1", 8081, **tcp("15433"))]
    assert "    bind 127.0.0.1:15433" in api_backend(renderer, [*moved, evil])
    rolling = [entry("a0", 8080, **tcp("15434")), entry("a1", 8081, **tcp("15433"))]
    assert "    bind 127.0.0.1:15433" in api_backend(renderer, [*rolling, evil])  # not back to 15432


def test_critical_registrations_carrying_a_value_do_not_vote_it_in() -> None:
    """The next review (/tmp/rev22): with most registrations carrying a value enough, an attacker
    with one passing instance and four critical dummies, all asking `haproxy_check_status 418`, was
    the majority while the owners redeployed; 418 was remembered and, once the owners passed again
    and disagreed with it, applied to all of them. Only served instances carrying it count."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    evil = [entry("evil", 9000, haproxy_check_status="418")]
    evil += [entry(f"dummy{n}", 9100 + n, "critical", haproxy_check_status="418") for n in range(4)]
    owners = [entry(f"a{n}", 8080 + n) for n in range(3)]
    api_backend(renderer, [entry(f"a{n}", 8080 + n, "critical") for n in range(3)] + evil)  # the redeploy
    lines = api_backend(renderer, owners + evil)  # the owners pass again
    assert not any("418" in line for line in lines), lines


def test_the_default_service_stays_an_http_backend_whatever_its_instances_ask() -> None:
    """Its instances asking for TCP on the frontend's port made it a `listen` that the port clash
    then left out, and the frontend's `default_backend web` named nothing (a review's finding)."""
    result = render({"web": [instance("web", "w1", haproxy_mode="tcp", haproxy_port="18080")]})
    assert result.content is not None
    assert "\nbackend web\n" in result.content and "listen web" not in result.content
    assert "    bind 127.0.0.1:18080\n" in result.content  # the frontend's, alone
    assert result.content.count("bind 127.0.0.1:18080") == 1


def test_a_port_outside_tcp_ports_publishes_no_listener() -> None:
    """haproxy_port 22 (or 25, 443) would open that port on every load balancer; HAProxy as
    non-root could not bind it and each reload would fail (a review's finding). Outside tcp_ports
    (by default 1024-65535), the service is an HTTP backend and the port is reported."""
    services = {"sshd": [instance("sshd", "s1", haproxy_mode="tcp", haproxy_port="22")]}
    result = render(services)
    assert result.content is not None and "\nbackend sshd\n" in result.content and ":22\n" not in result.content
    assert any("meta haproxy_port 22 is outside tcp_ports (1024-65535)" in note for note in result.left_out)
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"sshd": ["lb"]})}
    for name in ("sshd", "web"):
        values[HealthService(name).key] = HealthService(name).parse(services.get(name, []))
    wide = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES, tcp_ports=((1, 65535),))
    content = wide.render(Data(values)).content
    assert content is not None and "listen sshd" in content and "    bind 127.0.0.1:22\n" in content


@pytest.mark.parametrize("port", sorted(CONSUL_PORTS))
def test_a_listener_on_consuls_ports_is_never_published_whatever_tcp_ports_says(port: int) -> None:
    """helper-142 (/tmp/rev88, test_rev88_agent_port.py): a registration asking for the local
    agent's HTTP port was left out while the agent held it, tried again every 300 s, and bound by
    HAProxy during an agent restart: the agent could not start, and the renderer read an attacker's
    catalog through HAProxy and sent it its token. Consul's ports and the renderer's own
    (`Config.reserved_ports`) are refused before any bind is tried, even with tcp_ports wide open."""
    services = {"evil": [instance("evil", "e1", haproxy_mode="tcp", haproxy_port=str(port))]}
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"evil": ["lb"]})}
    for name in ("evil", "web"):
        values[HealthService(name).key] = HealthService(name).parse(services.get(name, []))
    wide = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES, tcp_ports=((1, 65535),))
    result = wide.render(Data(values))
    assert result.content is not None and "listen evil" not in result.content and "\nbackend evil\n" in result.content
    assert any(f"meta haproxy_port {port} is Consul's or this renderer's port" in n for n in result.left_out)


def test_the_reserved_ports_hold_the_agents_and_the_status_servers_own() -> None:
    config = Config(consul=ConsulSettings(addr="127.0.0.1:18500"), status_addr="127.0.0.1:19464")
    assert config.reserved_ports == CONSUL_PORTS | {18500, 19464}
    assert Config(status_addr="off").reserved_ports == CONSUL_PORTS  # the default agent's 8500 is Consul's own


def test_a_tcp_service_keeps_its_listener_and_port_while_it_has_no_instance() -> None:
    """A review's takeover: while `zdb` had no passing instance (a redeploy, an outage past
    empty_grace) it became an empty HTTP backend, its listener and port vanished, and `adb`, asking
    for the same port, took it; `zdb` coming back was then the one left out, for good. Now the
    settings its instances last agreed on hold while it has none."""
    tcp = {"haproxy_mode": "tcp", "haproxy_port": "15432"}
    spec = TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused"), empty_grace=0)  # no anti-empty hold
    renderer = TemplateRenderer(spec, VARIABLES, environ={})

    def values(zdb: list[dict[str, Any]]) -> Data:
        services = {"zdb": zdb, "adb": [instance("adb", "a1", **tcp)]}
        found: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({n: ["lb"] for n in services})}
        for name in {*services, "web"}:
            found[HealthService(name).key] = HealthService(name).parse(services.get(name, []))
        return Data(found)

    first = renderer.render(values([instance("zdb", "z1", **tcp)])).content
    assert first is not None and "listen zdb" in first
    empty = renderer.render(values([])).content
    assert empty is not None and "listen zdb\n" in empty and "\nbackend zdb\n" not in empty
    zdb = empty[empty.index("listen zdb\n") :].split("\n\n")[0]
    assert "    bind 127.0.0.1:15432\n" in zdb + "\n" and "server " not in zdb


def test_the_settings_last_agreed_on_survive_a_sighup() -> None:
    """A SIGHUP builds new renderers: the memory of the old one is carried over, so a TCP service
    with no instance at that moment keeps its port (a review's finding on cf041a0)."""
    tcp = {"haproxy_mode": "tcp", "haproxy_port": "15432"}
    spec = TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused"), empty_grace=0)

    def values(zdb: list[dict[str, Any]]) -> Data:
        found: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"zdb": ["lb"]})}
        for name, instances in (("zdb", zdb), ("web", [])):
            found[HealthService(name).key] = HealthService(name).parse(instances)
        return Data(found)

    before = TemplateRenderer(spec, VARIABLES, environ={})
    assert "listen zdb" in (before.render(values([instance("zdb", "z1", **tcp)])).content or "")
    after = TemplateRenderer(spec, VARIABLES, environ={})
    after.carry_over(before)
    assert "listen zdb\n" in (after.render(values([])).content or "")


def test_the_older_meta_health_path_is_agreed_on_exactly_and_keeps_its_last_agreed_value() -> None:
    """An attacker's review: the template compared health_path itself with Jinja's `unique`, which
    ignores case, so one instance registered with `/HEALTHZ` (its node sorting first) set every
    server's check to its spelling and the backend went down (404s, seen on HAProxy 2.8); and any
    other value set /health. It is now the check_path setting: exact, and the value every instance
    last agreed on holds while they disagree."""
    template = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)

    def render_with(*instances: dict[str, Any]) -> Any:
        values = {
            CatalogServices().key: CatalogServices().parse({"api": ["lb"]}),
            HealthService("api").key: HealthService("api").parse(list(instances)),
            HealthService("web").key: (),
        }
        return template.render(Data(values))

    victims = [instance("api", "a1", health_path="/healthz"), instance("api", "a2", 8081, health_path="/healthz")]
    first = render_with(*victims)
    assert first.content is not None and "    option httpchk GET /healthz\n" in first.content
    attacker = {**instance("api", "evil", 9999, health_path="/HEALTHZ"), "Node": {"Node": "0-attacker"}}
    attacker["Node"]["Address"] = "10.0.0.9"
    later = render_with(attacker, *victims)
    assert later.content is not None and "    option httpchk GET /healthz\n" in later.content, later.content
    assert any("disagree on meta haproxy_check_path (or health_path)" in note for note in later.left_out)


def test_health_path_set_to_the_default_agrees_with_an_instance_without_it() -> None:
    """A review: once health_path became the check_path setting, instances carrying /health beside
    instances without it were reported as disagreeing, where before they agreed."""
    result = render({"api": [instance("api", "a1", health_path="/health"), instance("api", "a2", 8081)]})
    assert result.content is not None and "    option httpchk GET /health\n" in result.content
    assert not any("disagree" in note for note in result.left_out), result.left_out


def test_in_a_storm_a_value_most_registrations_do_not_carry_waits_and_says_why() -> None:
    """An attacker's review (/tmp/rev46): in a storm, an attacker's value, served while the owners
    redeploy, gave way at once to theirs when they were back: a reload off the turns per name. In a
    storm, such a value is not served, and the note says why."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    evil = entry("evil", 9000, haproxy_check_status="418")
    api_backend(renderer, [entry(f"a{n}", 8080 + n) for n in range(3)])
    changes = renderer._flaps.changes  # someone else's storm: many services' settings changed lately
    changes.level, changes.counted_at = 10.0, time.monotonic()
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"api": ["lb"]})}
    values[HealthService("api").key] = HealthService("api").parse(
        [entry(f"a{n}", 8080 + n, "critical") for n in range(3)] + [evil]
    )
    values[HealthService("web").key] = HealthService("web").parse([])
    result = renderer.render(Data(values))
    assert result.content is not None and "418" not in result.content
    assert any("most of its registrations do not carry" in note for note in result.left_out), result.left_out


TCP = {"haproxy_mode": "tcp", "haproxy_port": "15432"}


def api_at(renderer: TemplateRenderer, entries: list[dict[str, Any]], now: float) -> RenderResult:
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"api": ["lb"]})}
    values[HealthService("api").key] = HealthService("api").parse(entries)
    values[HealthService("web").key] = HealthService("web").parse([])
    return renderer.render(Data(values), now)


def test_critical_registrations_cannot_keep_a_setting_the_owners_removed() -> None:
    """An attacker's review (/tmp/rev47) of a first fix for the TCP listener (keeping a setting no
    served instance carries until most registrations are served without it): critical dummies (or
    one leftover critical registration) kept the owners' removed setting for good, silently; and the
    later rules let an attacker's value agreed once be kept, or a removed one come back
    (/tmp/rev49, /tmp/rev50). A removal is served at once and forgotten: an instance passing with the
    removed value later does not bring it back."""
    for dummies in (0, 1, 3, 10):
        for meta in ({}, TCP):
            renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
            owners = [entry(f"a{n}", 8080 + n, **TCP) for n in range(3)]
            assert "\nlisten api\n" in (api_at(renderer, owners, 50.0).content or "")
            critical = [entry(f"dummy{n}", 9100 + n, "critical", **meta) for n in range(dummies)]
            assert api_at(renderer, owners + critical, 100.0).content  # then the dummies come
            restarted = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
            restarted.restore(*renderer.remembered())
            for one in (renderer, restarted):
                removed = [entry(f"a{n}", 8080 + n) for n in range(3)]
                assert "\nbackend api\n" in (api_at(one, removed + critical, 200.0).content or ""), (dummies, meta)
                api_at(one, removed + critical, 800.0)
                evil = entry("evil", 9000, **TCP)  # passing, carrying the removed value
                later = api_at(one, [*removed, evil, *critical], 801.0).content or ""
                assert "\nbackend api\n" in later, (dummies, meta)


def test_an_attackers_value_agreed_once_is_not_kept_by_its_critical_registrations() -> None:
    """An attacker's review (/tmp/rev49): with how many carried a value remembered, an attacker's
    four instances asking `haproxy_check_status 418`, passing while none of the owners' three did,
    agreed it with a count of four; turned critical, they kept it served beside the owners for good
    (the owners' servers failing its check). Now no served instance carrying it, it is not served."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    evil = [entry(f"evil{n}", 9000 + n, haproxy_check_status="418") for n in range(4)]
    down = [entry(f"a{n}", 8080 + n, "critical") for n in range(3)]
    assert "418" in (api_at(renderer, down + evil, 100.0).content or "")
    owners = [entry(f"a{n}", 8080 + n) for n in range(3)]
    gone = [entry(f"evil{n}", 9000 + n, "critical", haproxy_check_status="418") for n in range(4)]
    for now in (101.0, 200.0, 100.0 + 86400):
        assert "418" not in (api_at(renderer, owners + gone, now).content or ""), now


def names_filling_the_cap() -> dict[str, list[dict[str, Any]]]:
    """An attacker's four names, each with one instance passing alone with a `haproxy_*` value and
    two critical without: four services serve settings most registrations do not carry (the cap)."""
    critical = [{"CheckID": "c", "Status": "critical"}]
    return {
        f"evil{k}": [
            instance(f"evil{k}", f"e{k}a", 9000, haproxy_balance="leastconn"),
            {**instance(f"evil{k}", f"e{k}b", 9001), "Checks": critical},
            {**instance(f"evil{k}", f"e{k}c", 9002), "Checks": critical},
        ]
        for k in range(MAX_UNBACKED)
    }


@pytest.mark.parametrize(
    ("blip_s", "every_s", "passers"),
    [(0.0, 0.0, 1), (0.5, 100.0, 1), (30.0, 320.0, 1), (0.5, 100.0, 4), (0.5, 250.0, 4)],
)
def test_the_owners_unanimous_change_outvoted_by_critical_registrations_is_served_within_a_bound(
    blip_s: float, every_s: float, passers: int
) -> None:
    """An attacker's review (/tmp/rev74): four names of its own, each serving a value most of its
    registrations do not carry, filled the cap of such services; four critical registrations
    without meta in `api` outvoted its three owners, so the owners' unanimous move of their health
    check to /healthz was held at every turn for good (HAProxy went on checking the retired /health
    and marked every server down). It waits UNBACKED_MAX_WAIT_S at most now, also when an instance
    without meta passes a moment every 100 s (helper-129, /tmp/rev75: held for good), or 30 s every
    320 s (helper-135, /tmp/rev81: held for good by a fix that counted pauses a turn long), or four
    such instances, more than the owners, for a moment (helper-137, /tmp/rev83: held for good by a
    fix that counted the served instances alone)."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    dummies = [entry(f"x{n}", 9100 + n, "critical") for n in range(4)]
    evil = names_filling_the_cap()

    def check_path(path: str | None, now: float, passing: tuple[dict[str, Any], ...] = ()) -> str:
        owners = [entry(f"a{n}", 8080 + n, **({"haproxy_check_path": path} if path else {})) for n in range(3)]
        values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({n: ["lb"] for n in ["api", *evil]})}
        values[HealthService("api").key] = HealthService("api").parse(owners + dummies + list(passing))
        values[HealthService("web").key] = HealthService("web").parse([])
        for name, entries in evil.items():
            values[HealthService(name).key] = HealthService(name).parse(entries)
        content = renderer.render(Data(values), now).content or ""
        assert "\nbackend evil0\n    balance leastconn\n" in content  # the cap is the attacker's
        begins = content.index("\nbackend api\n")
        return next(line.split()[-1] for line in content[begins:].splitlines() if "option httpchk" in line)

    assert check_path(None, 100.0) == "/health"
    now = 200.0

    def passing(at: float) -> tuple[dict[str, Any], ...]:  # the attacker's instance without meta, passing
        blip = blip_s and 50.0 <= (at - 200.0) % every_s <= 50.0 + blip_s
        return tuple(entry(f"passer{n}", 9500 + n) for n in range(passers)) if blip else ()

    while check_path("/healthz", now, passing(now)) == "/health":
        if blip_s and (now - 200.0) % every_s == 50.0:  # between turns, a render with it passing
            assert check_path("/healthz", now + 0.5, passing(now + 0.5)) == "/health"
        now += 5.0
        assert now <= 200.0 + UNBACKED_MAX_WAIT_S + 2 * HOLD_TURN_S, "held past the bound"
    assert now >= 200.0 + UNBACKED_MAX_WAIT_S - HOLD_TURN_S  # waited: the cap is not ignored


@pytest.mark.parametrize(("critical_s", "passing_s"), [(50.0, 10.0), (25.0, 5.0), (40.0, 25.0)])
def test_an_attackers_value_is_never_served_over_owners_whose_health_flaps(critical_s: float, passing_s: float) -> None:
    """helper-135 (/tmp/rev81) on a first fix of helper-129's finding 5 (a pause had to last a turn
    to end a wait): `api`'s three owners flap (critical, then passing for less than a turn), an
    attacker's instance asks `haproxy_check_status 418` passing throughout, its four names fill the
    cap and a storm runs. The owners' short spells no longer ended the wait: 418 was served past the
    bound (1,290 s of 1,600) and over the owners while they passed (220 s of 270). Most served
    instances asking for the served settings is a pause, however short."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    evil = names_filling_the_cap()
    now, served = 100.0, 0
    while now < 100.0 + 3 * UNBACKED_MAX_WAIT_S:
        up = now < 200.0 or now % (critical_s + passing_s) >= critical_s
        owners = [entry(f"a{n}", 8080 + n, "passing" if up else "critical") for n in range(3)]
        attacker = [entry("evil", 9500, haproxy_check_status="418")] if now >= 200.0 else []
        values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({n: ["lb"] for n in ["api", *evil]})}
        values[HealthService("api").key] = HealthService("api").parse(owners + attacker)
        values[HealthService("web").key] = HealthService("web").parse([])
        for name, entries in evil.items():
            values[HealthService(name).key] = HealthService(name).parse(entries)
        if now > 100.0:  # someone else's storm goes on (the attacker's names served before it)
            storm = renderer._flaps.changes
            storm.storm, storm.level, storm.counted_at = True, 100.0, now
        content = renderer.render(Data(values), now).content or ""
        assert "\nbackend evil0\n    balance leastconn\n" in content  # the cap is the attacker's
        begins = content.index("\nbackend api\n")
        served += "expect status 418" in content[begins : content.find("\n\n", begins + 1)]
        now += 2.0
    assert served == 0, f"418 served in {served} renders"


def test_a_restarts_first_render_waiting_for_data_keeps_the_settings_the_memory_gave_back() -> None:
    """The same review: the loop's first pass renders with no data yet, and that render, waiting,
    forgot the settings a restart had read back from the memory file (it read none of the services),
    so beside an instance without meta a TCP service became an HTTP backend. Only a whole render
    forgets."""
    first = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    owners = [entry(f"a{n}", 8080 + n, **TCP) for n in range(3)]
    assert "\nlisten api\n" in (api_at(first, owners, 100.0).content or "")
    restarted = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    restarted.restore(*first.remembered())
    assert restarted.render(Data({}), 200.0).content is None  # waiting for data
    content = api_at(restarted, [*owners, entry("evil", 9000)], 201.0).content or ""
    assert "\nlisten api\n" in content and "    bind 127.0.0.1:15432\n" in content


def test_a_brand_new_tcp_service_gets_its_listener_at_once_in_a_storm() -> None:
    """An attacker's review (/tmp/rev52): the render that waits for a new service's answer recorded
    the default settings for it, so its own settings, in the whole render after it, came as a
    change, and in a storm waited for the turn: a brand-new TCP service served as an HTTP backend."""
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    api_at(renderer, [], 100.0)
    changes = renderer._flaps.changes  # someone else's storm
    changes.level, changes.counted_at = 10.0, 100.0
    waiting: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"api": ["lb"], "db": ["lb"]})}
    waiting[HealthService("api").key] = HealthService("api").parse([])
    waiting[HealthService("web").key] = HealthService("web").parse([])
    assert renderer.render(Data(waiting), 101.0).content is None  # db's answer not in yet
    values = {**waiting, HealthService("db").key: HealthService("db").parse([instance("db", "d1", **TCP)])}
    content = renderer.render(Data(values), 101.5).content or ""
    assert "\nlisten db\n" in content and "    bind 127.0.0.1:15432\n" in content
