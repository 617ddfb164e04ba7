"""One pass of the loop: render every template from the Store, deliver the complete ones, report.

`RenderCycle.run()` renders each template (a failing one never stops the others), hands complete
files to `Delivery.deliver`, notes what was left out and why, and returns whether every template
is rendered and served plus the Consul keys they read (the watcher then watches exactly those).
A HAProxy file whose change goes out through the Runtime API alone is rendered and delivered
ahead of the templates listed before it (`_runtime_changes_ahead`); everything else in order.
Failures are reported once per distinct message; under --once the report raises (the exit code
says which stage failed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from renderer.config import Config, TemplateSpec
from renderer.deliver.delivery import Delivery
from renderer.errors import RendererError, TemplateError
from renderer.logs import redact, shown
from renderer.loop.templates import TemplateState
from renderer.render.template import RenderResult
from renderer.source.dependency import Dependency, KVPrefix
from renderer.source.fetch import KEY_SHOWN
from renderer.source.store import Store
from renderer.status import Status
from renderer.status.served import cut

log = logging.getLogger("renderer.runner")


@dataclass(frozen=True)
class _Ahead:
    """A template rendered ahead of its turn: `done` None when its delivery was declined;
    `generation`: the Store's when it rendered (its turn renders again if the data moved)."""

    result: RenderResult
    done: bool | None
    generation: int


