"""The bind-clash check after a change: answered from the last clash-free content when the change
touched no bind line, and always the same answer as a full scan."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from renderer.deliver.quarantine import LeftOut, duplicate_binds, duplicate_binds_after

SECTIONS = [
    "frontend http\n    bind *:80\n    default_backend web\n",
    "backend web\n    server a 10.0.0.1:80\n",
    "backend web\n    server a 10.0.0.1:80\n    server b 10.0.0.2:80\n",
    "listen db\n    bind *:5432\n    server d 10.0.0.3:5432\n",
    "listen cache\n    bind *:5432\n    server c 10.0.0.4:6379\n",  # the port db binds
    "listen cache\n    bind *:6379\n    server c 10.0.0.4:6379\n",
    "backend api\n    server x 10.0.0.5:80\n",
]
configs = st.lists(st.sampled_from(SECTIONS), min_size=1, max_size=6).map("\n".join)


@settings(max_examples=300, deadline=None)
@given(before=configs, after=configs)
def test_the_answer_is_a_full_scans(before: str, after: str) -> None:
    before_free = None if duplicate_binds(before)[1] else before  # only clash-free content is remembered
    assert facts(duplicate_binds_after(after, before_free)) == facts(duplicate_binds(after))


def facts(found: tuple[str, list[LeftOut]]) -> tuple[str, list[tuple[str, str, str, str]]]:
    content, parts = found
    return content, [(p.section, p.text, p.replacement, p.reason) for p in parts]  # not when


def test_a_membership_change_needs_no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    before = SECTIONS[0] + "\n" + SECTIONS[1] + "\n" + SECTIONS[3]
    after = before.replace(SECTIONS[1], SECTIONS[2])
    monkeypatch.setattr("renderer.deliver.quarantine.bind_addresses", lambda text: 1 / 0)
    assert duplicate_binds_after(after, before) == (after, [])


def test_a_new_clash_is_found() -> None:
    before = SECTIONS[0] + "\n" + SECTIONS[3]
    after = before + "\n" + SECTIONS[4]
    content, clashes = duplicate_binds_after(after, before)
    assert [part.section for part in clashes] == ["listen cache"] and "cache" not in content
