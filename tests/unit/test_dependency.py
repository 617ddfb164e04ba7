"""Dependencies: one key per datum a template reads, and how each Consul answer is read."""

from __future__ import annotations

import base64

from renderer.source.dependency import CatalogServices, HealthService, KVKey, unsafe_char


def entry(node: str, sid: str, address: str, port: int, checks: list[str], **service: object) -> dict[str, object]:
    return {
        "Node": {"Node": node, "Address": "10.9.9.9", "Datacenter": "dc1"},
        "Service": {"ID": sid, "Service": "web", "Address": address, "Port": port, **service},
        "Checks": [{"Status": status} for status in checks],
    }


def test_instances_come_sorted_by_node_then_id_with_their_worst_check() -> None:
    answer = [
        entry("n2", "b", "10.0.0.2", 80, ["passing", "critical"]),
        entry("n1", "a", "", 81, ["passing", "warning"], Tags=["z", "lb"], Meta={"weight": "5"}),
    ]
    first, second = HealthService("web").parse(answer)
    assert (first.node, first.id, first.address, first.port) == ("n1", "a", "10.9.9.9", 81)  # node address fills in
    assert first.tags == ("lb", "z") and first.weight == "5" and first.status == "warning"
    assert (second.id, second.status) == ("b", "critical")


def test_an_unsafe_character_is_found_and_named_with_its_origin() -> None:
    (instance,) = HealthService("web").parse([entry("n1", "a\nserver evil 1.2.3.4:80", "10.0.0.1", 80, [])])
    assert instance.unsafe is not None and "field ID" in instance.unsafe
    assert unsafe_char("fine") is None and unsafe_char("bad\r") is not None


def test_one_key_per_datum_and_the_tag_is_part_of_it() -> None:
    assert HealthService("web").key == "health.service(web)"
    assert HealthService("web", tag="lb").key == "health.service(web|tag=lb)"
    assert HealthService("web", tag="lb").request() == ("/v1/health/service/web", [("tag", "lb")])
    assert HealthService("a/b").request()[0] == "/v1/health/service/a%2Fb"


def test_kv_values_are_decoded_and_the_service_list_keeps_tags() -> None:
    encoded = base64.b64encode(b"on").decode()
    assert KVKey("feature/x").parse([{"Value": encoded}]) == "on"
    assert KVKey("missing").parse(None) is None
    assert CatalogServices().parse({"web": ["lb"], "consul": []}) == {"web": ("lb",), "consul": ()}


def test_a_port_that_is_no_int_leaves_out_its_instance_alone() -> None:
    """JSON reads 1e400 as infinity: int() of it raised OverflowError for the whole answer. A
    float, a string or a bool is now no port, and only that instance is left out."""
    entries = [
        {"Node": {"Node": "n1"}, "Service": {"ID": f"w{n}", "Service": "web", "Address": "10.0.0.1", "Port": port}}
        for n, port in enumerate([float("inf"), "80", True, 8080])
    ]
    instances = HealthService("web").parse(entries)
    assert [(i.id, i.port, bool(i.unsafe)) for i in instances] == [
        ("w0", 0, True), ("w1", 0, True), ("w2", 0, True), ("w3", 8080, False),
    ]  # fmt: skip


def test_an_entry_of_a_shape_consul_never_sends_leaves_out_that_instance_alone() -> None:
    """An attacker's review: one such entry failed the whole answer, so 199 good instances were
    kept stale (or, at start, the template waited for data that never came)."""
    bad = [
        entry("n9", "tags", "10.0.0.9", 80, [], Tags=[1, "a"]),
        entry("n9", "meta", "10.0.0.9", 80, [], Meta=["a"]),
        {**entry("n9", "checks", "10.0.0.9", 80, []), "Checks": 7},
        {"Node": [1], "Service": {"ID": {"a": 1}, "Service": "web"}},
        5,
    ]
    answer = [entry("n1", "good", "10.0.0.1", 80, ["passing"]), *bad]
    instances = HealthService("web").parse(answer)
    served = [i for i in instances if i.unsafe is None]
    assert [(i.id, i.endpoint, i.server_name != "") for i in served] == [("good", "10.0.0.1:80", True)]
    unsafe = sorted(i.unsafe for i in instances if i.unsafe is not None)
    assert len(unsafe) == len(bad)
    assert "service web, instance 'tags' on node 'n9': unreadable (TypeError)" in unsafe
    assert all(i.endpoint == "" for i in instances if i.unsafe is not None)


def test_a_huge_instance_id_or_node_name_is_cut_in_every_report() -> None:
    """A review's finding: Consul takes a 250 KB instance id; its left-out note quoted it whole, and
    each report (the log, the check, /status, the page) carried 250 KB per instance."""
    from renderer.source.dependency import HealthService

    huge = "i" * 250_000
    raw = [
        {
            "Node": {"Node": "n" * 250_000, "Address": "10.0.0.1"},
            "Service": {"ID": huge, "Service": "web", "Address": "10.0.0.2", "Port": "80"},  # a string: refused
            "Checks": [],
        }
    ]
    (instance,) = HealthService("web").parse(raw)
    assert instance.unsafe is not None and len(instance.unsafe) < 1000, len(instance.unsafe or "")
    assert "(250000 characters)" in instance.unsafe


def test_status_lists_at_most_a_thousand_left_out_items_a_template_and_counts_them_all() -> None:
    from renderer.status import Status
    from renderer.status.served import MAX_LEFT_OUT_LISTED

    status = Status(templates=1)
    status.set_left_out(
        "/x.cfg", tuple(f"service web, instance 'i{n}' on node 'n', field Port: bad" for n in range(1500))
    )
    snapshot = status.snapshot()
    assert len(snapshot["left_out"]["/x.cfg"]) == MAX_LEFT_OUT_LISTED == len(snapshot["left_out_reasons"]["/x.cfg"])
    assert snapshot["left_out_total"]["/x.cfg"] == 1500


def test_a_long_service_name_is_cut_in_reports_too() -> None:
    from renderer.source.dependency import HealthService

    name = "s" * 16_000
    raw = [{"Node": {"Node": "n", "Address": "10.0.0.1"}, "Service": {"ID": "i", "Service": name, "Port": "80"}}]
    (instance,) = HealthService(name).parse(raw)
    assert instance.unsafe is not None and len(instance.unsafe) < 1000
