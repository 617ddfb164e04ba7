"""Held queries stuck behind a server that was cut off: asked again as soon as gossip says so.

A client agent sends its RPCs to one server at a time, and every blocking query stays on the
server it was sent to for its whole wait (10 minutes over HTTP/2, or `block_wait`), however often the agent moves
on meanwhile. When a server is cut off (a partition, a dead switch port), the agent's RPCs to it
hang until the connection's keepalive gives up (about 35 s on Consul 1.8, measured in the lab),
and so does every query held there: a change made meanwhile on the healthy majority is not seen.
Gossip marks the cut server failed within seconds (5 s in the lab), and the agent then sends new
RPCs elsewhere; only the held ones stay where they are.

So while queries are held, `StallWatch` reads the agent's own view of the members
(`/v1/agent/members`: answered by the agent from gossip, no RPC, no load on the servers): when
the agent's log says a server's status moved (gossip.py) and every 60 s, or every `interval_s`
while the log cannot be followed. When a server leaves the alive state, every held query is asked again at its own
index (at most one such round per `min_gap_s`: a server flapping in gossip must not make a storm
of it; over HTTP/1.1 also while the agent still keeps what the last ones abandoned, see
`Lingering`): a key whose index moved answers at once, the others block again, now on a server
that answers. Nothing is recorded as an error: the data held is still the newest known. (A probe
of `/v1/status/leader` was tried first: it reaches only the agent's current server, which after a
rebalance is not the one holding older queries; the lab saw it answer while they hung for 35 s.)

The reads a change needs (the summaries, the services a move names, a sweep's reads) run under the
same watch: a read sent to a server just cut off, before gossip gave it up, hangs as a held query
does (its own timeout is 10 s), and is asked again with them. The watch itself never ends on an
error of ours: a dead watch would leave every held query to Consul's 35 s.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from renderer.errors import ConsulError
from renderer.source.client import ConsulGetter, ConsulRequestError
from renderer.source.gossip import QUIET_READ_S, GossipHints, LogFollower

log = logging.getLogger(__name__)

T = TypeVar("T")

ALIVE, LEAVING = 1, 2  # serf's member status: 1 alive, 2 leaving, 3 left, 4 failed
MIN_GAP_S = 10.0  # the least time between two rounds of asking every held query again
AGENT_CONNECTIONS_PER_CLIENT = 200  # Consul's default limits.http_max_conns_per_client
MEMBERS_TIMEOUT_S = 5.0
NEWS_GAP_S = 0.5  # the least time between two readings of the members on news from the agent's log
IDLE_NEWS = 4  # … doubled after this many readings on news in a row that found nothing new
NEWS_GRACE_S = 3.0  # a change the members show is in the agent's log within this, or the log is not trusted


class Reading(enum.Enum):
    """What one reading of the members gave."""

    CHANGED = "a known server failed, left or back"
    SAME = "as before"
    FAILED = "no answer"
    REFUSED = "the token may not read them"


# Consul 1.10+ filters members on the agent; 1.8 ignores the parameter (we filter here as well).
SERVERS_ONLY = [("filter", 'Tags.role == "consul"')]


@dataclass(frozen=True)
class Lingering:
    """What a round leaves behind at the agent. Over HTTP/2 nothing: a query asked again is reset
    and frees its stream at once (and a stream is no connection). Over HTTP/1.1 the agent keeps an
    abandoned query's connection, counted in its limit per client (`limits.http_max_conns_per_client`,
    200), until the query's wait runs out: rounds every 10 s while a server flaps would pile them up
    into a refusal of every new connection from this host. So a round is put off while the
    connections it would abandon, with those still lingering, pass `room` (the agent's 200 less
    the renderer's own budget); one round at a time is always allowed."""

    for_s: float = 0.0  # how long an abandoned query keeps its connection at the agent (0: not at all)
    room: int = 0  # abandoned connections the agent can take beside the renderer's own

    @classmethod
    def for_protocol(cls, block_wait_s: float, over_http2: bool, max_connections: int) -> Lingering:
        if over_http2 or max_connections >= AGENT_CONNECTIONS_PER_CLIENT:
            return cls()  # nothing lingers; or the agent's limit was raised past Consul's default: unknown
        return cls(block_wait_s + block_wait_s / 16 + 5.0, AGENT_CONNECTIONS_PER_CLIENT - max_connections)


def server_status(members: Any) -> dict[str, int]:
    """{server name: serf status} from a /v1/agent/members answer (clients and odd entries skipped)."""
    if not isinstance(members, list):
        raise ValueError(f"expected a list of members, got {type(members).__name__}")
    servers: dict[str, int] = {}
    for member in members:
        tags = member.get("Tags") if isinstance(member, dict) else None
        if isinstance(tags, dict) and tags.get("role") == "consul" and isinstance(member.get("Status"), int):
            servers[str(member.get("Name"))] = member["Status"]
    return servers


class StallWatch:
    """Runs held queries so that they are asked again when a server may be holding them hostage."""

    def __init__(
        self, client: ConsulGetter, interval_s: float, min_gap_s: float = MIN_GAP_S, lingering: Lingering = Lingering()
    ) -> None:
        """`interval_s` ≤ 0 turns the watch off (held queries are then simply awaited); `lingering`:
        what a round leaves at the agent (a round is put off while it would leave too much); `min_gap_s`:
        the least time between two rounds of asking again (a flapping server costs one per gap)."""
        self._client = client
        self._interval = interval_s
        self._min_gap = min_gap_s
        self._last_round = -math.inf  # monotonic time of the last round of asking again
        self._due = False  # a server left the alive state within the gap: a round is owed at its end
        self._lingering = lingering
        self._put_off_said = False  # a put-off round is said once, until a round runs again
        self._abandoned: deque[tuple[float, int]] = deque()  # (until when, how many) per recent round
        self._held = 0
        self._again = asyncio.Event()  # set (and replaced) when every held query must be asked again
        self._task: asyncio.Task[None] | None = None
        self._alive: set[str] | None = None  # the servers alive at the last reading (None: not read yet)
        self._known: set[str] = set()  # every server seen, alive or not
        self._refused = False  # the token may not read members: the watch is off for good (said once)
        self._failed_unexpectedly = False  # a bug of ours while reading members: traced once, then debug
        self.stalls = 0  # servers seen leaving the alive state
        self.asked_again = 0  # held queries asked again after one did
        self._news = asyncio.Event()  # the agent's log said something about a server: read the members now
        self._last_read = -math.inf  # monotonic time of the last reading of the members
        self._news_gap = NEWS_GAP_S  # the least time between readings on news (see `_pace_news`)
        self._idle_news = 0  # readings on news in a row that found nothing new
        self._verdict = False  # the news since the last reading include a verdict (read at NEWS_GAP_S)
        self._untold_by: float | None = None  # a change the log has not told yet must be told by then
        self._leaving: set[str] = set()  # servers seen leaving: the log tells when they have left
        self._follower: asyncio.Task[None] | None = None  # following the agent's log while the watch runs
        self._ending: set[asyncio.Task[None]] = set()  # followers cancelled, not yet ended
        self.gossip = GossipHints(client, self._heard, lambda: self._known) if isinstance(client, LogFollower) else None

    async def held(self, ask: Callable[[], Awaitable[T]]) -> T:
        """`ask()`'s answer; if the path was stuck meanwhile and is free again, asked anew.
        `ask`: a blocking query, or any read a server cut off could keep (it must be safe to repeat)."""
        if self._interval <= 0 or self._refused:
            return await ask()
        self._held += 1
        self._ensure_running()
        try:
            while True:
                again = self._again
                query = asyncio.ensure_future(ask())
                signal = asyncio.ensure_future(again.wait())
                try:
                    await asyncio.wait((query, signal), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    signal.cancel()
                    if not query.done():
                        query.cancel()
                        await asyncio.wait({query})  # done cancelling; a cancel of our own still raises here
                if not query.cancelled():
                    return query.result()
                self.asked_again += 1
        finally:
            self._held -= 1

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="stall watch")

    async def _watch(self) -> None:
        if self.gossip is not None and self.gossip.possible:
            self._follower = asyncio.create_task(self.gossip.run(), name="agent log follower")
        first, news_unread = True, False  # news since the last reading that answered
        try:
            while self._held > 0:
                on_news, on_verdict = self._news.is_set(), self._verdict
                news_unread = news_unread or on_news
                self._judge_untold(on_news)
                self._news.clear()
                self._verdict = False
                self._last_read = time.monotonic()
                reading = await self._read_members()
                if reading is Reading.REFUSED:
                    return
                if reading is Reading.CHANGED and not news_unread and not first:
                    self._expect_news()
                if reading is not Reading.FAILED:
                    first, news_unread = False, False
                self._pace_news(on_news and not on_verdict, reading)
                await self._until_next_reading(reading)
        finally:
            self._judge_untold(self._news.is_set())  # due or not, a stopped watch keeps no deadline
            self._untold_by = None
            # Not awaited: between the loop's last look at `_held` and this task's end there must
            # be no await, or a `held()` coming meanwhile would find it running and start none.
            # `tasks()` still gives it to whoever stops the watch.
            follower, self._follower = self._follower, None
            if follower is not None:
                follower.cancel()
                self._ending.add(follower)
                follower.add_done_callback(self._ending.discard)

    def _expect_news(self) -> None:
        """A reading between news found a server failed, left or back: while the log is trusted, it
        says so within NEWS_GRACE_S (the reading may just have come first); `_judge_untold` decides
        at the next reading. Nothing waits for it meanwhile: a round owed (the gap, `Lingering`)
        still comes at the polling pace."""
        gossip = self.gossip
        if gossip is None or not gossip.following or not gossip.trusted or self._untold_by is not None:
            return
        self._untold_by = time.monotonic() + NEWS_GRACE_S

    def _judge_untold(self, on_news: bool) -> None:
        """An untold change (`_expect_news`) is forgiven by news before NEWS_GRACE_S has passed.
        Without it, this agent's log does not say what gossip.py looks for (another Consul
        version?): from now on the members are read every `interval_s` again, said once."""
        if self._untold_by is None or (not on_news and time.monotonic() < self._untold_by):
            return
        self._untold_by = None
        if on_news or self.gossip is None or not self.gossip.trusted:
            return
        self.gossip.trusted = False
        log.warning(
            "a Consul server's gossip status changed and the agent's log said nothing of it: the members "
            "are read every server_watch (%g s) from now on; please report the Consul version", self._interval,
        )  # fmt: skip

    def _heard(self, verdict: bool) -> None:
        """News from the agent's log; `verdict`: gossip decided (see `is_verdict`), so the slowed
        pace of news does not apply to it."""
        self._verdict = self._verdict or verdict
        self._news.set()

    def _pace_news(self, on_news: bool, reading: Reading) -> None:
        """The least time between readings on news: NEWS_GAP_S, doubled (up to `interval_s`) after
        IDLE_NEWS readings on news in a row that found nothing new (anyone who can join gossip can
        make its log busy), and NEWS_GAP_S again once one finds something. A verdict (a server
        failed, left, joined) is read at NEWS_GAP_S whatever this pace, and is not counted."""
        if reading is Reading.CHANGED:
            self._idle_news, self._news_gap = 0, NEWS_GAP_S
        elif on_news and reading is Reading.SAME:
            self._idle_news += 1
            if self._idle_news >= IDLE_NEWS:
                self._news_gap = min(self._news_gap * 2, max(NEWS_GAP_S, self._interval))

    async def _until_next_reading(self, reading: Reading) -> None:
        """`interval_s`, or QUIET_READ_S while the agent's log is followed and nothing is pending
        (no round owed, the last reading done), or until an untold change is to be judged; news
        from the log ends the wait sooner, but no
        reading comes within the news gap of the last (a burst of lines makes one reading, and the
        line that wrote a server off is read again after its state)."""
        gossip = self.gossip
        quiet = gossip is not None and gossip.following and gossip.trusted and not self._due
        quiet = quiet and reading is not Reading.FAILED
        wait = QUIET_READ_S if quiet else self._interval
        if self._untold_by is not None:  # judged on time (`_judge_untold`)
            wait = min(wait, max(0.0, self._untold_by - time.monotonic()))
        try:
            async with asyncio.timeout(wait):
                await self._news.wait()
        except TimeoutError:
            return
        gap = NEWS_GAP_S if self._verdict else self._news_gap
        await asyncio.sleep(max(0.0, self._last_read + gap - time.monotonic()))

    async def _read_members(self) -> Reading:
        """One reading of the members: did the servers' status change, or did it fail (REFUSED:
        the token may not read them, and the watch is off)."""
        try:
            result = await asyncio.wait_for(
                self._client.get("/v1/agent/members", SERVERS_ONLY, 0, 0.0), MEMBERS_TIMEOUT_S
            )
            changed = self.saw(server_status(result.decoded()))  # servers only: small, decoded here
            self._ask_again_if_due()
            return Reading.CHANGED if changed else Reading.SAME
        except ConsulRequestError as err:
            if err.status == 403:
                self._refused = True
                log.warning(
                    "the token cannot read the agent's members (%s): a query held on a server that is cut off "
                    "waits for Consul to give up on it (~35 s); grant node_prefix \"\" read to fix", err,
                )  # fmt: skip
                return Reading.REFUSED
            log.debug("members: %s", err)
        except (ConsulError, TimeoutError, ValueError, RecursionError) as err:
            log.debug("members: %r", err)
        except Exception:  # a bug of ours: said (traced once), and the watch goes on (see the module's doc)
            if self._failed_unexpectedly:
                log.debug("reading the agent's members failed unexpectedly again", exc_info=True)
            else:
                log.exception("reading the agent's members failed unexpectedly; the server watch goes on")
            self._failed_unexpectedly = True
        return Reading.FAILED

    def saw(self, servers: dict[str, int]) -> bool:
        """One reading of the servers' status: any that was alive and is no more → ask again.
        True when a known server's status changed in a way the agent's log tells at once: failed,
        left, or back. Not a new name (its joining named a server not known yet, so the log's line
        about it was no news), nor a server still leaving: a graceful leave is logged when it is
        done, which may take seconds (serf's broadcast of the intent first), so a reading in between
        must not make the log look silent. A server seen leaving must be told when it has left
        (or failed); one that comes back from leaving (a refuted leave intent) need not be."""
        alive = {name for name, status in servers.items() if status == ALIVE}
        gone = sorted(self._alive - alive) if self._alive is not None else []
        back = sorted((alive - self._alive) & self._known) if self._alive is not None else []
        was_leaving, self._leaving = self._leaving, {name for name, status in servers.items() if status == LEAVING}
        told = [name for name in gone if servers.get(name) != LEAVING]  # failed, left, or no longer listed
        told += [name for name in was_leaving - self._leaving if servers.get(name) != ALIVE]  # has left now
        told += [name for name in back if name not in was_leaving]
        self._alive = alive
        self._known |= set(servers)
        if back:
            log.info("Consul server %s alive again (gossip)", ", ".join(map(repr, back)))
        if gone:
            self.stalls += 1
            self._due = True
            log.warning(
                "Consul server %s no longer alive (gossip): asking the %d held queries again, in case one waits on it",
                ", ".join(map(repr, gone)), self._held,  # repr: a name from gossip cannot forge a log line
            )  # fmt: skip
        return bool(told)

    def _ask_again_if_due(self) -> None:
        """One round of asking every held query again, at most once per `min_gap_s`: a server
        flapping in gossip must not turn a thousand held queries into a storm on the agent."""
        now = time.monotonic()
        if self._due and now - self._last_round >= self._min_gap and self._room_for_a_round(now):
            self._due, self._last_round = False, now
            if self._lingering.for_s > 0:
                self._abandoned.append((now + self._lingering.for_s, self._held))
            again, self._again = self._again, asyncio.Event()
            again.set()

    def _room_for_a_round(self, now: float) -> bool:
        """The connections a round would abandon fit beside those still lingering at the agent."""
        while self._abandoned and self._abandoned[0][0] <= now:
            self._abandoned.popleft()
        lingering = sum(count for _, count in self._abandoned)
        if lingering and lingering + self._held > self._lingering.room:
            if not self._put_off_said:
                self._put_off_said = True
                log.warning(
                    "asking the %d held queries again is put off: the agent still keeps the %d connections the last "
                    "round abandoned (HTTP/1.1: until their wait ends; its limit is %d a client)",
                    self._held, lingering, AGENT_CONNECTIONS_PER_CLIENT,
                )  # fmt: skip
            return False
        self._put_off_said = False
        return True

    def tasks(self) -> list[asyncio.Task[None]]:
        running = [task for task in (self._task, self._follower) if task is not None]
        return [*running, *self._ending]
