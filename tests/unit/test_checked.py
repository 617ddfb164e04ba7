"""The typed boundary: hostile catalog values are refused for the context they would be written into."""

from __future__ import annotations

import pytest

from renderer.haproxy import checked
from renderer.haproxy.checked import (
    NAME_HOLD_S,
    Holder,
    address_problem,
    endpoint,
    hap_name,
    path_problem,
    port_problem,
    server_name,
    unique_names,
    weight_problem,
)
from renderer.source.dependency import HealthService


@pytest.mark.parametrize("good", ["10.0.0.1", "::1", "fe80::1", "2001:db8::7", "web-1.example.internal", "a"])
def test_addresses_haproxy_reads_as_meant(good: str) -> None:
    assert address_problem(good) is None


@pytest.mark.parametrize(
    "bad",
    [
        'fe80::1%x";@1 disable frontend http;"',  # a zone id carrying a CLI command
        'fe80::1%a"',  # an unmatched quote
        "fe80::1%eth0",  # any zone id at all
        "10.0.0.1;disable frontend http",
        "10.0.0.1 weight 0",
        "host#comment",
        "host\\name",
        "-leading-dash",
        "under_score.example",
        "ünïcode.example",
        "a" * 64 + ".example",  # a label over 63 characters
        "x." * 130,  # over 253 characters
        "",
        "10.0.0.1:80",
        "[::1]",
    ],
)
def test_addresses_refused_with_the_value_named(bad: str) -> None:
    problem = address_problem(bad)
    assert problem is not None
    assert repr(bad)[1:9] in problem or not bad


@pytest.mark.parametrize("bad", [0, -1, 65536, 10**30, True, "80", None, 8.0])
def test_ports_outside_1_to_65535_are_refused(bad: object) -> None:
    assert port_problem(bad) is not None
    assert port_problem(65535) is None and port_problem(1) is None


@pytest.mark.parametrize("bad", ["257", "-1", "1e3", " 5", "5 ", "٣", "８", "0x10", "", "99999999999", "5;x"])
def test_weights_are_0_to_256_in_ascii_digits(bad: str) -> None:
    assert weight_problem(bad) is not None
    assert weight_problem("0") is None and weight_problem("256") is None


@pytest.mark.parametrize("bad", ["/x'", '/x"', "/x y", "/x#y", "/x\\y", "/x;y", "/$VAR", "x", "", "/" + "a" * 2000])
def test_paths_use_an_explicit_character_set(bad: str) -> None:
    assert path_problem(bad) is not None
    assert path_problem("/health") is None and path_problem("/api/v1/health?x") is not None


def test_endpoints_bracket_ipv6() -> None:
    assert endpoint("::1", 8080) == "[::1]:8080"
    assert endpoint("10.0.0.1", 80) == "10.0.0.1:80"


def test_names_stay_distinct_and_reserved_names_get_a_suffix() -> None:
    assert hap_name("api") == "api"
    assert hap_name("api!") != hap_name("api?")
    assert hap_name("api!").startswith("api__")
    assert hap_name("stats", ("stats",)).startswith("stats_")
    assert hap_name("looks_like_0123abcd") != "looks_like_0123abcd"  # a suffix-shaped name is renamed too
    long = "a" * 500
    assert len(hap_name(long)) < 110


def test_a_forged_collision_is_refused_never_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two renamed names whose 8-hex suffixes collide (a registrant can search for that): neither
    # is its own identifier, so neither gets it.
    monkeypatch.setattr(checked, "hap_name", lambda name, reserved=(): "api__0badc0de")
    kept, refused = unique_names([("1", "api!"), ("2", "api?")])
    assert kept == {} and set(refused) == {"1", "2"}
    assert "would become the HAProxy name 'api__0badc0de'" in refused["2"]


def test_two_instances_of_the_very_same_name_keep_one() -> None:
    # node "web_1" id "x", and node "web" id "1_x": the same joined name; the first keeps it.
    kept, refused = unique_names([("a", "web_1_x"), ("b", "web_1_x")])
    assert kept == {"a": "web_1_x"} and set(refused) == {"b"}


