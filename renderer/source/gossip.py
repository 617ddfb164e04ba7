"""Word of a server leaving gossip, pushed by the agent: its own log, followed as it is written.

The stall watch (stall.py) must learn within seconds that a Consul server left the alive state.
Consul 1.8 has no blocking query on gossip membership, so it used to read the agent's members
every 2 s: 30 requests a minute on an idle agent, three times the rest of an idle renderer's cost.

The agent says it anyway, in its log, the moment gossip decides (measured on 1.8.7, a server
stopped: `memberlist: Suspect srv1 has failed`, then `Marking srv1 as failed` and `serf:
EventMemberFailed: srv1 …` with `removing server` in the same millisecond). `/v1/agent/monitor`
streams that log (`logjson`: one JSON object a line; a level of its own, whatever the agent logs
at): over HTTP/2 it takes one stream, no connection; over HTTP/1.1 one of the two connections the
budget keeps spare beside the held queries. So while it is followed, a line that may
mean a server's status changed (`is_hint`) makes the watch read the members at once, and the
members are read otherwise only every QUIET_READ_S, in case a line was missed (and if such a
reading ever finds a server's status changed with no line about it within seconds, the log is
not trusted any more: another Consul version may word it otherwise). Where the log cannot be
followed (a token without `agent:read`, an agent that ends the stream), the watch reads
the members every `server_watch` as before.

The log is input from the agent and, through node and service names, from anyone who can
register: a line is only ever a hint to read the members (bounded by the watch's pace), never
data; no part of it is kept, logged or written anywhere.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Collection
from typing import Protocol, runtime_checkable

from renderer.errors import ConsulError
from renderer.source.client import ConsulRequestError

log = logging.getLogger(__name__)

MONITOR_PATH = "/v1/agent/monitor"
MONITOR_PARAMS = [("loglevel", "info"), ("logjson", "")]  # serf's events are logged at INFO
MAX_LINE = 64 * 1024  # a longer line is no gossip event: dropped
QUIET_READ_S = 60.0  # while the log is followed: the members are read this often all the same
RETRY_S = 5.0  # after the stream failed or ended: following again after this, doubled while it keeps failing
RETRY_MAX_S = 300.0
OPEN_TIMEOUT_S = 10.0  # the agent accepts following its log within this, or the stream is given up
LASTED_S = 60.0  # a stream that lasted this long was fine: the next failure retries after RETRY_S again
GOSSIP_MODULES = ("serf", "memberlist")
ROUTER_MESSAGES = ("removing server", "adding server", "removing lan server", "adding lan server")  # lower case
WORDS = (b"serf", b"memberlist", b"server", b"onitor")  # a line with none of these is no news
VERDICTS = (
    b"EventMemberFailed",
    b"EventMemberLeave",
    b"EventMemberJoin",
    b"EventMemberReap",
    b"ing server",
    b"ing LAN server",
)


@runtime_checkable
class LogFollower(Protocol):
    """What following the agent's log asks of a Consul client: `ConsulClient` is the real one."""

    @property
    def can_follow(self) -> bool: ...

    async def follow(self, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]) -> None: ...


class LineSplitter:
    """Pieces of a stream to whole lines; a line longer than MAX_LINE is dropped whole."""

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self._on_line = on_line
        self._partial = b""
        self._dropping = False  # inside a line already too long: skip to its end

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._dropping:
                self._dropping = False
            elif line.strip():
                self._on_line(line)
        if len(self._partial) > MAX_LINE:
            self._partial, self._dropping = b"", True


def is_hint(line: bytes, servers: Collection[str]) -> bool:
    """A log line that may mean a server's gossip status changed: serf or memberlist naming one of
    `servers` (any of theirs while none is known yet), the agent's router adding or removing a
    server, or the monitor saying it dropped lines. A text line (an agent that ignores `logjson`)
    is read the same way, as a whole."""
    if not any(word in line for word in WORDS):  # most lines, cheaply (a busy agent logs every registration)
        return False
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
        entry = None
    if isinstance(entry, dict):
        module, message = str(entry.get("@module", "")), str(entry.get("@message", ""))
    else:
        module, message = "", line.decode("utf-8", "replace")
    lowered = message.lower()
    if any(words in lowered for words in ROUTER_MESSAGES) or ("dropped" in lowered and "monitor" in lowered):
        return True
    if not any(name in (module or message) for name in GOSSIP_MODULES):
        return False
    return not servers or not set(message.replace(":", " ").split()).isdisjoint(servers)


