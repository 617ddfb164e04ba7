"""A service whose settings keep changing is held (`renderer.render.flaps`): its flapping costs
HAProxy a reload now and then, and the reload gap stays at its floor for every other service."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab.stack import DEFAULT_TEMPLATE
from renderer.config import TemplateSpec
from renderer.render import template as template_module
from renderer.render.flaps import FLAP_BURST, FLAP_FIRST_HOLD_S, FLAP_MAX_HOLD_S, SettingsFlaps
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import CatalogServices, HealthService
from tests.unit.test_service_settings import VARIABLES, Data, instance


def test_a_deploys_changes_are_never_held_and_a_burst_is_served_before_the_hold() -> None:
    flaps: SettingsFlaps[str] = SettingsFlaps()
    assert flaps.serve("api", "a", 0.0) == ("a", None)  # first seen
    for n, value in enumerate(("b", "c", "d")):  # the burst: served at once
        assert flaps.serve("api", value, 1.0 + n) == (value, None)
    served, held = flaps.serve("api", "e", 4.0)  # past the burst: served, and the next waits
    assert served == "e" and held is not None and held.hold_s == FLAP_FIRST_HOLD_S and held.changes == 4
    assert flaps.serve("api", "f", 5.0)[0] == "e" and flaps.serve("api", "e", 6.0)[0] == "e"
    assert flaps.serve("api", "g", 4.0 + FLAP_FIRST_HOLD_S)[0] == "g"  # the newest, when the hold ends
    for hour in range(1, 6):  # a deploy an hour: never held
        assert flaps.serve("web", f"v{hour}", hour * 3600.0) == (f"v{hour}", None)


def test_a_flapper_settles_below_the_reload_storms_burst() -> None:
    """A registrant flipping its own settings every 100 ms for ten minutes: after its first half
    second the served settings change about once a minute (ReloadPace lengthens HAProxy's gap,
    for every service, past ~6 reloads a minute), and no hold passes FLAP_MAX_HOLD_S."""
    flaps: SettingsFlaps[str] = SettingsFlaps()
    changes, last, longest = [], None, 0.0
    for tick in range(6000):
        now = tick * 0.1
        served, held = flaps.serve("evil", ("first", "leastconn")[tick % 2], now)
        if served != last:
            changes.append(now)
            last = served
        longest = max(longest, held.hold_s if held is not None else 0.0)
    gaps = [round(b - a) for a, b in itertools.pairwise(changes)]
    assert changes[: int(FLAP_BURST) + 2] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4]), changes  # the first, the burst
    assert gaps[4:8] == [10, 18, 30, 42], gaps  # then held, longer each time …
    assert all(gap >= 50 for gap in gaps[9:]), gaps  # … about one a minute for good: ReloadPace's burst is 6
    assert len(changes) <= 20 and longest <= FLAP_MAX_HOLD_S


def test_services_no_longer_read_are_forgotten() -> None:
    flaps: SettingsFlaps[str] = SettingsFlaps()
    flaps.serve("a", "x", 0.0)
    flaps.serve("b", "x", 0.0)
    flaps.forget_all_but({"b"})
    assert set(flaps.served) == {"b"}


@pytest.fixture(autouse=True)
def _clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Renders read `CLOCK.now` as monotonic time (each test sets it)."""
    monkeypatch.setattr(template_module, "time", SimpleNamespace(monotonic=lambda: CLOCK.now))


CLOCK = SimpleNamespace(now=0.0)