def entry(
    node: str, sid: str, address: str, port: object = 80, meta: dict[str, str] | None = None
) -> dict[str, object]:
    return {
        "Node": {"Node": node, "Address": "10.9.9.9"},
        "Service": {"ID": sid, "Service": "web", "Address": address, "Port": port, "Meta": meta or {}},
        "Checks": [],
    }


def test_instances_are_checked_where_the_answer_is_taken_in() -> None:
    parsed = HealthService("web").parse(
        [
            entry("n1", "good", "10.0.0.1"),
            entry("n2", "v6", "::1", 8080),
            entry("n3", "zone", 'fe80::1%x";@1 disable frontend http;"'),
            entry("n4", "heavy", "10.0.0.4", meta={"weight": "257"}),
            entry("n5", "quote", "10.0.0.5", meta={"health_path": "/x'"}),
            entry("n6", "port", "10.0.0.6", port=70000),
            entry("web_1", "x", "10.0.0.7"),
            entry("web~1", "x", "10.0.0.8"),
        ]
    )
    by_id = {i.id: i for i in parsed}
    assert by_id["good"].endpoint == "10.0.0.1:80" and by_id["good"].server_name == "n1_good"
    assert by_id["v6"].endpoint == "[::1]:8080" and by_id["v6"].unsafe is None
    assert "field Address" in (by_id["zone"].unsafe or "") and by_id["zone"].endpoint == ""
    assert "field Meta[weight]" in (by_id["heavy"].unsafe or "")
    assert "field Meta[health_path]" in (by_id["quote"].unsafe or "")
    assert "field Port" in (by_id["port"].unsafe or "")
    names = [i.server_name for i in parsed if i.unsafe is None]
    assert len(names) == len(set(names)) == 4  # web_1_x and web~1_x both served, under two names


