from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from renderer.config import TemplateSpec
from renderer.haproxy.checked import DEFAULT_POLICY, AddressPolicy
from renderer.render import listing
from renderer.render.template import TemplateRenderer, check_template, hap_name
from renderer.source.dependency import CatalogServices, HealthService, KVKey, KVPrefix


class Data:
    """Our own seam: a DataSource holding parsed values by dependency key."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, key: str) -> tuple[bool, Any]:
        return (key in self.values, self.values.get(key))


def entry(
    sid: str,
    node: str = "n1",
    tags: list[str] | None = None,
    status: str = "passing",
    service: str = "web",
    **meta: str,
) -> Any:
    return {
        "Node": {"Node": node, "Address": "10.0.0.1", "Datacenter": "dc1"},
        "Service": {"ID": sid, "Service": service, "Address": "10.0.1.1", "Port": 80, "Tags": tags or [], "Meta": meta},
        "Checks": [{"Status": status}],
    }


def renderer(
    tmp_path: Path,
    text: str,
    on_unsafe_value: str = "leave_out",
    policy: AddressPolicy = DEFAULT_POLICY,
    **variables: str,
) -> TemplateRenderer:
    src = tmp_path / "t.j2"
    src.write_text(text)
    spec = TemplateSpec(src, tmp_path / "out", on_unsafe_value=on_unsafe_value)
    return TemplateRenderer(spec, variables, environ={"HOME": "/root"}, policy=policy)


def web(*entries: Any) -> dict[str, Any]:
    return {HealthService("web").key: HealthService("web").parse(list(entries))}


def test_first_render_discovers_dependencies(tmp_path: Path) -> None:
    r = renderer(tmp_path, "{% for s in service('web') %}{{ s.id }}{% endfor %}{{ key('a/b') }}")
    result = r.render(Data({}))
    assert result.content is None
    assert set(result.dependencies) == {"health.service(web)", "kv.key(a/b)"}


def test_sorted_and_filtered_by_health(tmp_path: Path) -> None:
    data = web(entry("b", "n2"), entry("a", "n2"), entry("c", "n1"), entry("w", "n1", status="warning"))
    r = renderer(
        tmp_path,
        "{{ service('web') | map(attribute='id') | join(',') }}|"
        "{{ service('web', health='passing,warning') | length }}|{{ service('web', health='any') | length }}",
    )
    assert r.render(Data(data)).content == "c,a,b|4|4"


RAW_TAGS = "{% for s in service('web') %}{{ s.id }}:{% for t in s.tags %}{{ t }} {% endfor %}\n{% endfor %}"


def test_an_instance_with_a_control_character_is_left_out_and_named(tmp_path: Path) -> None:
    data = web(entry("good", tags=["ok"]), entry("evil", tags=["ok", "x\nbackend injected"]))
    result = renderer(tmp_path, RAW_TAGS).render(Data(data))
    assert result.content == "good:ok \n"  # the rest renders
    assert result.left_out == ("service web, instance 'evil' on node 'n1', field Tags: character '\\n'",)


def test_a_template_can_choose_to_fail_the_render_instead(tmp_path: Path) -> None:
    data = web(entry("good", tags=["ok"]), entry("evil", tags=["ok", "x\nbackend injected"]))
    result = renderer(tmp_path, RAW_TAGS, on_unsafe_value="fail").render(Data(data))
    assert result.content is None
    assert result.error is not None
    assert "service web, instance 'evil' on node 'n1', field Tags" in result.error
    assert "t.j2:1" in result.error


def test_a_meta_value_with_a_carriage_return_is_named_by_its_key(tmp_path: Path) -> None:
    data = web(entry("m", version="1\r2"))
    template = "{% for s in service('web') %}{{ s.meta.version }}{% endfor %}"
    assert "field Meta[version]: character '\\r'" in renderer(tmp_path, template).render(Data(data)).left_out[0]
    result = renderer(tmp_path, template, on_unsafe_value="fail").render(Data(data))
    assert result.error and "field Meta[version]" in result.error


def test_hap_name_keeps_identifiers_safe() -> None:
    assert hap_name("node 1/web#2\n").startswith("node_1_web_2__")
    assert hap_name("web") == "web" and hap_name("stats", ["stats"]) != "stats"


def test_kv_functions(tmp_path: Path) -> None:
    pairs = [{"Key": "app/a", "Value": "MQ=="}, {"Key": "app/sub/b", "Value": "Mg=="}, {"Key": "app/", "Value": None}]
    data = {
        KVPrefix("app").key: KVPrefix("app").parse(pairs),
        KVKey("x").key: KVKey("x").parse([{"Value": "eA=="}]),
        KVKey("missing").key: None,
        KVPrefix("empty").key: (),
    }
    r = renderer(
        tmp_path,
        "{{ ls('app')|map(attribute='key')|join(',') }} {{ tree('app')|length }} {{ key('x') }} "
        "{{ key_or_default('missing', 'dflt') }} {{ env('HOME') }}",
    )
    assert r.render(Data(data)).content == "a 2 x dflt /root"
    assert renderer(tmp_path, "{{ key('missing') }}").render(Data(data)).missing == (
        "kv.key(missing) (key does not exist)",
    )
    assert renderer(tmp_path, "{{ safe_ls('empty') }}").render(Data(data)).content is None


def test_services_by_tag_and_meta(tmp_path: Path) -> None:
    data = {CatalogServices().key: CatalogServices().parse({"web": ["lb", "x"], "db": []})} | web(
        entry("a", tags=["lb"], zone="z1"), entry("b", tags=["lb", "canary"], zone="z2")
    )
    text = (
        "{{ services()|map(attribute='name')|join(',') }} "
        "{{ service('web')|by_tag('canary')|map(attribute='id')|join }} "
        "{{ (service('web')|by_meta('zone'))['z1'][0].id }} {{ (service('web')|by_tag)|list|join(',') }}"
    )
    assert renderer(tmp_path, text).render(Data(data)).content == "db,web b a canary,lb"


def test_check_reports_syntax_and_undefined_with_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.j2"
    bad.write_text("ok\n{% if %}\n")
    undefined = tmp_path / "u.j2"
    undefined.write_text("{{ service('web') | length }}\n{{ nope }}\n")
    assert "bad.j2:2" in check_template(TemplateSpec(bad, tmp_path / "o"), {})[0]
    errors = check_template(TemplateSpec(undefined, tmp_path / "o"), {})
    assert errors and "u.j2:2" in errors[0] and "'nope' is undefined" in errors[0]
    assert check_template(TemplateSpec(undefined, tmp_path / "o"), {"nope": "1"}) == []


def test_default_template_renders_deterministically(tmp_path: Path) -> None:
    from lab.stack import DEFAULT_TEMPLATE

    data = {CatalogServices().key: CatalogServices().parse({"web": ["lb"], "api": ["lb"], "db": []})}
    data |= web(entry("b", "n2", weight="7", health_path="/ready"), entry("a", "n1", health_path="/ready"))
    data[HealthService("web").key] = data[HealthService("web").key]
    data[HealthService("api").key] = ()
    r = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg"), {"http_port": "8080"})
    first = r.render(Data(data)).content
    assert first is not None and first == r.render(Data(data)).content
    assert "server n1_a 10.0.1.1:80 check\n" in first
    assert "server n2_b 10.0.1.1:80 check weight 7\n" in first
    assert "option httpchk GET /ready" in first  # every instance asks for it
    assert "backend api\n" in first and "bind *:8080" in first
    data |= web(entry("b", "n2", health_path="/ready"), entry("a", "n1"), entry("c", "n3", health_path="/nope"))
    disputed = r.render(Data(data)).content
    assert disputed is not None and "option httpchk GET /health\n" in disputed  # one instance cannot choose


CACHED = (
    "{% for name in ['web', 'api'] %}{% call cached('b', name) %}[{{ name }}:"
    "{% for s in service(name) %}{{ s.id }} {% endfor %}]\n{% endcall %}{% endfor %}"
)


def test_cached_blocks_follow_their_data_and_only_their_data(tmp_path: Path) -> None:
    r = renderer(tmp_path, CACHED)
    api = HealthService("api")
    values = {**web(entry("w1")), api.key: api.parse([entry("a1", service="api")])}
    first = r.render(Data(values))
    assert first.content == "[web:w1 ]\n[api:a1 ]\n"
    # api's data object is the same one: its block is reused; web's changed: re-rendered.
    changed = {**values, **web(entry("w1"), entry("w2"))}
    second = r.render(Data(changed))
    assert second.content == "[web:w1 w2 ]\n[api:a1 ]\n"
    assert set(second.dependencies) == {"health.service(web)", "health.service(api)"}
    # The same bytes as a renderer with no cache at all.
    assert renderer(tmp_path, CACHED).render(Data(changed)).content == second.content


def test_a_cached_block_reports_what_it_left_out_on_every_render(tmp_path: Path) -> None:
    r = renderer(tmp_path, CACHED)
    api = HealthService("api")
    values = {**web(entry("w1"), entry("w2\nbad")), api.key: api.parse([])}
    first = r.render(Data(values))
    second = r.render(Data(values))  # the web block comes from the cache now
    assert first.content == second.content == "[web:w1 ]\n[api:]\n"
    assert first.left_out == second.left_out and "instance 'w2\\nbad'" in first.left_out[0]


NESTED = (
    "{% for group in [['web', 'api'], ['db']] %}{% call cached('group', *group) %}"
    "{% for name in group %}{% call cached('b', name) %}[{{ name }}:"
    "{% for s in service(name) %}{{ s.id }} {% endfor %}]{% endcall %}{% endfor %}\n{% endcall %}{% endfor %}"
)


def test_a_reused_group_keeps_its_inner_blocks_for_the_next_change(tmp_path: Path) -> None:
    """A group block reused whole does not call its inner blocks; they must stay cached all the
    same, or the next change inside the group re-renders every one of them (white-box: the
    output is the same either way, only the work differs)."""
    r = renderer(tmp_path, NESTED)
    api, db = HealthService("api"), HealthService("db")
    values = {**web(entry("w1")), api.key: api.parse([entry("a1", service="api")]), db.key: db.parse([])}
    r.render(Data(values))
    api_block = r._blocks[("b", "api")]
    values = {**values, db.key: db.parse([entry("d1", service="db")])}  # a change in the other group
    r.render(Data(values))
    assert ("b", "api") in r._blocks and ("b", "web") in r._blocks, "the reused group's inner blocks are kept"
    values = {**values, **web(entry("w1"), entry("w2"))}  # now a change inside the first group
    third = r.render(Data(values))
    assert r._blocks[("b", "api")] is api_block, "api's block reused, not rendered again"
    assert third.content == "[web:w1 w2 ][api:a1 ]\n[db:d1 ]\n"
    assert renderer(tmp_path, NESTED).render(Data(values)).content == third.content


# service_names(): the filter chains the shipped templates used before it, which it must equal.
CHAIN = (  # a listed name equal to the default service without case goes for it (d: plain names)
    "{% set listed = services(tag='lb', reserved=['http']) | map(attribute='name') | list %}"
    "{% set kept = namespace(n=[]) %}{% for x in listed %}"
    "{% if d in listed or x | lower != d | lower %}{% set kept.n = kept.n + [x] %}{% endif %}{% endfor %}"
    "{% set n = kept.n %}{% if d not in n %}{% set n = n + [d] %}{% endif %}"
    "{{ n | join(',') }}|{{ n | sort | join(',') }}"
)
FOR_THE_DEFAULT = "which the template serves (names are compared without case)"
NAMES = (
    "{{ service_names(tag='lb', reserved=['http'], also=[d]) | join(',') }}|"
    "{{ service_names(tag='lb', reserved=['http'], also=[d], sort=true) | join(',') }}"
)
# Mixed case (Jinja's `sort` ignores it, the catalog's order does not), names the listing leaves out
# ("a/b"; "Ab" beside "ab") or gives a suffix ("http", reserved), default services that sort anywhere.
catalog_names = st.lists(
    st.sampled_from(["ab", "Ab", "b", "B", "Zed", "a/b", "http", "é", "_x", "web", "W"]), unique=True
)
defaults = st.sampled_from(["web", "Web", "a", "AB", "zz"])


def catalog(names: dict[str, list[str]]) -> dict[str, Any]:
    return {CatalogServices().key: CatalogServices().parse(names)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=catalog_names, untagged=st.sets(st.integers(0, 10)), default=defaults)
def test_service_names_equal_the_filter_chain_they_replace(
    tmp_path: Path, names: list[str], untagged: set[int], default: str
) -> None:
    data = Data(catalog({n: [] if i in untagged else ["lb"] for i, n in enumerate(names)}))
    expected = renderer(tmp_path, CHAIN, d=default).render(data)
    fast = renderer(tmp_path, NAMES, d=default)
    for _ in range(2):  # built, then from the memo
        got = fast.render(data)
        # service_names also says which listed name it left out for the default (the chain cannot)
        taken = tuple(
            i for i in got.left_out if i.endswith("which the template serves (names are compared without case)")
        )
        assert (got.content, tuple(i for i in got.left_out if i not in taken)) == (expected.content, expected.left_out)


def test_service_names_are_built_once_per_catalog_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    original = listing.names_of

    def counting(*args: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(listing, "names_of", counting)
    r = renderer(tmp_path, "{{ service_names() | join(',') }} {{ service_names(sort=true) | join(',') }}")
    first = Data(catalog({"b": [], "A": []}))
    assert r.render(first).content == r.render(first).content == "A,b A,b"
    assert len(built) == 2, "one list per query, not per render"
    assert r.render(Data(catalog({"b": [], "c": []}))).content == "b,c b,c"  # a new answer: built again
    assert len(built) == 4


def test_what_service_names_remembers_stays_bounded_whatever_kv_says(tmp_path: Path) -> None:
    """`also` read from KV: whoever writes the key can ask for a new list at every render; the
    memory keeps the current catalog's answers only, and at most MAX_KEPT of them."""
    r = renderer(tmp_path, "{{ service_names(also=[key('extra')]) | join(',') }}")
    one = catalog({"a": []})
    for n in range(3 * listing.MAX_KEPT):
        assert r.render(Data({**one, KVKey("extra").key: f"x{n}"})).content == f"a,x{n}"
    kept = r._listings
    assert 0 < len(kept._names) <= listing.MAX_KEPT
    r.render(Data({**catalog({"b": []}), KVKey("extra").key: "y"}))  # a new catalog answer: the old ones go
    assert len(kept._names) == 1 and len(kept._listings) == 1


