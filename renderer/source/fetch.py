"""One key's GET, retried until Consul answers, and the recovery probe that ends every backoff.

`Fetcher.fetch` asks Consul for one dependency (a blocking query when it has an index) and retries
errors (exponential, capped, jittered, never giving up: an outage must not end the process:
`retry_delay`). A plain loop, not tenacity's: its retry state per query is a reference cycle, and
each one an answered held query left became garbage the collector had frozen (loop/collector.py),
freed only at the next full collection: a registrant writing 70 times a second grew the renderer
from 94 MB to 740 MB in 10 minutes (helper-134, /tmp/rev80). After an error the next query does
not block: a restarted Consul with a lower index would otherwise hold it for the whole wait. A
backoff lasts only until Consul answers again (another key's answer, or the recovery probe's
`/v1/status/leader`), so nobody keeps sleeping off a backoff built up during a leader election.
Only an ACL refusal before any success is fatal. Every held query, and every read through `read`,
runs under the StallWatch (stall.py): asked again when a server leaves the alive state while it
waits (it may be the one keeping it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace

from renderer.errors import ConsulError
from renderer.logs import shown
from renderer.source.client import ConsulGetter, ConsulRequestError, QueryResult, TooLarge
from renderer.source.dependency import Dependency
from renderer.source.stall import Lingering, StallWatch
from renderer.source.store import Store, WatchSettings

log = logging.getLogger("renderer.source.watch")

RECOVERY_PROBE_S = 0.1  # while keys fail: how often to ask whether the cluster has a leader again
RECOVERY_PROBE_MAX_S = 2.0  # … once it has one and keys still fail (ACLs, limits): not an election
# A key answering again ends the other failing keys' backoff at most this often: one key that fails
# every other time must not make every failing key ask at once, again and again.
RECOVERY_WAKE_GAP_S = 2.0
# After the probe saw a leader come back it keeps its quick pace this long: measured on 1.8.7 in
# the cluster lab, a leader's SIGKILL is followed within 0.1 s by a "leader" answer naming the dead
# one (a follower that has not noticed yet) and the real election comes ~2.5 s later.
AFTER_WAKE_FAST_S = 10.0
# A change of the leader named, from an answer the probe had twice in a row, wakes the failing keys
# at once, but at most this often: answers in pairs (L1 L1 L2 L2 …) would otherwise wake them every
# second probe (helper-149's G1 in another shape).
PROBE_WAKE_GAP_S = 1.0
# Statuses with which Consul refuses a request for its form (measured on 1.8.7: 400 for a name with a
# character Go does not print, 431 for a name of 1.1 MB): the same request gets the same answer.
# A redirect too (301, 302, 303, 307, 308): Consul (Go's router) redirects a path with '.', '..' or
# empty segments to its cleaned form, another key, and no redirect is followed (see client.py).
REFUSED_FOR_FORM = frozenset({301, 302, 303, 307, 308, 400, 413, 414, 431})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
KEY_SHOWN = 200  # characters of a key a log line shows (quoted: a name from Consul cannot forge a line)


def refused_for_form(error: BaseException) -> bool:
    """Consul refused the request itself (see REFUSED_FOR_FORM), whatever the reason."""
    return isinstance(error, ConsulRequestError) and error.status in REFUSED_FOR_FORM


def refusal_reason(error: ConsulError) -> str:
    """Why a key is served empty, for the templates' reports: the status, never Consul's body
    (which echoes the hostile name)."""
    status = error.status if isinstance(error, ConsulRequestError) else None
    if status in REDIRECTS:
        return (
            f"Consul redirects its path ({status}): a name with '.', '..' or empty segments names another "
            "key, which is not read; served as having no data. Fix the name in the template or the data"
        )
    return (
        f"Consul refuses to be asked about it as named ({status}: a character it will not take, or too "
        "long); served as having no data. Fix the name in the template or the data"
    )


def retry_delay(attempt: int, settings: WatchSettings) -> float:
    """Seconds before retry `attempt` (1 for the first): random up to backoff_base_s × 2^(attempt-1),
    capped at backoff_max_s ("full jitter": many keys failing together do not retry together)."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * 2.0 ** min(attempt - 1, 64))
    return random.uniform(0.0, ceiling)