class RenderCycle:
    """Render → deliver → report, for every template; `templates` is replaced on SIGHUP."""

    def __init__(
        self, config: Config, templates: list[TemplateState], store: Store, status: Status, delivery: Delivery,
        out: TextIO,
    ) -> None:  # fmt: skip
        self.config = config
        self.templates = templates
        self._store = store
        self._status = status
        self._delivery = delivery
        self._out = out
        self._noted_certificates: set[tuple[str, str]] = set()
        # The pass's clock, one for every template it renders: a change served by two templates (a
        # balance in haproxy.cfg and routes.map) is one reload, and was counted as two toward a
        # storm, each template rendering at its own time (an attacker's review, /tmp/rev46).
        self._now = time.monotonic()

    async def run(self) -> tuple[bool, dict[str, Dependency]]:
        """(every template rendered and served, the dependencies all of them read, by key)."""
        dependencies: dict[str, Dependency] = {}
        all_done = True
        self._status.waiting_for = []
        self._now = time.monotonic()
        self._delivery.pass_begins()
        certificates_ready = await self._certificates_first(dependencies)
        ahead = await self._runtime_changes_ahead() if certificates_ready else {}
        for state in self.templates:
            early = ahead.get(state.spec.destination)
            if early is not None and (early.done is not None or early.generation == self._store.generation):
                result, done = early.result, early.done  # delivered ahead, or declined with its data still current
            elif early is None and self._still_waiting(state):
                dependencies.update(state.dependencies)
                all_done = False
                continue
            else:
                result, done = self._render(state), None
            dependencies.update(state.dependencies)
            if done is None and not certificates_ready:
                all_done = False  # rendered (its keys are asked for meanwhile), delivered once they are in
                continue
            if done is None:
                done = await self._handle(state, result)
            all_done = all_done and done is True
        return all_done, dependencies

    async def _certificates_first(self, dependencies: dict[str, Dependency]) -> bool:
        """Certificates from KV (`--certs`) are synced before any template is delivered, since a
        template may bind with them (HAProxy refuses a `bind … ssl crt-list` of an empty list):
        False while their prefix has had no answer yet, and no template is delivered before it."""
        if self.config.certificates is None:
            return True
        certs = KVPrefix(self.config.certificates[0] + "/")  # under it: not `haproxy/certs2` beside `haproxy/certs`
        dependencies[certs.key] = certs
        present, pairs = self._store.get(certs.key)
        if not present:
            self._status.waiting_for.append(certs.key)
            return bool(self.config.dry)
        if not self.config.dry:
            await self._delivery.sync_certificates(pairs)
        return True

    async def _runtime_changes_ahead(self) -> dict[Path, _Ahead]:
        """HAProxy files listed after plain files only (no command, not HAProxy's), rendered ahead
        of their turn; delivered too when their change reads no file those write
        (`Delivery.deliver_ahead`: only servers changed, the Runtime API takes it), else left for
        their turn (done None). A server joining or leaving then waits for no other file: at 1,000
        services the routing map's render and delivery, ~5 ms under load, came before every
        change's Runtime API commands. A change that needs a reload still comes after the files
        before it, since HAProxy reads them when it reloads; a template before it that reloads or
        runs a command keeps the declared order; --once keeps it too (no latency to win there).
        Each result comes with the data's generation it was rendered from."""
        ahead: dict[Path, _Ahead] = {}
        if self.config.dry or self.config.once:
            return ahead
        for position, state in enumerate(self.templates):
            if position == 0 or not state.spec.haproxy:
                continue
            if any(t.spec.haproxy or t.spec.command for t in self.templates[:position]):
                break  # a file before it is applied itself: the declared order from here on
            if any(not self._store.get(key)[0] for key in state.missing):
                continue  # waiting for data: its turn says so
            generation = self._store.generation
            result = self._render(state)
            done = await self._handle(state, result, ahead=True) if result.content is not None else None
            ahead[state.spec.destination] = _Ahead(result, done, generation)
        return ahead

    def _still_waiting(self, state: TemplateState) -> bool:
        """The last render waited for keys and some still have no data: rendering again would do the
        same work for nothing (at 1,000 services the first answers arrive one by one: ~150 renders
        of ~50 ms each, where one render once all have arrived does)."""
        waiting = [key for key in state.missing if not self._store.get(key)[0]]
        if waiting:
            self._status.waiting_for += waiting
        return bool(waiting)

    def _render(self, state: TemplateState) -> RenderResult:
        """Render one template and note what it read and what it waits for."""
        started, state.began = time.monotonic(), self._store.generation
        try:
            result = state.renderer.render(self._store, self._now)
        except Exception as err:  # contained: one template's failure never stops the others
            log.exception("rendering %s failed unexpectedly", state.spec.source)
            result = RenderResult(None, {}, error=f"unexpected {type(err).__name__}: {err}")
        state.missing = result.missing if result.content is None and result.error is None else ()
        if state.memory is not None and result.content is not None:
            self._keep_memory(state)
        state.recheck_at = time.monotonic() + result.recheck_in if result.recheck_in is not None else None
        # A render that failed or waited midway read less: nothing the last whole render read is
        # dropped for it, and only its own keys come with them (a union over every failed render grew
        # without end; a render waiting for a key, and tripping on its placeholder, was taken for a
        # whole one and shrank the set: an attacker's review, /tmp/rev31).
        if result.content is None:
            state.dependencies = {**state.whole_dependencies, **result.dependencies}
        else:
            state.dependencies = state.whole_dependencies = result.dependencies or state.dependencies
        log.debug(
            "rendered %s in %.1f ms, %.1f ms after the last Consul change",
            state.spec.source.name, (time.monotonic() - started) * 1000, (started - self._store.last_change) * 1000,
        )  # fmt: skip
        return result

    @staticmethod
    def _keep_memory(state: TemplateState) -> None:
        """Hand what the template's renderer remembers to its memory file; contained: a memory
        not kept is forgotten by a restart, and never stops the renderer."""
        assert state.memory is not None
        try:
            state.memory.keep(state.renderer)
        except Exception:
            log.exception("keeping the memory of %s failed unexpectedly (a restart forgets it)", state.spec.source)

    async def _handle(self, state: TemplateState, result: RenderResult, ahead: bool = False) -> bool | None:
        """Deliver a render and report how it went: whether it is served; `ahead`: only if its change
        may go ahead of the templates before it (None when not: its turn delivers it)."""
        if result.error is not None:
            await self._delivery.not_delivered(state.spec)
            self.report(state, TemplateError(result.error))
            return False
        if result.content is None:
            await self._delivery.not_delivered(state.spec)
            log.debug("%s waits for data: %s", state.spec.source, ", ".join(result.missing))
            self._status.waiting_for += list(result.missing)
            return False
        if self.config.dry:
            self._status.render_ok()
            self._note_left_out(state, result.left_out + self._refused(state))
            return self._print_dry(state, result.content)
        self._status.rendered_from(str(state.spec.destination), *self._keys_read(state))
        state.change_told = self._store.first_told(state.dependencies, state.covered)
        if ahead:
            early = await self._delivery.deliver_ahead(state.spec, result.content)
            if early is None:
                return None  # its turn delivers it, and counts the render
            delivered = early
        else:
            delivered = await self._delivery.deliver(state.spec, result.content)
        self._status.render_ok()
        left_out = result.left_out + self._refused(state) + self._delivery.left_out(state.spec.destination)
        self._note_left_out(state, left_out)
        if state.spec.haproxy:
            self._note_certificates(self._delivery.certificate_notes())
        if delivered.error is not None:
            self.report(state, delivered.error)
        if not delivered.served:
            return False
        state.last_error, state.rendered, state.covered = None, True, state.began
        state.change_told = None  # carried: a later apply of the live file (a retry) carries none of it
        self._status.destination_ok(str(state.spec.destination))
        return True

    def _refused(self, state: TemplateState) -> tuple[str, ...]:
        """The keys the render read that Consul refuses to be asked about (served empty), with why:
        reported like an instance left out, so the operator's page and the check say which and why."""
        refused = self._store.refused_among(state.dependencies)
        return tuple(f"Consul key {shown(key, KEY_SHOWN)}: {why}" for key, why in sorted(refused.items()))

    def _keys_read(self, state: TemplateState) -> tuple[dict[str, tuple[int, float]], int]:
        """For the timeline: the keys the render read that changed since the template's last
        applied render (the timeline lists those; a few, not the ~1,000 a render reads at 1,000
        services), and the Store's generation now."""
        since = self._status.rendered_since(str(state.spec.destination))
        return self._store.snapshot(state.dependencies, since), self._store.generation

    def _note_left_out(self, state: TemplateState, left_out: tuple[str, ...]) -> None:
        """Instances (and parts HAProxy rejected) left out: one error line each when first seen, one
        info line when they come back; the Consul check warns while any is left out. Each item is
        cut to LEFT_OUT_CHARS (`cut`) before the log, the check and /status see it."""
        left_out = tuple(cut(item) for item in left_out)
        now, before = set(left_out), set(state.left_out)  # sets: thousands of items at times
        where, budget, at = state.spec.destination, state.left_out_lines, time.monotonic()
        new = [item for item in left_out if item not in before]
        back = [item for item in state.left_out if item not in now]
        skipped = budget.owed(at)
        if skipped:
            log.warning("%s: %d lines on instances left out or back not logged (/status lists them)", where, skipped)
        for item in new[: budget.take(len(new), at)]:
            log.error("%s: left out %s (fix the registration; the rest is rendered)", where, item)
        for item in back[: budget.take(len(back), at)]:
            log.info("%s: no longer left out: %s", where, item.split(":")[0])
        state.left_out = left_out
        self._status.set_left_out(str(state.spec.destination), left_out)

    def _note_certificates(self, notes: Mapping[tuple[str, str], str]) -> None:
        """Certificates refused or expiring soon: a warning line each when first seen, an info line
        when resolved; the Consul check warns while any is noted. Each note is cut to LEFT_OUT_CHARS
        (a review: a KV key of 200,000 characters under the certificates' prefix made as long a note)."""
        notes = {key: cut(note) for key, note in notes.items()}
        for key, note in notes.items():
            if key not in self._noted_certificates:
                log.warning("%s (renew or fix it in KV; HAProxy serves what it has)", note)
        for what, name in sorted(self._noted_certificates - set(notes)):
            log.info("certificate %r no longer %s", name, what)
        self._noted_certificates = set(notes)
        # expiring ones first: a KV writer's refused keys pushed them past the check's first few (helper-135)
        in_order = sorted(notes.items(), key=lambda item: item[0][0] != "expiring")
        self._status.set_certificate_notes(tuple(note for _, note in in_order))

    def change_told(self, destination: Path) -> float | None:
        """When the change an apply of `destination` carries was first told of (monotonic): the
        oldest change of the keys its render read since the last render delivered (a batch is timed
        from its first change, not its last; see `Store.first_told`); None when it carries none."""
        state = next((t for t in self.templates if t.spec.destination == destination), None)
        return state.change_told if state is not None else self._store.last_change or None

    def delivery_failed(self, spec: TemplateSpec, err: RendererError) -> None:
        """Delivery's report, now or later (a file written behind its runtime changes)."""
        state = next(t for t in self.templates if t.spec.destination == spec.destination)
        self.report(state, err)

    def report(self, state: TemplateState, err: RendererError) -> None:
        token = self.config.consul.token
        message = redact(f"{state.spec.source} → {state.spec.destination}: {err}", token)
        self._status.fail(str(state.spec.destination), err.reason, redact(str(err), token))
        if message != state.last_error:
            log.error("%s", message)
        state.last_error = message
        if self.config.once:
            raise err

    def _print_dry(self, state: TemplateState, content: str) -> bool:
        if content != state.printed:
            self._out.write(redact(f"> {state.spec.destination}\n{content}", self.config.consul.token))
            self._out.flush()
            state.printed = content
        return True

    async def flush_memory(self) -> None:
        """Write what the renderers remember and is not written yet (the loop's way out)."""
        await asyncio.gather(*(state.memory.flush() for state in self.templates if state.memory is not None))

    def due(self) -> bool:
        """A render is due without new data: an apply to retry, or a guard's hold that ends."""
        now = time.monotonic()
        held = any(state.recheck_at is not None and state.recheck_at <= now for state in self.templates)
        return held or self._delivery.retry_due()