def test_a_template_cannot_change_the_names_the_next_call_gets(tmp_path: Path) -> None:
    text = (
        "{% set n = service_names() %}{{ n.append('x') or '' }}{{ n.reverse() or '' }}{{ n | join(',') }} "
        "{{ service_names() | join(',') }}"
    )
    r = renderer(tmp_path, text)
    data = Data(catalog({"a": [], "b": []}))
    assert r.render(data).content == r.render(data).content == "x,b,a a,b"


def test_service_names_report_what_the_listing_leaves_out(tmp_path: Path) -> None:
    r = renderer(tmp_path, "{{ service_names() | join(',') }}")
    first = r.render(Data({}))
    assert first.content is None and first.missing == ("catalog.services",)
    result = r.render(Data(catalog({"a/b": [], "web": []})))
    assert result.content == "web"
    assert len(result.left_out) == 1 and result.left_out[0].startswith("service 'a/b': ")


# Every name sorts differently with case than without, and the default service sorts before most.
MIXED = {"web": ["lb"], "Zeta": ["lb"], "alpha": ["lb"], "Beta": ["lb"], "db": []}


def shipped(tmp_path: Path, template: Path, default: str, names: dict[str, list[str]]) -> str:
    data = catalog(names) | {HealthService(n).key: () for n in [*names, default]}
    spec = TemplateSpec(template, tmp_path / template.stem)
    content = TemplateRenderer(spec, {"default_service": default, "routes_map": "/m"}).render(Data(data)).content
    assert content is not None
    return content