def is_verdict(line: bytes) -> bool:
    """Of the lines `is_hint` takes, one where gossip or the router has decided (a member failed,
    left, joined or was reaped; a server added or removed), not one where it still suspects: read
    at once whatever the pace of news."""
    return any(word in line for word in VERDICTS)


class GossipHints:
    """Follows the agent's log while it runs; `on_hint(verdict)` on each line that may matter, once when
    the stream opens and once when it ends (the watch then reads the members at once)."""

    def __init__(
        self, follower: LogFollower, on_hint: Callable[[bool], None], servers: Callable[[], Collection[str]]
    ) -> None:
        self._follower = follower
        self._on_hint = on_hint
        self._servers = servers
        self.following = False  # the stream is open: the watch may read the members only every QUIET_READ_S
        self.refused = False  # the token may not read the agent's log (said once; tried again every RETRY_MAX_S)
        self.trusted = True  # False once the members showed a change the log did not tell (see StallWatch)
        self._accepted = asyncio.Event()  # the agent accepted the current stream
        self._said_following = False
        self._failed_unexpectedly = False

    @property
    def possible(self) -> bool:
        return self._follower.can_follow

    async def run(self) -> None:
        """Follow until cancelled; a failure or an end is followed again after a pause (RETRY_S,
        doubled while it keeps failing; RETRY_MAX_S after a refusal: a token may be granted later)."""
        pause = RETRY_S
        while self.possible:
            started = time.monotonic()
            try:
                await self._follow_once()
                log.debug("the agent ended its log stream; following it again soon")
            except ConsulRequestError as err:
                if err.status != 403:
                    log.debug("following the agent's log: %s", err)
                else:
                    pause = RETRY_MAX_S
                    if not self.refused:
                        log.warning(
                            "the token cannot follow the agent's log (%s): the members are read every server_watch "
                            "instead of on news; grant agent_prefix \"\" read (or agent \"<its node>\") to fix", err,
                        )  # fmt: skip
                    self.refused = True
            except (ConsulError, TimeoutError) as err:
                log.debug("following the agent's log: %r", err)
            except Exception:  # a bug of ours: said (traced once); the watch polls meanwhile
                if not self._failed_unexpectedly:
                    log.exception("following the agent's log failed unexpectedly; members read every server_watch")
                self._failed_unexpectedly = True
            finally:
                if self.following:
                    self.following = False
                    self._on_hint(True)
            if time.monotonic() - started >= LASTED_S:
                pause = RETRY_S  # it was fine for a while: not one of a run of failures
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)

    async def _follow_once(self) -> None:
        """One stream until the agent ends it; TimeoutError if the agent does not accept it within
        OPEN_TIMEOUT_S (a token lookup hanging on servers out of reach must not hold it for good)."""
        self._accepted = asyncio.Event()
        on_data = functools.partial(self._data, LineSplitter(self._line))
        stream = asyncio.ensure_future(self._follower.follow(MONITOR_PATH, MONITOR_PARAMS, on_data))
        accepted = asyncio.ensure_future(self._accepted.wait())
        try:
            done, _ = await asyncio.wait({stream, accepted}, timeout=OPEN_TIMEOUT_S, return_when=FIRST_COMPLETED)
            if not done:
                raise TimeoutError(f"the agent did not accept following its log within {OPEN_TIMEOUT_S:.0f} s")
            await stream
        finally:
            accepted.cancel()
            if not stream.done():
                stream.cancel()  # resets the stream
                await asyncio.wait({stream})
            if not stream.cancelled():
                # Retrieved: a stream that failed in the tick this was cancelled (a 403 as the process
                # ends on a fatal refusal) must not print a traceback.
                stream.exception()

    def _data(self, lines: LineSplitter, data: bytes) -> None:
        if not self.following:  # the first call (b""): the agent accepted
            self._opened()
        lines.feed(data)

    def _line(self, line: bytes) -> None:
        if is_hint(line, self._servers()):
            self._on_hint(is_verdict(line))

    def _opened(self) -> None:
        """From now on the agent's log says when a server leaves."""
        self.following, self.refused = True, False
        self._accepted.set()
        if not self._said_following:
            self._said_following = True
            log.info(
                "following the agent's log for gossip news: the members are read on news and every %.0f s", QUIET_READ_S
            )
        self._on_hint(True)