class KeyRefused(Exception):
    """Consul refuses to be asked about a key as it is named (see `Fetcher.refused_for_its_name`),
    or answers it over max_answer_bytes (`error` a TooLarge; `index`, its answer's). Not a
    ConsulError: it is not retried like one."""

    def __init__(self, error: ConsulRequestError, index: int = 0) -> None:
        super().__init__(str(error))
        self.error = error
        self.index = index


class Abandoned(Exception):
    """The key's poll was told to stop (Watcher._stop_poll) while its query failed: the retries end
    there. Retried on, a trigger drained at a switch back to precise mode kept failing for ever, and
    its failure kept the renderer saying Consul failed (helper-115, /tmp/rev62)."""


class Fetcher:
    """GETs for the watcher and the sweeper, with retries, stale reads and the recovery probe."""

    def __init__(
        self,
        client: ConsulGetter,
        store: Store,
        settings: WatchSettings,
        on_fatal: Callable[[ConsulError], None] | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._settings = settings
        self._on_fatal = on_fatal
        self._answering = asyncio.Event()  # set (and replaced) whenever a failing key answers again
        self._woken_at = float("-inf")  # when a key answering again last ended the others' backoff
        self._wake_later: asyncio.TimerHandle | None = None  # a postponed one (see _wake_failing_keys)
        self._any_answer = False  # some key had an answer: a 403 is then no bad token at start
        self._recovery_probe: asyncio.Task[None] | None = None
        self._leader_seen_at = float("-inf")  # (monotonic) the recovery probe's last sight of a leader
        over_http2 = settings.streams_per_connection > 1
        lingering = Lingering.for_protocol(settings.block_wait_s, over_http2, settings.max_connections)
        self.stalls = StallWatch(client, settings.server_watch_s, lingering=lingering)

    async def fetch(
        self,
        dep: Dependency,
        index: int,
        ever_succeeded: bool,
        known_body: str | None = None,
        going_on: Callable[[], bool] | None = None,
    ) -> QueryResult:
        """The answer for `dep` (blocking from `index` when > 0), however many retries it takes;
        KeyRefused when Consul refuses to be asked about it as it is named (`refused_for_its_name`:
        judged on a plain read, never on a blocking one, whose index or wait may be at fault);
        Abandoned when, before a retry, `going_on` says the key is no longer to be asked."""
        path, params = dep.request()
        attempt = 0
        while True:
            attempt += 1
            first = attempt == 1  # a retry never blocks (see above)
            if not first and going_on is not None and not going_on():
                raise Abandoned(dep.key)
            try:
                return await self._attempt(dep, path, params, index if first else 0, known_body if first else None)
            except ConsulError as err:
                failed: ConsulError | None = err
            delay = retry_delay(attempt, self._settings)
            self._on_error(dep, failed, attempt, delay, ever_succeeded)
            failed = None  # not kept through the sleep (its traceback holds this frame)
            await self.back_off(delay)

    async def _attempt(
        self, dep: Dependency, path: str, params: list[tuple[str, str]], since: int, known: str | None
    ) -> QueryResult:
        """One try of `fetch`: the answer, or the ConsulError to retry on."""
        ask = functools.partial(self.query, path, params, since, body=known, held=True, compressed=dep.compressed)
        try:
            result = await self.stalls.held(ask)
        except TooLarge as err:
            # Consul answered: no failure of Consul's, and the same answer would come at
            # every retry (up to max_answer_bytes each time). Served as Watcher.refuse says.
            raise KeyRefused(err, err.index) from err
        except ConsulRequestError as err:
            if since == 0 and await self.refused_for_its_name(dep, err, held=True):
                raise KeyRefused(err) from err
            raise
        self._any_answer = True
        if self._store.state(dep.key).error is not None:
            log.info("watch recovered: %s", shown(dep.key, KEY_SHOWN))
            self._store.recovered(dep.key)
            self._wake_failing_keys()
        return replace(result, held_from=since) if since else result

    async def refused_for_its_name(self, dep: Dependency, error: ConsulError, held: bool = False) -> bool:
        """Whether Consul refused `dep`'s plain read for the name in it (measured on 1.8.7: 400 for a
        name with a character Go does not print, 431 for one of 1.1 MB), so that no answer will
        ever come: a key named by data (a service, a node, a KV path), refused for its form
        (`refused_for_form`), that never had an answer from Consul, while Consul answers another
        request on the same client at once (`/v1/status/leader`), and refuses the key's read once
        more, asked again right after that (on the same transport: `held`, the HTTP/2 streams). A
        key that had one keeps it and is retried, and so is every key while everything is refused
        (an agent restarted with TLS answers 400 to plain HTTP, a proxy may too, and one that ends
        between the read and the leader's answer is caught by the second read): that must never
        empty a service that works."""
        if not (dep.named_by_data and refused_for_form(error)) or self._store.answered(dep.key):
            return False
        path, params = dep.request()
        try:
            await self._client.get("/v1/status/leader", [], 0, 0.0)
        except ConsulError:
            return False  # Consul answers nothing at all: not the name's fault
        try:
            await self.query(path, params, 0, held=held)
        except ConsulError as again:
            return refused_for_form(again) and not self._store.answered(dep.key)
        return False  # answered this time: the caller retries and reads it

    async def read(self, path: str, params: list[tuple[str, str]]) -> QueryResult:
        """One non-blocking GET (see `query`), asked again if a server it may wait on is cut off."""
        return await self.stalls.held(functools.partial(self.query, path, params, 0))

    async def query(
        self,
        path: str,
        params: list[tuple[str, str]],
        index: int,
        body: str | None = None,
        held: bool = False,
        compressed: bool = False,
    ) -> QueryResult:
        """One GET (blocking when `index` > 0), honouring max_stale; `body`: the caller's last
        answer's body (see ConsulClient.get's `known_body`); `held`: a watched key's own query;
        `compressed`: its answer asked for gzipped (over HTTP/2)."""
        settings = self._settings
        wait = settings.block_wait_s
        ask = functools.partial(
            self._client.get, path, params, index, wait, known_body=body, held=held, compressed=compressed
        )
        stale = settings.max_stale_s > 0
        result = await ask(stale=stale)
        if stale and result.last_contact_ms > settings.max_stale_s * 1000:
            # Too stale: ask the leader instead, as consul-template does.
            result = await ask(stale=False)
        return result

    async def back_off(self, seconds: float) -> None:
        """Sleep off a retry delay, but only until Consul answers again."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: on 3.11 it can swallow a cancel
                await self._answering.wait()

    def _wake_failing_keys(self) -> None:
        """A key answered again: end the failing keys' backoff now, or when RECOVERY_WAKE_GAP_S has
        passed since the last time (postponed, never dropped: a key that failed again at that wake
        would otherwise sleep its whole backoff while Consul answers)."""
        wait = self._woken_at + RECOVERY_WAKE_GAP_S - time.monotonic()
        if wait <= 0:
            self._woken_at = time.monotonic()
            self._consul_answers()
        elif self._wake_later is None:
            self._wake_later = asyncio.get_running_loop().call_later(wait, self._postponed_wake)

    def _postponed_wake(self) -> None:
        self._wake_later = None
        self._woken_at = time.monotonic()
        self._consul_answers()

    def _consul_answers(self) -> None:
        answering, self._answering = self._answering, asyncio.Event()
        answering.set()

    def probe_recovery(self) -> None:
        """While keys fail, one cheap probe (`/v1/status/leader`, answered by any server without a
        leader) tells when a cluster without a leader has one again: every backoff ends at once
        instead of up to `backoff_max_s` later. It wakes nobody for errors a leader does not cure
        (ACLs, limits): only a change from "no leader / no answer" to "a leader" does."""
        if self._recovery_probe is None or self._recovery_probe.done():
            self._recovery_probe = asyncio.create_task(self._recovery_loop(), name="recovery probe")

    async def _recovery_loop(self) -> None:
        """Probe while keys fail; wake them when a leader comes back after none, or when the leader
        named changes: the first "leader" after a leader's death may name the dead one (a follower
        that has not noticed yet), and after that wake nothing told of the real election: keys
        slept their backoff (seconds) while the cluster answered. A change from an answer the probe
        had twice in a row wakes them at once; one from an answer seen once (answers naming servers
        in turn, a leader and none in turn) at most every RECOVERY_WAKE_GAP_S, as a key answering
        again: they woke every failing key at each probe (helper-148: 498 requests a second at 50
        keys failing; helper-149: 255)."""
        lost = False
        seen: str | None = None  # the leader the last probe named
        repeated = 0  # how many probes in a row had the last answer
        # The quick pace from the start too: a first answer may already name the dead leader, and the
        # probe then slowed to every 2 s before the real election (helper-149's G3).
        woken_at = time.monotonic()
        at_once = float("-inf")  # the last wake at once
        pause = RECOVERY_PROBE_S
        while self._store.failing():
            try:
                result = await self._client.get("/v1/status/leader", [], 0, 0.0)
                answer = result.decoded()
            except (ConsulError, ValueError, RecursionError):
                answer = None
            leader = answer if isinstance(answer, str) and answer else None
            now = time.monotonic()
            self._leader_seen_at = now if leader is not None else float("-inf")
            if leader is not None and (lost or (seen is not None and leader != seen)):
                if repeated >= 2 and now - at_once >= PROBE_WAKE_GAP_S:  # pairs in turn: at most every 1 s
                    log.info("Consul has a leader again (%s): retrying every failed watch now", shown(leader))
                    self._consul_answers()
                    at_once = now
                else:
                    log.debug("Consul names a leader again (%s): retrying the failed watches", shown(leader))
                    self._wake_failing_keys()
                woken_at = now if lost else woken_at
            repeated = repeated + 1 if (leader is None and lost) or (leader is not None and leader == seen) else 1
            lost, seen = leader is None, leader
            # A leader and still failing, and no wake lately: not an election; probe gently (up to every 2 s).
            steady = leader is not None and now - woken_at >= AFTER_WAKE_FAST_S
            pause = min(pause * 2, RECOVERY_PROBE_MAX_S) if steady else RECOVERY_PROBE_S
            await asyncio.sleep(pause)

    def leader_lately(self) -> bool:
        """Whether keys fail while the cluster has a leader: the recovery probe (which runs while
        keys fail) saw one within its slowest pace, twice over. False in an outage (no answer, no
        leader), where reading more only adds failed requests."""
        return time.monotonic() - self._leader_seen_at < 2 * RECOVERY_PROBE_MAX_S

    def _on_error(
        self, dep: Dependency, error: ConsulError | None, attempt: int, sleep: float, ever_succeeded: bool
    ) -> None:
        message = str(error)
        self._store.record_error(dep.key, message)
        self.probe_recovery()
        # Fatal only before Consul answered anything: a token revoked or rotated while running, then
        # a newly watched key refused, must not stop the renderer (and an --exec-haproxy HAProxy).
        refused = (
            isinstance(error, ConsulRequestError)
            and error.status == 403
            and not ever_succeeded
            and not self._any_answer
        )
        if refused and isinstance(error, ConsulRequestError) and self._on_fatal is not None:
            self._on_fatal(error)
        # One line when Consul starts failing; the runner's progress line tells the rest, never a line per key.
        level = logging.WARNING if self._store.failing() == 1 and attempt == 1 else logging.DEBUG
        log.log(
            level, "watch %s failed (attempt %d, retrying in %.2fs; never giving up): %s",
            shown(dep.key, KEY_SHOWN), attempt, sleep, message,
        )  # fmt: skip

    def tasks(self) -> list[asyncio.Task[None]]:
        probe = [self._recovery_probe] if self._recovery_probe is not None else []
        return probe + self.stalls.tasks()
