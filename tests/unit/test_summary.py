"""Service summaries: which services a catalog move touched, or nothing when we cannot tell."""

from __future__ import annotations

from renderer.source.summary import ServiceSummaries


def item(name: str, count: int, tags: list[str] | None = None, passing: int = 0) -> dict[str, object]:
    return {"Name": name, "InstanceCount": count, "Tags": tags or [], "ChecksPassing": passing, "Nodes": ["n"]}


def test_the_first_answer_is_the_baseline_then_differences_are_named() -> None:
    summaries = ServiceSummaries()
    assert summaries.changed([item("a", 1), item("b", 2)]) is None
    assert summaries.changed([item("a", 1), item("b", 3)]) == {"b"}  # an instance came
    assert summaries.changed([item("a", 1, ["x"]), item("b", 3)]) == {"a"}  # tags changed
    assert summaries.changed([item("b", 3), item("c", 1)]) == {"a", "c"}  # a service went, one came
    assert summaries.changed([item("b", 3), item("c", 1)]) == set()  # e.g. an address change: the caller sweeps


def test_an_answer_of_unknown_shape_turns_the_summaries_off() -> None:
    summaries = ServiceSummaries()
    assert summaries.changed({"not": "a list"}) is None
    assert not summaries.usable
    summaries.turn_off("again")  # said once
    assert summaries.last is None


def test_a_count_of_infinity_turns_the_summaries_off_instead_of_killing_the_sweeps() -> None:
    """A review's finding: JSON 1e400 is read as infinity and int(inf) raised OverflowError, which
    escaped into the sweep loop: its task died and no change was followed any more."""
    import json

    summaries = ServiceSummaries()
    assert summaries.changed(json.loads('[{"Name": "a", "InstanceCount": 1e400}]')) is None
    assert not summaries.usable