def test_a_server_name_stays_with_the_instance_registered_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration made to share a served instance's server name (a case variant, or an 8-hex
    hash collision a registrant can search for) took both out of the backend, or the served one
    alone. The instance Consul registered first (CreateIndex) keeps it; the newcomer is left out."""
    legit, squat = entry("n1", "Web1", "10.0.0.1"), entry("n1", "web1", "10.0.0.66")
    legit["Service"]["CreateIndex"], squat["Service"]["CreateIndex"] = 5, 9  # type: ignore[index]
    for answer in ([legit, squat], [squat, legit]):  # whatever the answer's order
        parsed = {i.id: i for i in HealthService("web").parse(answer)}
        assert parsed["Web1"].server_name == "n1_Web1" and parsed["Web1"].unsafe is None
        assert "registered before it" in (parsed["web1"].unsafe or "") and parsed["web1"].endpoint == ""
    from renderer.source import dependency

    monkeypatch.setattr(dependency, "server_name", lambda node, sid: "n_collided_0badc0de")  # a found collision
    parsed = {i.id: i for i in HealthService("web").parse([squat, legit])}
    assert parsed["Web1"].server_name == "n_collided_0badc0de" and parsed["web1"].unsafe is not None


def test_a_case_variant_never_takes_a_name() -> None:
    kept, refused = unique_names([("1", "Api"), ("2", "api"), ("3", "API")])
    assert kept == {"2": "api"} and set(refused) == {"1", "3"}
    kept, refused = unique_names([("1", "Api"), ("2", "API")])
    assert kept == {} and set(refused) == {"1", "2"}
    # the one that had the name keeps it, whatever its case, and for NAME_HOLD_S after it left
    held = {"api": Holder("API", "API")}
    kept, _ = unique_names([("1", "Api"), ("2", "api"), ("3", "API")], holders=held)
    assert kept == {"3": "API"}
    gone = {"api": Holder("API", "API", gone_at=100.0)}
    kept, refused = unique_names([("1", "Api"), ("2", "api")], holders=gone, now=100.0 + NAME_HOLD_S - 1)
    assert kept == {} and "'API' had until 599 s ago" in refused["2"]
    kept, _ = unique_names([("2", "api")], holders=gone, now=100.0 + NAME_HOLD_S)
    assert kept == {"2": "api"}


def test_a_name_ending_like_a_suffix_in_upper_case_is_renamed_too() -> None:
    """An attacker's review (/tmp/rev37): `_SUFFIXED` matched lower-case hex only, so
    `pay_ments_DC01D809` was kept as it is and, equal without case to the suffixed name of
    `pay@ments`, took it (or, with no holds, had both refused) with no search at all."""
    victim = hap_name("pay@ments")
    attacker = victim[:-8] + victim[-8:].upper()  # `pay_ments_DC01D809`
    assert attacker != victim and hap_name(attacker).lower() != victim.lower()
    kept, refused = unique_names([("victim", "pay@ments"), ("attacker", attacker)])
    assert kept["victim"] == victim and "attacker" not in refused  # two names now: no clash at all
    legit = server_name("rack_1", "api")
    squat = server_name("rack", "1_api" + legit[-9:].upper())
    assert squat.lower() != legit.lower()


def test_server_names_cannot_be_squatted_through_underscores() -> None:
    assert server_name("n1", "web-1") == "n1_web-1"
    legit, squat = server_name("rack_1", "api-1"), server_name("rack", "1_api-1")
    assert squat == "rack_1_api-1" and legit != squat  # a node with `_` always gets a suffix


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "::ffff:0.0.0.0", "0", "127.1", "2130706433", "0177.0.0.1"])
def test_unspecified_and_numeric_host_forms_are_refused(bad: str) -> None:
    assert address_problem(bad) is not None
    assert address_problem("db1.example") is None and address_problem("localhost") is None


@pytest.mark.parametrize("bad", ["0x7f000001", "127.0.0.0x1", "0x7f.0x1", "0XA9.0xFE.0xa9.0xfe", "0x0"])
def test_hex_forms_of_an_ipv4_address_are_no_host_names(bad: str) -> None:
    """They match the host-name grammar (a label holds a letter), but the resolver reads them as
    addresses (loopback, the metadata service): with allow_host_names they passed the policy."""
    assert "numeric form" in (address_problem(bad) or "")
    assert address_problem("0xdeadbeef.com") is None and address_problem("deadbeef") is None


@pytest.mark.parametrize("value", ["500us", "1us", "30s", "2m", "24d", "596h", "2147483647ms", "2147483s"])
def test_a_time_haproxy_takes_is_accepted(value: str) -> None:
    assert checked.time_problem(value) is None


@pytest.mark.parametrize("value", ["0", "0ms", "0us", "25d", "597h", "2147483648ms", "2147484s", "9999999d"])
def test_a_time_haproxy_refuses_or_turns_off_is_refused(value: str) -> None:
    """Measured with haproxy -c (2.8): past 2147483647 ms is "timer overflow", and the whole
    backend was quarantined; 0 turns a timeout off ("you will certainly encounter various problems")."""
    assert "is not a time from 1us to 24d" in (checked.time_problem(value) or "")


@pytest.mark.parametrize(
    ("address", "reach"),
    [
        ("127.0.0.1", checked.Reach.LOCAL),
        ("127.8.9.10", checked.Reach.LOCAL),
        ("::1", checked.Reach.LOCAL),
        ("::ffff:127.0.0.1", checked.Reach.LOCAL),  # IPv4-mapped: judged by the IPv4 address
        ("::ffff:169.254.169.254", checked.Reach.LOCAL),
        ("169.254.169.254", checked.Reach.LOCAL),  # the cloud metadata service
        ("fd00:ec2::254", checked.Reach.LOCAL),  # AWS's metadata over IPv6 (unique-local otherwise)
        ("100.100.100.200", checked.Reach.LOCAL),  # Alibaba Cloud's metadata (shared range otherwise)
        ("168.63.129.16", checked.Reach.LOCAL),  # Azure's host endpoint (global otherwise)
        ("::ffff:168.63.129.16", checked.Reach.LOCAL),
        ("fe80::1", checked.Reach.LOCAL),
        ("0.0.0.0", checked.Reach.LOCAL),
        ("::", checked.Reach.LOCAL),
        ("224.0.0.1", checked.Reach.LOCAL),
        ("ff02::1", checked.Reach.LOCAL),
        ("240.0.0.1", checked.Reach.LOCAL),
        ("255.255.255.255", checked.Reach.LOCAL),
        ("localhost", checked.Reach.LOCAL),
        ("app.localhost", checked.Reach.LOCAL),
        ("10.0.0.5", checked.Reach.PRIVATE),
        ("192.168.1.2", checked.Reach.PRIVATE),
        ("172.16.0.9", checked.Reach.PRIVATE),
        ("fd00::5", checked.Reach.PRIVATE),
        ("::ffff:10.0.0.5", checked.Reach.PRIVATE),
        ("192.0.2.1", checked.Reach.PRIVATE),  # documentation range: not global, not on this host
        ("8.8.8.8", checked.Reach.PUBLIC),
        ("2001:4860:4860::8888", checked.Reach.PUBLIC),
        ("web-1.example.internal", checked.Reach.NAME),
        ("db", checked.Reach.NAME),
    ],
)
def test_address_reach(address: str, reach: checked.Reach) -> None:
    assert checked.address_reach(address) is reach


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "169.254.169.254", "224.0.0.1", "localhost"]
)
def test_the_default_policy_refuses_local_addresses_and_says_how_to_allow_them(address: str) -> None:
    why = checked.AddressPolicy().refusal(address)
    assert why is not None and why.startswith(f"{address!r} is refused: ")
    assert "allow_local_addresses = true" in why and "--allow-local-addresses true" in why
    assert "CONSUL_RENDERER_ALLOW_LOCAL_ADDRESSES" in why
    assert checked.AddressPolicy(local=True).refusal(address) is None


def test_the_default_policy_refuses_host_names_and_says_how_to_allow_them() -> None:
    why = checked.AddressPolicy().refusal("web-1.example.internal")
    assert why is not None and why.startswith("'web-1.example.internal' is refused: ")
    assert "allow_host_names = true" in why and "--allow-host-names true" in why and "DNS" in why
    assert checked.AddressPolicy(names=True).refusal("web-1.example.internal") is None
    assert checked.AddressPolicy(local=True).refusal("web-1.example.internal") is not None


@pytest.mark.parametrize("address", ["10.0.0.5", "192.0.2.1", "8.8.8.8", "2001:db8::7", "fd00::5"])
def test_the_default_policy_serves_private_and_public_addresses(address: str) -> None:
    assert checked.AddressPolicy().refusal(address) is None


def test_allowing_names_never_allows_a_local_name() -> None:
    assert checked.AddressPolicy(names=True).refusal("localhost") is not None
    assert checked.AddressPolicy(names=True, local=True).refusal("localhost") is None


def test_the_instance_knows_its_address_and_reach() -> None:
    node = {"Node": "n1", "Address": "10.9.9.9"}
    (own, inherited) = HealthService("web").parse(
        [
            {"Node": node, "Service": {"ID": "a", "Service": "web", "Address": "127.0.0.1", "Port": 80}},
            {"Node": node, "Service": {"ID": "b", "Service": "web", "Address": "", "Port": 80}},
        ]
    )
    assert own.where == "127.0.0.1" and own.reach is checked.Reach.LOCAL
    assert inherited.where == "10.9.9.9" and inherited.reach is checked.Reach.PRIVATE


def test_values_longer_than_any_address_or_name_stay_out_of_the_caches() -> None:
    """A registrant's 2,000 distinct 100 KB addresses kept +192 MB in the caches (a review's
    measurement; up to 65,536 entries each). They are refused, or named, without being kept."""
    address_cache, name_cache = (
        checked._address_problem.cache_info().currsize,
        checked._cached_hap_name.cache_info().currsize,
    )
    long = "a" * 100_000
    assert "is longer than any address (253)" in (address_problem(long + ".example") or "")
    assert hap_name(long).startswith("a" * 96 + "_")
    assert checked._address_problem.cache_info().currsize == address_cache
    assert checked._cached_hap_name.cache_info().currsize == name_cache
    assert address_problem("a" * 63 + ".example") is None  # a long but real name is still taken


def test_the_address_policy_keeps_a_text_longer_than_any_address_out_of_its_caches() -> None:
    """nodes() and _within_policy ask the policy about node addresses not checked before (a
    review: 200 nodes with 100 KB addresses kept 20 MB in its caches)."""
    before = checked._refusal.cache_info().currsize, checked.address_reach.cache_info().currsize
    assert "is longer than any address" in (checked.AddressPolicy().refusal("b" * 100_000) or "")
    assert (checked._refusal.cache_info().currsize, checked.address_reach.cache_info().currsize) == before