def flapping_renderer(clock: SimpleNamespace) -> tuple[TemplateRenderer, Callable[..., Any]]:
    """The default template's renderer on `clock`, and a render of `evil` (balance from meta),
    `shop` and any more services named."""
    CLOCK.now = clock.now
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)

    answers: dict[tuple[str, ...], Any] = {}  # as the Store keeps them: the same object while unchanged

    def render(balance: str, *more: str) -> Any:
        CLOCK.now = clock.now
        services = {"evil": [instance("evil", "e1", haproxy_balance=balance)], "shop": [instance("shop", "s1")]}
        services.update({name: [instance(name, f"{name}1")] for name in more})
        catalog = CatalogServices()
        if ("catalog", *services) not in answers:
            answers["catalog", *services] = catalog.parse({n: ["lb"] for n in services})
        values = {catalog.key: answers["catalog", *services]}
        for name in {*services, "web"}:
            key = (name, balance if name == "evil" else "")
            if key not in answers:
                answers[key] = HealthService(name).parse(services.get(name, []))
            values[HealthService(name).key] = answers[key]
        return renderer.render(Data(values))

    return renderer, render


def test_the_default_template_holds_a_flapping_service_and_says_so_not_the_others() -> None:
    clock = SimpleNamespace(now=100.0)
    _, render = flapping_renderer(clock)
    flips = ["first", "leastconn", "first", "leastconn", "first"]
    for balance in flips:
        clock.now += 0.1
        result = render(balance)
    assert "backend evil\n    balance first\n" in result.content  # the fourth change was served, the fifth waits
    clock.now += 0.1
    result = render("leastconn", "fresh")  # a brand-new service comes in at once
    assert "backend evil\n    balance first\n" in result.content and "backend fresh\n" in result.content
    (note,) = [item for item in result.left_out if "evil" in item]
    assert "changed 4 times lately" in note and f"waits {FLAP_FIRST_HOLD_S:.0f} s" in note
    assert result.recheck_in is not None and 0 < result.recheck_in <= FLAP_FIRST_HOLD_S
    assert not any("shop" in item for item in result.left_out)
    clock.now += result.recheck_in + 0.01  # the hold's end: the newest is taken, and the note goes
    result = render("leastconn", "fresh")
    assert "backend evil\n    balance leastconn\n" in result.content


def test_a_hold_never_keeps_settings_most_registrations_do_not_carry_against_ones_they_do() -> None:
    """An attacker's review (/tmp/rev34): its instance, passing alone in another team's service
    while the owners' were down, flipped its own meta into a hold, and HAProxy kept its value up
    to ~30 s after the owners were back. The owners' settings (backed) end that at once."""
    flaps: SettingsFlaps[str] = SettingsFlaps()
    flaps.serve("shop", "owners", 0.0)
    for n in range(1, 6):  # the owners down: the attacker's instance alone, flipping
        served, held = flaps.serve("shop", ("418", "417")[n % 2], float(n), backed=False)
    assert held is not None and served != "owners"
    assert flaps.serve("shop", "owners", 6.0) == ("owners", flaps.served["shop"].held(6.0))  # back: at once
    assert flaps.serve("shop", "418", 7.0, backed=False)[0] == "owners"  # and the hold keeps theirs


def test_a_held_services_blocks_are_reused_until_the_hold_ends() -> None:
    """The same review: a hold kept every block reading the service out of the cache, its group of
    32 too, at every render for the whole hold (32 held services: 21 ms a render where 2.7)."""
    clock = SimpleNamespace(now=100.0)
    renderer, render = flapping_renderer(clock)
    for balance in ["first", "leastconn", "first", "leastconn", "first"]:
        clock.now += 0.1
        render(balance)
    kept = {key: block for key, block in renderer._blocks.items() if key[0] == "backend"}
    assert kept[("backend", "evil")].until is not None  # cached, until the hold ends
    clock.now += 0.1
    again = render("first", "fresh")  # another service changes: evil's blocks are reused
    assert renderer._blocks[("backend", "evil")] is kept[("backend", "evil")]
    assert again.recheck_in is not None and any("evil" in item for item in again.left_out)
    clock.now += again.recheck_in + 0.01
    render("leastconn", "fresh")
    assert renderer._blocks[("backend", "evil")] is not kept[("backend", "evil")]
