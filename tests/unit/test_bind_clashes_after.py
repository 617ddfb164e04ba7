"""The bind-clash check after a change: answered from the last clash-free content when the change
touched no bind line, and always the same answer as a full scan."""

from __future__ import annotations

from pathlib import Path

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


LIVE_SECTIONS = [*SECTIONS, "listen a-first\n    bind *:5432\n    server f 10.0.0.6:5432\n"]  # sorts before db


@settings(max_examples=300, deadline=None)
@given(before=configs, after=st.lists(st.sampled_from(LIVE_SECTIONS), min_size=1, max_size=6).map("\n".join),
       live=configs)  # fmt: skip
def test_with_a_live_file_the_answer_is_a_full_scans(tmp_path_factory: pytest.TempPathFactory, before: str,
                                                      after: str, live: str) -> None:  # fmt: skip
    live_at = tmp_path_factory.mktemp("live") / "haproxy.cfg"
    live_at.write_text(live)
    before_free = None if duplicate_binds(before, live)[1] else before
    assert facts(duplicate_binds_after(after, before_free, live_at)) == facts(duplicate_binds(after, live))


def test_a_new_clash_leaves_out_the_newcomer_not_the_live_listener(tmp_path: Path) -> None:
    """The change adds a section that sorts first and asks for the port a live one serves."""
    live_at = tmp_path / "haproxy.cfg"
    before = SECTIONS[0] + "\n" + SECTIONS[3]
    live_at.write_text(before)
    after = SECTIONS[0] + "\n" + LIVE_SECTIONS[-1] + "\n" + SECTIONS[3]
    content, clashes = duplicate_binds_after(after, before, live_at)
    assert [part.section for part in clashes] == ["listen a-first"]
    assert content == before and "serves it now" in clashes[0].reason


def test_a_live_file_that_cannot_be_read_leaves_the_first_rule(tmp_path: Path) -> None:
    """No live file (first render), or one that is not a regular file: the first section keeps it."""
    after = SECTIONS[0] + "\n" + LIVE_SECTIONS[-1] + "\n" + SECTIONS[3]
    (tmp_path / "dir").mkdir()
    for live_at in (tmp_path / "absent", tmp_path / "dir"):
        assert [part.section for part in duplicate_binds_after(after, None, live_at)[1]] == ["listen db"]
