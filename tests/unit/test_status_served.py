"""Reading what a live file serves, for the page and the check: tolerant, and counted from one reading."""

from __future__ import annotations

import random

from renderer.errors import ApplyKind
from renderer.status.served import (
    LEFT_OUT_CHARS,
    MAX_LEFT_OUT_LISTED,
    MAX_SERVERS_LISTED,
    BackendReader,
    LeftOut,
    Served,
    read_backends,
    section_chunks,
)

CONFIG = """\
global
    maxconn 100
backend web
    balance roundrobin
    server a 10.0.0.1:80 check weight 5
    server b 10.0.0.2:80 check disabled  # in maintenance
    server c [2001:db8::1]:80 backup
backend empty
    # nobody
listen stats
    bind :1936
listen tcp-db
    bind :5432
    server db 10.0.0.9:5432 check
ring logs
    server syslog 10.0.0.10:514
"""


def test_backends_and_servers_with_address_weight_and_state() -> None:
    backends = read_backends(CONFIG)
    assert [b.name for b in backends] == ["web", "empty", "tcp-db"]  # a listen without servers is no backend
    a, b, c = backends[0].servers
    assert (a.name, a.address, a.weight, a.state, a.checked) == ("a", "10.0.0.1:80", 5, "active", True)
    assert (b.state, b.weight) == ("maintenance", 1)
    assert (c.address, c.state, c.checked) == ("[2001:db8::1]:80", "backup", False)


def test_the_counts_of_the_check_come_from_the_same_reading_as_the_listing() -> None:
    served = Served.of(CONFIG, ApplyKind.RELOAD, 0.1)
    assert served.counts[:2] == (3, 4)  # the ring's server line is no backend server
    assert "3 backend(s), 4 server(s)" in served.describe("haproxy.cfg")


def test_odd_lines_never_raise() -> None:
    assert read_backends("backend\nserver\nserver x\nbackend b\n    server s 'unclosed quote weight x\n")[1].servers


LINES = (
    "backend b{n}", "  backend i{n}", "listen l{n}", "frontend f", "global", "ring r", "# backend c{n}",
    "    server s{n} 10.0.0.{n}:80 check", "server t{n} 10.1.0.{n}:80 backup", "\tserver u{n} 10.2.0.1:80 disabled",
    "backend\u00a0nb{n}", "    server v{n} 10.3.0.1:80 weight {n} # c", "", "   ", "backend# x", "defaults d{n}",
)  # fmt: skip
BREAKS = ("\n", "\n", "\n", "\r\n", "\r", "\u2028", "\x0c", "\x1c")


def hostile_config(rng: random.Random, lines: int) -> str:
    """Section and server lines, indented or not, with every line break `str.splitlines` knows."""
    return "".join(rng.choice(LINES).format(n=rng.randrange(300)) + rng.choice(BREAKS) for _ in range(lines))


def test_the_reader_that_remembers_sections_reads_exactly_what_the_whole_reading_does() -> None:
    rng, reader = random.Random(7), BackendReader()
    for _ in range(300):
        text = hostile_config(rng, rng.randrange(40))
        assert reader.read(text) == read_backends(text), text
        assert "".join(section_chunks(text)) == text


def test_after_a_change_only_the_changed_sections_are_read_again() -> None:
    base = "".join(f"backend b{n}\n    server s{n} 10.0.0.1:80\n" for n in range(50))
    first = Served.of(base, ApplyKind.RELOAD, 0.1)
    assert first.counts[:2] == (50, 50)
    changed = base.replace("    server s7 10.0.0.1:80\n", "    server s7 10.0.0.1:80\n    server x 10.0.0.2:80\n")
    second = Served.of(changed, ApplyKind.RUNTIME, 0.1, previous=first)
    assert second.previous == base
    kept = {id(views) for views in first.reader._memo.values()}
    assert second.counts[:2] == (50, 51)
    reused = [views for views in second.reader._memo.values() if id(views) in kept]
    assert len(reused) == 49  # every section but b7 came from the memory, not from a new reading


def test_the_listing_is_bounded_but_the_counts_stay_whole() -> None:
    many = "backend big\n" + "".join(f"    server s{n} 10.0.{n // 250}.{n % 250}:80\n" for n in range(1500))
    served = Served.of(many, ApplyKind.RUNTIME, 0.1)
    listing = served.listing()
    assert len(listing[0]["servers"]) == MAX_SERVERS_LISTED and listing[0]["more"] == 1500 - MAX_SERVERS_LISTED
    assert served.as_dict()["servers"] == 1500


def test_a_templates_left_out_comments_are_bounded_like_the_renderers_own_notes() -> None:
    """A custom template may write a Consul value into its `# left out:` comments: each is cut to
    LEFT_OUT_CHARS and at most MAX_LEFT_OUT_LISTED are listed (the total counts them all), in the
    check line, /status and the page alike."""
    huge = "x" * 200_000
    notes = "".join(f"# left out: {huge}{n}\n" for n in range(MAX_LEFT_OUT_LISTED + 5))
    served = Served.of(CONFIG + notes, ApplyKind.RELOAD, 0.1)
    shown = served.as_dict()
    assert shown["left_out_total"] == MAX_LEFT_OUT_LISTED + 5 and len(shown["left_out"]) == MAX_LEFT_OUT_LISTED
    assert all(len(note) <= LEFT_OUT_CHARS + 30 for note in shown["left_out"])
    assert shown["left_out"][0].endswith("(200001 characters)")
    assert len(served.describe("haproxy.cfg")) < 4 * (LEFT_OUT_CHARS + 30)


def test_a_left_out_item_splits_into_what_and_why() -> None:
    item = "service web, instance 'x:1' on node 'n', field Meta[weight]: weight '257' is not 0-256"
    assert LeftOut.parse(item) == LeftOut(
        "service web, instance 'x:1' on node 'n', field Meta[weight]", "weight '257' is not 0-256"
    )
    part = "backend web: server line 'server a bad:80' left out (haproxy -c: could not resolve address 'bad')"
    assert LeftOut.parse(part).what == "backend web"
    assert LeftOut.parse("no colon here") == LeftOut("no colon here", "")


def test_a_service_name_that_reads_like_a_report_is_quoted_and_splits_nothing() -> None:
    """An attacker's review: a printable name was shown bare, so a service named
    `payments, instance 'pay-7' on node 'pay-host-2', field Address: drained by operator` named an
    instance that does not exist in the log, the Consul check and /status, where the item was
    split at the first `, field …:`, the one inside the name."""
    from renderer.source.dependency import HealthService

    name = "payments, instance 'pay-7' on node 'pay-host-2', field Address: drained by operator"
    entry = {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Service": {"ID": "x", "Service": name, "Port": 0}}
    (instance,) = HealthService(name).parse([entry])
    assert instance.unsafe is not None and instance.unsafe.startswith(f"service {name!r}, instance 'x'")
    parsed = LeftOut.parse(instance.unsafe)
    assert parsed.what == f"service {name!r}, instance 'x' on node 'n1', field Port"
    assert "port" in parsed.why.lower()


def test_a_weight_int_refuses_is_read_as_the_default_not_raised() -> None:
    """An attacker's review: '²' is a digit to str.isdigit and not to int(), and a 5,000-digit
    weight passes int()'s limit; either raised from the view (/status answered 500, and the
    self-registration task died for good)."""
    for weight in ("²", "9" * 5000, "٣"):
        (backend,) = read_backends(f"backend b\n    server a 10.0.0.1:80 check weight {weight}\n")
        assert backend.servers[0].weight == 1
