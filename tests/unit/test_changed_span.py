"""The cost of a change follows the change: only the span of sections around it is compared.

The span-based plan and summary must say exactly what comparing the whole files says: the
membership generated on both sides, and a whole-file multiset of lines, are the oracles.
"""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from renderer.deliver.change import ConfigChange
from renderer.deliver.runtime import plan_runtime
from renderer.haproxy.config_text import changed_span, common_prefix, common_suffix, defaults_before, split_raw

HEAD = "# rendered\nglobal\n    maxconn 100\n\ndefaults\n    mode http\n    default-server inter 2s check\n\n"


def config(backends: list[list[int]], frontend: str = "frontend f\n    bind :80\n") -> str:
    parts = [HEAD, frontend]
    for b, ports in enumerate(backends):
        parts.append(f"backend b{b}\n    balance roundrobin\n")
        parts += [f"    server s{p} 10.0.0.{p % 250 + 1}:{8000 + p} weight {p % 3 + 1}\n" for p in ports]
    return "".join(parts) + "listen stats\n    bind :1936\n"


backends = st.lists(st.lists(st.integers(0, 30), max_size=6, unique=True), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(backends, backends)
def test_the_span_holds_every_difference_and_cuts_on_section_headers(a: list[list[int]], b: list[list[int]]) -> None:
    old, new = config(a), config(b)
    start, old_end, new_end = changed_span(old, new)
    assert old[:start] == new[:start]
    assert old[old_end:] == new[new_end:]
    for text, end in ((old, old_end), (new, new_end)):
        section_starts = {len(text)}
        offset = 0
        for chunk in split_raw(text):
            section_starts.add(offset)
            offset += len(chunk)
        assert {start, end} <= section_starts


@settings(max_examples=200, deadline=None)
@given(backends, st.data())
def test_the_plan_from_the_span_equals_the_plan_from_every_section(a: list[list[int]], data: st.DataObject) -> None:
    b = [list(ports) for ports in a]
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.integers(0, len(b) - 1))
        b[target] = data.draw(st.lists(st.integers(0, 30), max_size=6, unique=True))
    old, new = config(a), config(b)
    plan = plan_runtime(old, new)
    assert plan is not None
    applied = {(c.action, c.backend, c.server.name) for c in plan}
    expected = set()
    for i, (before, after) in enumerate(zip(a, b, strict=True)):
        for p in set(after) - set(before):
            expected.add(("add", f"b{i}", f"s{p}"))
        for p in set(before) - set(after):
            expected.add(("remove", f"b{i}", f"s{p}"))
    assert applied == expected
    assert all(c.defaults == (("inter", "2s"), ("check", None)) for c in plan if c.action == "add")


def test_a_structural_change_far_from_the_membership_change_still_needs_a_reload() -> None:
    old = config([[1, 2], [3]])
    new = config([[1, 2, 4], [3]], frontend="frontend f\n    bind :81\n")
    assert plan_runtime(old, new) is None
    assert plan_runtime(old, old.replace("maxconn 100", "maxconn 200")) is None
    assert plan_runtime(old, old + "backend extra\n") is None


def test_defaults_are_found_however_far_back_they_are() -> None:
    text = config([[p] for p in range(300)])
    at = text.index("backend b299")
    assert defaults_before(text, at) == "defaults\n    mode http\n    default-server inter 2s check\n\n"
    assert defaults_before(text, text.index("defaults")) is None
    assert defaults_before("backend x\n    # defaults here is a comment\n", 30) is None


@given(st.text(alphabet="ab\n", max_size=40), st.text(alphabet="ab\n", max_size=40))
def test_common_prefix_and_suffix_are_exact(a: str, b: str) -> None:
    p = common_prefix(a, b)
    assert a[:p] == b[:p] and (p == min(len(a), len(b)) or a[p] != b[p])
    s = common_suffix(a, b, p)
    assert s <= min(len(a), len(b)) - p
    assert a[len(a) - s :] == b[len(b) - s :]
    assert s == min(len(a), len(b)) - p or a[len(a) - s - 1] != b[len(b) - s - 1]


def test_common_prefix_of_large_texts_crosses_blocks() -> None:
    a = "x" * 200_000 + "a" + "y" * 100_000
    b = "x" * 200_000 + "b" + "y" * 100_000
    assert common_prefix(a, b) == 200_000
    assert common_suffix(a, b, 200_000) == 100_000


@settings(max_examples=200, deadline=None)
@given(backends, backends)
def test_the_summary_counts_what_a_whole_file_multiset_counts(a: list[list[int]], b: list[list[int]]) -> None:
    old, new = config(a), config(b)
    before, after = collections.Counter(old.splitlines()), collections.Counter(new.splitlines())
    added, removed = sum((after - before).values()), sum((before - after).values())
    assert ConfigChange.of(new, old, old.encode(), hitless=False).summary.startswith(f"+{added} -{removed} lines")


def test_a_change_after_a_refused_reload_is_compared_with_what_haproxy_runs() -> None:
    """helper-150's F1: pending after a refused reload, the change was compared with the live file,
    the refused one; what HAProxy's old workers run is known then (`serving`)."""
    from renderer.deliver.change import ConfigChange

    served, refused = "listen pg\n    bind *:5432\n", "listen pg\n    bind *:6379\n"
    change = ConfigChange.of(served, None, refused.encode(), hitless=True, serving=served)
    assert change.base == served
    assert ConfigChange.of(served, None, refused.encode(), hitless=True).base == refused
