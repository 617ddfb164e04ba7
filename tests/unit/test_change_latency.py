"""The latency an apply reports (log, metric histogram, Consul check, status page) begins at the
first sign of the oldest change it carries: a batch of changes applied together is timed from its
first, not its last; a change already delivered (served, or rendered equal to what runs) is not
carried again, and one whose render failed is carried by the next apply.

Real templates, Store and delivery (a template whose command is `true`); no Consul or HAProxy."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

from renderer.config import Config, TemplateSpec
from renderer.deliver.delivery import Delivery
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import KVKey
from renderer.source.store import Store
from renderer.status import Status
from tests.helpers import Pace

TEXT = '{{ key("a") }} {{ 1 // (key("b") | int) }} {{ key("c") }}{% if key("d") %} d{% endif %}\n'
KEYS = {name: KVKey(name).key for name in "abcdz"}
QUIET_S = 0.3  # between two changes, longer than any apply here takes (scaled by the machine's pace)


class Pass:
    """A loop's pass over one template; `after_ms()`: the latency the last apply reported."""

    def __init__(self, tmp_path: Path, command: str = "true") -> None:
        source = tmp_path / "main.j2"
        source.write_text(TEXT)
        self.spec = TemplateSpec(source, tmp_path / "out.cfg", command=command)
        config = Config(templates=(self.spec,))
        self.store, self.status = Store(), Status(templates=1)
        delivery = Delivery(config, self.status, None, lambda destination: self.cycle.change_told(destination))
        template = TemplateState(TemplateRenderer(self.spec, {}, environ={}))
        self.cycle = RenderCycle(config, [template], self.store, self.status, delivery, io.StringIO())
        self.index = 0

    def put(self, name: str, value: str) -> None:
        self.index += 1
        assert self.store.put(KEYS[name], value, self.index)

    async def run(self) -> bool:
        return (await self.cycle.run())[0]

    def after_ms(self) -> float:
        served = self.status.served[str(self.spec.destination)]
        assert served.after_change_ms is not None
        return served.after_change_ms


def test_a_batch_is_timed_from_its_first_change_and_a_delivered_one_is_not_carried_again(
    tmp_path: Path, pace: Pace
) -> None:
    quiet = pace(QUIET_S)
    timeline = Pass(tmp_path)

    async def scenario() -> list[float]:
        for name, value in (("a", "a0"), ("b", "1"), ("c", "c0"), ("d", "")):
            timeline.put(name, value)
        assert await timeline.run()
        reported = []
        timeline.put("a", "a1")  # two changes applied together: timed from the first
        await asyncio.sleep(quiet)
        timeline.put("c", "c1")
        assert await timeline.run()
        reported.append(timeline.after_ms())
        await asyncio.sleep(quiet)
        timeline.put("c", "c2")  # alone: a1 was applied, not carried again
        assert await timeline.run()
        reported.append(timeline.after_ms())
        timeline.put("z", "z0")  # a key the template does not read: not its change
        await asyncio.sleep(quiet)
        timeline.put("c", "c3")
        assert await timeline.run()
        reported.append(timeline.after_ms())
        return reported

    batch, alone, unread = asyncio.run(scenario())
    assert batch >= quiet * 1000, f"a batch timed from its last change: {batch:.1f} ms"
    assert alone < quiet * 1000 and unread < quiet * 1000, (alone, unread)


def test_a_change_rendered_equal_to_what_runs_is_delivered_and_one_whose_render_failed_is_carried(
    tmp_path: Path, pace: Pace
) -> None:
    quiet = pace(QUIET_S)
    timeline = Pass(tmp_path)

    async def scenario() -> list[float]:
        for name, value in (("a", "a0"), ("b", "1"), ("c", "c0"), ("d", "1")):
            timeline.put(name, value)
        assert await timeline.run()
        reported = []
        timeline.put("d", "2")  # the same output: nothing to apply, and nothing carried later
        assert await timeline.run()
        await asyncio.sleep(quiet)
        timeline.put("c", "c1")
        assert await timeline.run()
        reported.append(timeline.after_ms())
        timeline.put("a", "a1")  # its render fails (b): not applied, so carried by the next apply
        timeline.put("b", "0")
        assert not await timeline.run()
        await asyncio.sleep(quiet)
        timeline.put("b", "1")
        assert await timeline.run()
        reported.append(timeline.after_ms())
        return reported

    same_before, failed_before = asyncio.run(scenario())
    assert same_before < quiet * 1000, f"a change rendered equal to what runs was carried: {same_before:.1f} ms"
    assert failed_before >= quiet * 1000, f"a change whose render failed was not carried: {failed_before:.1f} ms"


def test_without_a_delivered_render_to_count_from_the_stores_latest_change_is_used(tmp_path: Path, pace: Pace) -> None:
    """The first render (nothing delivered to count from): the Store's latest change, as before."""
    quiet = pace(QUIET_S)
    timeline = Pass(tmp_path)
    assert timeline.cycle.change_told(timeline.spec.destination) is None  # not rendered, nothing changed
    assert timeline.cycle.change_told(tmp_path / "other.cfg") is None

    async def scenario() -> None:
        for name, value in (("a", "a0"), ("b", "1"), ("c", "c0"), ("d", "")):
            timeline.put(name, value)
        await asyncio.sleep(quiet)
        timeline.put("z", "z0")  # a key it does not read, the latest change: what the first apply counts from
        assert await timeline.run()

    asyncio.run(scenario())
    assert timeline.after_ms() < quiet * 1000  # from z0, the latest change, not a0
    # Delivered: a later apply of the live file (a retry) carries none of it (helper-127's finding 6)
    assert timeline.cycle.change_told(timeline.spec.destination) is None
    assert time.monotonic() - timeline.store.last_change < pace(5)


def test_a_change_made_while_a_render_is_delivered_is_carried_by_the_next_apply(tmp_path: Path, pace: Pace) -> None:
    """What a delivered render carried is what it read when it began: a change that comes during
    its delivery (here its command takes 0.5 s) is the next apply's (helper-127's mutation N6)."""
    quiet = pace(QUIET_S)
    timeline = Pass(tmp_path, command=f"sleep {pace(0.5):.2f}")

    async def scenario() -> float:
        for name, value in (("a", "a0"), ("b", "1"), ("c", "c0"), ("d", "")):
            timeline.put(name, value)
        assert await timeline.run()
        timeline.put("a", "a1")
        delivering = asyncio.create_task(timeline.run())
        await asyncio.sleep(pace(0.2))
        timeline.put("c", "c1")  # during the delivery of a1
        assert await delivering
        await asyncio.sleep(quiet)
        assert await timeline.run()
        return timeline.after_ms()

    assert asyncio.run(scenario()) >= quiet * 1000
