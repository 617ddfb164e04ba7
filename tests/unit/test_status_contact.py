"""The contact with Consul and the data's age, read from the watcher's own bookkeeping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from renderer.status.contact import ContactReader, Freshness


@dataclass
class Key:
    index: int = 0
    has_data: bool = False
    updated_at: float = 0.0


@dataclass
class FakeStore:
    keys: dict[str, Key] = field(default_factory=dict)
    last_error: str | None = None
    failing_keys: int = 0

    def failing(self) -> int:
        return self.failing_keys


@dataclass
class FakeWatcher:
    watched: int = 2
    budgeted: bool = False


def reader(store: FakeStore, outage_since: float | None = None, started: float | None = None) -> ContactReader:
    return ContactReader(
        "http://127.0.0.1:8500", store, FakeWatcher(), 64, 60.0, lambda: outage_since,
        started=time.monotonic() if started is None else started,
    )  # fmt: skip


def test_while_consul_answers_the_data_is_current() -> None:
    now = time.monotonic()
    store = FakeStore({"a": Key(12, True, now - 300), "b": Key(15, True, now - 5)})
    contact = reader(store, started=now - 1000).read()
    assert contact.data_age_s == 0.0 and contact.freshness is Freshness.FRESH
    assert contact.index == 15 and contact.last_data_at == pytest.approx(time.time() - 5, abs=1)
    assert contact.budget() == "2 blocking queries (one per key) within a budget of 64 connections"


def test_during_an_outage_the_age_counts_from_its_start() -> None:
    now = time.monotonic()
    store = FakeStore({"a": Key(12, True, now - 300)}, last_error="refused", failing_keys=1)
    contact = reader(store, outage_since=now - 75).read()
    assert contact.data_age_s == pytest.approx(75, abs=1) and contact.freshness is Freshness.WARNING
    assert contact.failing_since == pytest.approx(time.time() - 75, abs=1)
    assert "1 of 2 watched keys get no answer" in contact.describe() and "refused" in contact.describe()
    assert reader(store, outage_since=now - 121).read().freshness is Freshness.CRITICAL


def test_before_the_first_answer_the_age_counts_from_the_start() -> None:
    store = FakeStore({"a": Key()}, failing_keys=1)
    contact = reader(store, outage_since=None, started=time.monotonic() - 61).read()
    assert contact.freshness is Freshness.WARNING and "no answer yet" not in contact.describe()
    assert reader(FakeStore(), started=time.monotonic() - 61).read().describe().count("no answer yet") == 1


def test_an_error_once_recovered_is_not_shown() -> None:
    store = FakeStore({"a": Key(3, True, time.monotonic())}, last_error="old news", failing_keys=0)
    assert reader(store).read().last_error is None