def test_the_routing_map_sorts_the_default_service_among_the_others_without_case(tmp_path: Path) -> None:
    from lab.stack import ROUTES_TEMPLATE

    lines = shipped(tmp_path, ROUTES_TEMPLATE, "api", MIXED).splitlines()[1:]
    assert lines == ["alpha alpha", "api api", "beta Beta", "web web", "zeta Zeta"]
    lines = shipped(tmp_path, ROUTES_TEMPLATE, "Web", {"web": ["lb"], "Aa": ["lb"]}).splitlines()[1:]
    assert lines == ["aa Aa", "web Web"]  # equal without case: the template's own default wins


def test_a_name_equal_to_the_default_service_without_case_never_takes_its_routes(tmp_path: Path) -> None:
    """An attacker's review: `web`, the default service, registered without the lb tag (or out of the
    catalog during a redeploy); `Web` registered with it. The listing saw only `Web`, `also` added
    `web`, and `Web`'s rules, first in the file, took Host `web` and `web.*`, in the config and the
    map alike. `Web` is now left out for the default service, and reported."""
    from lab.stack import DEFAULT_TEMPLATE, ROUTES_TEMPLATE

    hostile = {"web": [], "Web": ["lb"], "api": ["lb"]}
    lines = shipped(tmp_path, ROUTES_TEMPLATE, "web", hostile).splitlines()[1:]
    assert lines == ["api api", "web web"]
    content = shipped(tmp_path, DEFAULT_TEMPLATE, "web", hostile)
    assert "backend Web" not in content and "use_backend Web" not in content and "backend web" in content
    r = renderer(tmp_path, "{{ service_names(tag='lb', also=['web']) | join(',') }}")
    got = r.render(Data(catalog(hostile)))
    assert got.content == "api,web"
    assert [item for item in got.left_out if item.startswith("service 'Web'")] == [
        "service 'Web': would become the HAProxy name 'web' of 'web', which the template serves "
        "(names are compared without case)"
    ]


