"""A render checks its cached blocks against the keys the Store says changed since the last render,
not value by value: a change costs the keys it touched, whatever the catalog. The output must be
the one a renderer without any cache gives, whatever happened in between (a failed render, a log
that no longer reaches back, another source)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from renderer.config import TemplateSpec
from renderer.errors import ApplyKind
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import HealthService
from renderer.source.store import Store
from renderer.status.timeline import AppliedChange, Timeline

NESTED = (
    "{% for group in [['web', 'api'], ['db']] %}{% call cached('group', *group) %}"
    "{% for name in group %}{% call cached('b', name) %}[{{ name }}:"
    "{% for s in service(name) %}{{ s.id }} {% endfor %}]{% endcall %}{% endfor %}\n{% endcall %}{% endfor %}"
)
SERVICES = ("web", "api", "db")


def renderer(tmp_path: Path) -> TemplateRenderer:
    src = tmp_path / "t.j2"
    src.write_text(NESTED)
    spec = TemplateSpec(src, tmp_path / "out", allow_empty=True)  # no guard: it remembers on purpose
    return TemplateRenderer(spec, {}, environ={})


def instances(service: str, ids: list[str]) -> Any:
    entries = [
        {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Checks": [{"Status": "passing"}],
         "Service": {"ID": sid, "Service": service, "Address": "10.0.1.1", "Port": 80, "Tags": []}}
        for sid in ids
    ]  # fmt: skip
    return HealthService(service).parse(entries)


def put(store: Store, service: str, ids: list[str]) -> None:
    store.put(HealthService(service).key, instances(service, ids), store.generation + 1)


def full(store: Store) -> Store:
    for service in SERVICES:
        put(store, service, [f"{service}-0"])
    return store


def uncached(tmp_path: Path, store: Store) -> str | None:
    return renderer(tmp_path).render(store).content


def test_the_store_says_which_keys_changed_since_a_generation() -> None:
    store = Store()
    put(store, "web", ["a"])
    since = store.generation
    assert store.changed_since(since) == frozenset()
    put(store, "api", ["b"])
    put(store, "web", ["a"])  # the same value: no change
    assert store.changed_since(since) == {"health.service(api)"}
    store.forget("health.service(web)")
    assert store.changed_since(since) == {"health.service(api)", "health.service(web)"}
    assert store.changed_since(store.generation + 5) is None  # a generation it never had


def test_a_log_that_no_longer_reaches_back_says_so() -> None:
    store = Store()
    store._log = collections.deque(maxlen=2)
    put(store, "web", ["a"])
    since = store.generation
    for n in range(3):
        put(store, "api", [str(n)])
    assert store.changed_since(since) is None
    assert store.changed_since(store.generation - 1) == {"health.service(api)"}


def test_only_the_changed_service_is_rendered_again(tmp_path: Path) -> None:
    store, r = full(Store()), renderer(tmp_path)
    r.render(store)
    kept = {key: r._blocks[key] for key in [("b", "api"), ("b", "db"), ("group", "db")]}
    put(store, "web", ["web-0", "web-1"])
    second = r.render(store)
    assert second.content == "[web:web-0 web-1 ][api:api-0 ]\n[db:db-0 ]\n" == uncached(tmp_path, store)
    assert all(r._blocks[key] is block for key, block in kept.items()), "the untouched blocks are reused"
    assert r._blocks[("b", "web")] is not None and set(second.dependencies) == {
        f"health.service({s})" for s in SERVICES
    }


def test_a_change_before_a_render_that_failed_is_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, r = full(Store()), renderer(tmp_path)
    r.render(store)
    put(store, "web", ["web-9"])
    template = r._template

    class Broken:
        def render(self, **_: Any) -> str:
            raise RuntimeError("the render failed before reading anything")

    monkeypatch.setattr(r, "_template", Broken())
    assert r.render(store).error is not None
    monkeypatch.setattr(r, "_template", template)
    assert r.render(store).content == "[web:web-9 ][api:api-0 ]\n[db:db-0 ]\n"


def test_another_source_is_checked_value_by_value(tmp_path: Path) -> None:
    """Two stores may share generation numbers: the log of one says nothing of the other."""
    first, second, r = full(Store()), Store(), renderer(tmp_path)
    for service in SERVICES:
        put(second, service, [f"{service}-other"])
    assert first.generation == second.generation
    r.render(first)
    assert r.render(second).content == uncached(tmp_path, second)


def test_blocks_made_from_a_source_without_a_log_are_checked_value_by_value_after(tmp_path: Path) -> None:
    store, r = full(Store()), renderer(tmp_path)
    r.render(store)

    class Plain:  # a DataSource without a change log
        def get(self, key: str) -> tuple[bool, Any]:
            return True, instances(key.split("(")[1].rstrip(")"), ["other"])

    assert r.render(Plain()).content == "[web:other ][api:other ]\n[db:other ]\n"
    assert r.render(store).content == uncached(tmp_path, store) == "[web:web-0 ][api:api-0 ]\n[db:db-0 ]\n"


steps = st.lists(
    st.tuples(
        st.sampled_from(["put", "same", "forget", "render", "overrun"]),
        st.sampled_from(SERVICES),
        st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps)
def test_a_cached_render_always_equals_an_uncached_one(tmp_path: Path, steps: list[tuple[str, str, list[str]]]) -> None:
    store, r = full(Store()), renderer(tmp_path)
    r.render(store)
    for action, service, ids in steps:
        key = HealthService(service).key
        if action == "put":
            put(store, service, ids)
        elif action == "same" and store.get(key)[0]:
            store.put(key, store.get(key)[1], store.generation)  # an equal answer: no change logged
        elif action == "forget":
            store.forget(key)
        elif action == "overrun":  # the log forgets what this renderer last saw
            store._log = collections.deque(list(store._log)[-1:], maxlen=1)
            put(store, service, ids)
        else:
            assert r.render(store).content == uncached(tmp_path, store)
    assert r.render(store).content == uncached(tmp_path, store)


# The timeline's keys: a render hands it only the keys changed since the template's last applied
# render (`Store.snapshot(since=...)`); every apply must list what the full snapshot would list.
timeline_steps = st.lists(
    st.tuples(st.sampled_from(["put", "forget", "render", "apply", "baseline", "overrun"]), st.sampled_from(SERVICES)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(steps=timeline_steps)
def test_the_timeline_lists_what_the_full_snapshot_would(steps: list[tuple[str, str]]) -> None:
    store = full(Store())
    reads = {HealthService(s).key: HealthService(s) for s in SERVICES[:2]}  # db is changed, never read
    short, whole = Timeline(), Timeline()
    for n, (action, service) in enumerate(steps):
        if action == "put":
            put(store, service, [f"{service}-{n}"])
        elif action == "forget":
            store.forget(HealthService(service).key)
        elif action == "overrun":
            store._log = collections.deque(list(store._log)[-1:], maxlen=1)
            put(store, service, [f"{service}-{n}"])
        elif action == "render":
            short.rendered_from("t", store.snapshot(reads, short.changed_since("t")), store.generation)
            whole.rendered_from("t", store.snapshot(reads), store.generation)
        elif action == "baseline":
            short.baseline("t")
            whole.baseline("t")
        else:
            a = short.record("t", ApplyKind.RUNTIME, 1.0, AppliedChange())
            b = whole.record("t", ApplyKind.RUNTIME, 1.0, AppliedChange())
            assert (a.keys, a.keys_total) == (b.keys, b.keys_total)