def test_a_case_variant_registered_beside_a_served_service_never_takes_its_name(tmp_path: Path) -> None:
    """An attacker's review (/tmp/rev16): beside a serving `Payments`, a newcomer `payments` took its
    backend and its Host (the exact lower-case name won), and `PAYMENTS` took both out (neither won).
    The name stays with the service that had it; a SIGHUP's new renderer remembers it too."""
    from lab.stack import DEFAULT_TEMPLATE, ROUTES_TEMPLATE

    def of(template: Path) -> TemplateRenderer:
        variables = {"routes_map": "/m"} if template == ROUTES_TEMPLATE else {}  # the config routes by ACLs
        return TemplateRenderer(TemplateSpec(template, tmp_path / template.stem), variables)

    def render(r: TemplateRenderer, names: dict[str, list[str]]) -> tuple[str, tuple[str, ...]]:
        data = catalog(names) | {HealthService(n).key: () for n in [*names, "web"]}
        got = r.render(Data(data))
        assert got.content is not None
        return got.content, got.left_out

    config, routes = of(DEFAULT_TEMPLATE), of(ROUTES_TEMPLATE)
    rounds: list[dict[str, list[str]]] = [{"Payments": ["lb"]}, {"Payments": ["lb"], "payments": ["lb"]}]
    for names in [*rounds, {"Payments": ["lb"], "PAYMENTS": ["lb"]}]:
        content, left_out = render(config, names)
        assert "\nbackend Payments\n" in content and "use_backend Payments if host_Payments !by_address" in content, (
            names
        )
        assert "backend payments" not in content and "backend PAYMENTS" not in content
        assert render(routes, names)[0].splitlines()[1:] == ["payments Payments", "web web"]
        assert [i for i in left_out if "compared without case" in i] == [
            f"service {n!r}: {n!r} would become the HAProxy name {n!r}, which another already has "
            "(names are compared without case)"
            for n in names
            if n != "Payments"
        ]
    again = of(DEFAULT_TEMPLATE)
    again.carry_over(config)
    assert "\nbackend Payments\n" in render(again, {"PAYMENTS": ["lb"], "Payments": ["lb"]})[0]
    alone = render(of(DEFAULT_TEMPLATE), {"PAYMENTS": ["lb"], "Payments": ["lb"]})[0]
    assert "backend Payments" not in alone, "a renderer started beside both knows no holder: neither wins"


def test_a_name_stays_with_its_service_while_a_redeploy_leaves_it_out_of_the_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next review (/tmp/rev18): the only instance of a serving `payments` redeployed (gone from
    the catalog for 1.5 s); a variant `Payments` registered beside it took the name in that moment
    and kept it for good, the victim's own name refused from then on. A name stays with the service
    that had it for NAME_HOLD_S after it leaves the catalog; then the template renders again by
    itself (`recheck_in`), and the name may go to another."""
    from types import SimpleNamespace

    from lab.stack import DEFAULT_TEMPLATE
    from renderer.haproxy.checked import NAME_HOLD_S
    from renderer.render import template

    clock = [1000.0]
    monkeypatch.setattr(template, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    r = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg"), {})

    def render(*names: str) -> tuple[str, Any]:
        data = catalog({n: ["lb"] for n in names}) | {HealthService(n).key: () for n in [*names, "web"]}
        got = r.render(Data(data))
        assert got.content is not None
        return got.content, got

    assert "\nbackend payments\n" in render("payments", "Payments")[0]
    content, got = render("Payments")  # the redeploy: the victim out of the catalog
    assert "backend Payments" not in content and got.recheck_in == pytest.approx(NAME_HOLD_S)
    assert any("which 'payments' had until 0 s ago" in item for item in got.left_out), got.left_out
    clock[0] += 1.5
    content, _ = render("payments", "Payments")  # back
    assert "\nbackend payments\n" in content and "backend Payments" not in content
    render("Payments")
    clock[0] += NAME_HOLD_S
    assert "\nbackend Payments\n" in render("Payments")[0], "a service gone for NAME_HOLD_S lets its name go"


def test_a_restarted_renderer_leaves_each_name_with_the_service_the_live_config_gives_it(tmp_path: Path) -> None:
    """The review's case variant, at the next start: no renderer remembered who had the name, so
    `payments` (the lower-case one) took `Payments`'s backend, and beside `PAYMENTS` neither was
    served. The names in the live config HAProxy runs are read at start; the map follows them too."""
    from lab.stack import DEFAULT_TEMPLATE, ROUTES_TEMPLATE
    from renderer.config import Config
    from renderer.loop.templates import compile_templates

    live = tmp_path / "haproxy.cfg"
    live.write_text("global\n\nlisten stats\n    bind :1936\n\nbackend Payments\n    server a 10.0.0.1:80\n")
    config = Config(
        templates=(
            TemplateSpec(DEFAULT_TEMPLATE, live, haproxy=True),
            TemplateSpec(ROUTES_TEMPLATE, tmp_path / "routes.map"),
        ),
        vars={"routes_map": "/m"},
        allow_local_addresses=True,
    )
    for variant in ("payments", "PAYMENTS"):
        names = {"Payments": ["lb"], variant: ["lb"]}
        data = Data(catalog(names) | {HealthService(n).key: () for n in [*names, "web"]})
        config_state, routes_state = compile_templates(config, {})
        content = config_state.renderer.render(data).content
        assert content is not None and "\nbackend Payments\n" in content and f"backend {variant}" not in content
        assert (routes_state.renderer.render(data).content or "").splitlines()[1:] == ["payments Payments", "web web"]
    live.unlink()
    config_state, _ = compile_templates(config, {})
    names = {"Payments": ["lb"], "payments": ["lb"]}
    data = Data(catalog(names) | {HealthService(n).key: () for n in [*names, "web"]})
    content = config_state.renderer.render(data).content
    assert content is not None and "\nbackend payments\n" in content, "no live config: the lower-case one"


def test_the_config_has_the_catalogs_backends_then_an_unregistered_default(tmp_path: Path) -> None:
    from lab.stack import DEFAULT_TEMPLATE

    content = shipped(tmp_path, DEFAULT_TEMPLATE, "api", MIXED)
    backends = [line.split()[1] for line in content.splitlines() if line.startswith("backend ")]
    assert backends == ["Beta", "Zeta", "alpha", "web", "api"]
    content = shipped(tmp_path, DEFAULT_TEMPLATE, "alpha", MIXED)
    backends = [line.split()[1] for line in content.splitlines() if line.startswith("backend ")]
    assert backends == ["Beta", "Zeta", "alpha", "web"]


def test_a_name_consul_cannot_be_asked_about_is_left_out_and_said_why() -> None:
    """Measured on 1.8.7 over both protocols: Consul answers 400 for a name with a character Go does
    not print (a newline, U+2028, a zero-width space, a no-break space) and 431 for one of 1.1 MB;
    following such a service held every render. A space, an accent or a % are asked fine."""
    from renderer.render.listing import MAX_ASKED_NAME_BYTES, build_listing

    odd = ["evil\nname", "a\u2028b", "we\u200bb", "no\u00a0break", "x" * (MAX_ASKED_NAME_BYTES + 1)]
    fine = ["sp ace", "café", "a%41", "y" * MAX_ASKED_NAME_BYTES]
    listing = build_listing({name: ["lb"] for name in odd + fine}, None, ())
    assert sorted(s.name for s in listing.services) == sorted(fine)
    assert len(listing.left_out) == len(odd)
    assert all("\n" not in line and len(line) < 300 for line in listing.left_out)
    assert sum("Consul answers 400 for it" in line for line in listing.left_out) == 4
    assert any("too long to ask Consul about" in line for line in listing.left_out)


SERVERS = "{% for s in service('web') %}{{ s.id }}={{ s.endpoint }}\n{% endfor %}"


def addressed(sid: str, address: str, node_address: str = "10.0.0.1") -> Any:
    found = entry(sid)
    found["Service"]["Address"] = address
    found["Node"]["Address"] = node_address
    return found


def test_an_instance_at_a_local_address_is_left_out_and_the_rest_served(tmp_path: Path) -> None:
    data = web(entry("good"), addressed("lo", "127.0.0.1"), addressed("meta", "169.254.169.254"))
    result = renderer(tmp_path, SERVERS).render(Data(data))
    assert result.content == "good=10.0.1.1:80\n"
    assert len(result.left_out) == 2, result.left_out
    loopback = next(item for item in result.left_out if "'lo'" in item)
    assert loopback.startswith("service web, instance 'lo' on node 'n1', field Address: '127.0.0.1' is refused: ")
    assert "allow_local_addresses = true" in loopback and "--allow-local-addresses true" in loopback


def test_a_node_address_is_judged_when_the_service_has_none(tmp_path: Path) -> None:
    data = web(entry("good"), addressed("inherits", "", node_address="::1"))
    result = renderer(tmp_path, SERVERS).render(Data(data))
    assert result.content == "good=10.0.1.1:80\n"
    assert result.left_out and "field Address: '::1' is refused: " in result.left_out[0]


def test_local_addresses_are_served_when_the_policy_allows_them(tmp_path: Path) -> None:
    data = web(entry("good"), addressed("lo", "127.0.0.1"), addressed("mapped", "::ffff:127.0.0.1"))
    result = renderer(tmp_path, SERVERS, policy=AddressPolicy(local=True)).render(Data(data))
    assert result.content == "good=10.0.1.1:80\nlo=127.0.0.1:80\nmapped=[::ffff:127.0.0.1]:80\n"
    assert result.left_out == ()


def test_a_host_name_is_refused_by_default_and_served_when_names_are_allowed(tmp_path: Path) -> None:
    data = web(entry("good"), addressed("named", "web-1.example.internal"))
    refused = renderer(tmp_path, SERVERS).render(Data(data))
    assert refused.content == "good=10.0.1.1:80\n"
    assert len(refused.left_out) == 1 and "'web-1.example.internal' is refused: a host name" in refused.left_out[0]
    assert "allow_host_names = true" in refused.left_out[0]
    allowed = renderer(tmp_path, SERVERS, policy=AddressPolicy(names=True)).render(Data(data))
    assert allowed.content == "good=10.0.1.1:80\nnamed=web-1.example.internal:80\n"
    assert allowed.left_out == ()


def test_a_refused_address_leaves_the_other_services_and_settings_alone(tmp_path: Path) -> None:
    text = "{{ settings(service('web')).balance }}|{{ service('web') | length }}"
    meta = {"haproxy_balance": "leastconn"}
    evil = addressed("lo", "127.0.0.1")
    evil["Service"]["Meta"] = {"haproxy_balance": "first"}
    data = web(entry("a", **meta), entry("b", **meta), evil)
    result = renderer(tmp_path, text).render(Data(data))
    assert result.content == "leastconn|2"  # the refused instance has no say in the settings


# -- routing order: the first matching use_backend wins, so the most specific rule comes first ------

# "api" routes Host api and api.<anything>: listed first, it would take api.v2.example.com from "api.v2".
ROUTED = {"api": ["lb"], "api.v2": ["lb"], "api.v2.beta": ["lb"], "web": ["lb"], "pg": ["lb"]}


def routed_frontend(tmp_path: Path, variables: dict[str, str]) -> list[str]:
    """The frontend's lines, rendered by the shipped template from ROUTED (pg: a TCP service)."""
    from lab.stack import DEFAULT_TEMPLATE

    data = catalog(ROUTED) | {HealthService(n).key: () for n in ROUTED}
    tcp = entry("pg-1", service="pg", haproxy_mode="tcp", haproxy_port="5432")
    data[HealthService("pg").key] = HealthService("pg").parse([tcp])
    spec = TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg")
    content = TemplateRenderer(spec, variables, environ={}).render(Data(data)).content
    assert content is not None
    frontend = content.split("\nfrontend http\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in frontend.splitlines()]


def first_match(lines: list[str], host: str, path: str = "/") -> str | None:
    """The backend HAProxy picks by the rendered ACLs: the first use_backend whose condition holds
    (terms joined by `or`, each a conjunction of ACLs, `!` negating one; a Host without its port)."""
    acls: dict[str, bool] = {}
    for words in (line.split() for line in lines):
        if words[:1] == ["acl"]:
            if words[2] == "path_beg":
                matched = path.startswith(words[3])
            elif words[3:5] == ["-m", "reg"]:
                matched = re.search(words[5], host) is not None
            else:
                assert words[3:5] in (["-m", "str"], ["-m", "beg"], ["-m", "end"]), words
                tests = {"str": host.__eq__, "beg": host.startswith, "end": host.endswith}
                matched = tests[words[4]](words[5])
            acls[words[1]] = acls.get(words[1], False) or matched
        elif words[:1] == ["use_backend"]:
            assert words[2] == "if", words
            terms = " ".join(words[3:]).split(" or ")
            used = [name.lstrip("!") for term in terms for name in term.split()]
            assert all(name in acls for name in used), f"{words}: ACL used before declared"
            if any(all(acls[n.lstrip("!")] != n.startswith("!") for n in term.split()) for term in terms):
                return words[1]
    return None


def test_host_rules_come_most_labels_first_then_the_paths(tmp_path: Path) -> None:
    """A Host that two names' rules match goes to the longer name (an exact name has more labels
    than any name it starts with): names of most labels first, each with its exact and
    "name.<anything>" rule, then every path rule."""
    lines = routed_frontend(tmp_path, {})
    rules = [line.split() for line in lines if line.startswith("use_backend ")]
    kinds = [next(w for w in rule[3:] if not w.startswith("!")).split("_", 1)[0] for rule in rules]
    assert kinds == sorted(kinds, key=["host", "path"].index), rules  # every Host rule before any path
    hosts = [rule for rule in rules if "or" in rule]
    expected = ["if", "host_{}", "!by_address", "or", "sub_{}", "!by_address"]
    assert all(rule[2:] == [w.format(rule[1]) for w in expected] for rule in hosts), hosts
    assert [rule[1] for rule in hosts][:3] == ["api.v2.beta", "api.v2", "api"], hosts
    assert sorted(rule[1] for rule in hosts[3:]) == ["web"]
    assert not [line for line in lines if "_pg " in line or line.endswith("_pg")]  # a TCP service has no route


def test_a_specific_host_reaches_its_service_whatever_the_names_order(tmp_path: Path) -> None:
    lines = routed_frontend(tmp_path, {})
    assert first_match(lines, "api.v2.example.com") == "api.v2"
    assert first_match(lines, "api.v2.beta.example.com") == "api.v2.beta"
    assert first_match(lines, "api.v2") == "api.v2"  # the exact name before api's api.<anything>
    assert first_match(lines, "api.v2.beta") == "api.v2.beta"
    assert first_match(lines, "api.example.com") == "api" and first_match(lines, "api") == "api"
    assert first_match(lines, "api.v2.example.com", "/web/x") == "api.v2"  # a host rule before any path
    assert first_match(lines, "other.example.com", "/web/x") == "web"
    assert first_match(lines, "other.example.com") is None  # then default_backend


def test_a_request_by_address_is_never_routed_by_a_services_name(tmp_path: Path) -> None:
    """helper-142 (/tmp/rev88, test_rev88_ip_name.py and _octet_name.py): a service named
    `127.0.0.1`, or `127`, took every request with Host 127.0.0.1 (clients and health checks that
    come by address) from the default backend, through HAProxy; helper-145: `localhost` too. Only
    its path routes it now, and the address is looked at only once a Host rule matched (helper-145:
    looked at first, for every service, it halved the requests a second)."""
    from lab.stack import DEFAULT_TEMPLATE

    names = {"web": ["lb"], "127.0.0.1": ["lb"], "127": ["lb"], "10": ["lb"], "localhost": ["lb"]}
    data = catalog(names) | {HealthService(n).key: () for n in names}
    spec = TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg")
    content = TemplateRenderer(spec, {}, environ={}).render(Data(data)).content
    assert content is not None
    lines = [line.strip() for line in content.split("\nfrontend http\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    for host in ("127.0.0.1", "10.1.2.3", "127.1", "localhost", "app.localhost"):
        assert first_match(lines, host) is None, host  # the default backend
    assert first_match(lines, "[::1]") is None
    assert first_match(lines, "127.0.0.1", "/127/x") == "127"  # its path still routes it
    assert first_match(lines, "127.example.com") == "127"  # a name, not an address


def test_the_routing_map_is_looked_up_with_the_most_labels_first(tmp_path: Path) -> None:
    lines = routed_frontend(tmp_path, {"routes_map": "/m"})
    lookups = [line.split(",lower", 1)[1].split(",map(")[0] for line in lines if "map(/m)" in line]
    assert lookups == ["", ",field(1,.,3)", ",field(1,.,2)", ",field(1,.)", ""]
    assert "path,field(2,/)" in [line for line in lines if "map(/m)" in line][-1]
    assert [line for line in lines if line.startswith("acl ")] == [
        "acl by_address req.hdr(host),field(1,:) -m reg ^[0-9.]+$", "acl by_address req.hdr(host) -m beg [",
        "acl by_address req.hdr(host),field(1,:),lower -m str localhost",
        "acl by_address req.hdr(host),field(1,:),lower -m end .localhost",
    ]  # fmt: skip


@pytest.mark.parametrize("routes_map", [None, "/m"])
def test_names_at_many_label_counts_are_grouped_once_a_render_not_once_a_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routes_map: str | None
) -> None:
    """helper-116 (/tmp/rev63): the shipped template looped over the label counts and filtered every
    dotted name at each, outside any cached block: registrations at 48 label counts made each render
    of 1,500 names 140 ms (2,000: ~400 ms), every change anywhere paying it on the event loop. The
    names are grouped in one pass (`by_labels`): as many identifiers asked at 12 counts as at 1."""
    from lab.stack import DEFAULT_TEMPLATE
    from renderer.haproxy import checked

    def asked(counts: int) -> int:
        names = {"web": ["lb"]} | {".".join([f"s{i}"] + ["a"] * (1 + i % counts)): ["lb"] for i in range(60)}
        data = catalog(names) | {HealthService(n).key: () for n in names}
        variables = {"routes_map": routes_map} if routes_map else {}
        renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg"), variables, environ={})
        renderer.render(Data(data))
        calls = [0]
        real = checked.hap_name

        def counted(value: object, reserved: tuple[str, ...] = ()) -> str:
            calls[0] += 1
            return real(value, reserved)

        with monkeypatch.context() as patched:
            patched.setattr(checked, "hap_name", counted)
            renderer.render(Data(data))  # the next render: what every change pays
        return calls[0]

    assert asked(12) == asked(1)


def test_by_labels_groups_names_by_their_identifiers_label_count_most_first() -> None:
    from renderer.render.template import by_labels

    names = ["api", "b.c", "api.v2.beta", "x.y", "api.v2", "a.b.c.d"]
    assert by_labels(names) == [(4, ["a.b.c.d"]), (3, ["api.v2.beta"]), (2, ["b.c", "x.y", "api.v2"])]
    assert by_labels([]) == []


def test_the_last_agreed_settings_are_forgotten_with_the_service(tmp_path: Path) -> None:
    text = "{% if key_or_default('on') %}{{ settings(service('web')).balance }}{% endif %}"
    r = renderer(tmp_path, text)
    agreed = web(entry("a", haproxy_balance="first"), entry("b", haproxy_balance="first"))
    split = web(entry("a", haproxy_balance="first"), entry("b", haproxy_balance="leastconn"))
    on = {KVKey("on").key: "1"}
    assert r.render(Data({**agreed, **on})).content == "first"
    assert r.render(Data({**split, **on})).content == "first"  # a rollout holds the agreed value
    assert r.render(Data({**split, KVKey("on").key: None})).content == ""  # no longer read: forgotten
    assert r.render(Data({**split, **on})).content == "None"


def test_the_guard_forgets_a_service_no_render_reads_any_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attacker's review: the anti-empty guard kept every service's last list for the process's
    life. Names cycled through grew it without bound (159 MB for 300 services of large meta), and
    `shop`, gone from the catalog and registered again later with no passing instance, was served
    its old instances for empty_grace, addresses that may be another host's by then."""
    from types import SimpleNamespace

    from renderer.render import template
    from renderer.render.flaps import HOLD_TURN_S, turn_after

    clock = [1000.0]
    monkeypatch.setattr(template, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    r = renderer(
        tmp_path, "{% for s in services('lb') %}{% for i in service(s.name) %}{{ i.address }} {% endfor %}{% endfor %}"
    )
    shop = HealthService("shop").key
    old = [entry("shop-1", service="shop"), entry("shop-2", node="n2", service="shop")]
    assert r.render(Data({**catalog({"shop": ["lb"]}), shop: HealthService("shop").parse(old)})).content
    r.render(Data({**catalog({}), shop: HealthService("shop").parse(old)}))  # shop leaves the catalog
    assert r._guard.states == {}
    again = [entry("shop-9", service="shop", status="critical")]
    got = r.render(Data({**catalog({"shop": ["lb"]}), shop: HealthService("shop").parse(again)}))
    assert got.content == "" and got.recheck_in is None
    for n in range(50):  # names cycled through, one a second: the guard holds only what is read now
        clock[0] += 1.0
        name = f"tmp{n}"
        data = Data(
            {
                **catalog({name: ["lb"]}),
                HealthService(name).key: HealthService(name).parse([entry("x", service=name)]),
            }
        )
        r.render(data)
    assert 1 < len(r._guard.states) <= 50  # the listing storms: the ones that left stay listed to the turn …
    clock[0] = turn_after(clock[0]) + HOLD_TURN_S  # (past its burst, a departure waits one turn at most)
    r.render(data)
    assert len(r._guard.states) == 1  # … and are forgotten once they leave it


def test_a_hostile_tag_is_left_out_of_services_not_the_whole_render(tmp_path: Path) -> None:
    """An attacker's review: `services()` handed catalog tags to templates unchecked; a template
    writing them (consul-template style) refused its whole render for one tag holding a newline,
    and every later update. The tag is left out now (the instance carrying it is reported where
    `service()` reads it)."""
    r = renderer(tmp_path, "{% for s in services() %}{{ s.name }} tags: {{ s.tags | join(',') }}\n{% endfor %}")
    got = r.render(Data(catalog({"evil": ["lb", "x\nbackend web", "ok"], "web": ["lb"]})))
    assert got.content == "evil tags: lb,ok\nweb tags: lb\n", got.error
