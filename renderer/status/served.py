"""What one template's live output holds, read for operators: backends → servers, and what is left out.

`read_backends` is a tolerant reader made for display: it never raises, whatever the text, and
the counts the Consul check shows come from the same reading as the page's listing, so the two
cannot disagree. (Deciding how to apply a change is `renderer.haproxy.config_text`'s job, which
refuses what it cannot read exactly; here an odd line is shown as it is.)
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from renderer.errors import ApplyKind
from renderer.logs import shown

MAX_LEFT_OUT_SHOWN = 3  # in the one-line Consul check output
MAX_LEFT_OUT_LISTED = 1000  # per template, in /status and on the page (the totals count them all)
# Characters of one item left out that the log, the Consul check and /status show. Each part of an
# item is bounded where it is made (names and ids by QUOTED_LIMIT, values by `shown`); this bounds
# the next item someone forgets to bound, and a custom template's own `# left out:` comments: an
# attacker's review found a note listing every value 400 instances disagreed on, 200 KB, which
# Consul cut to its first 4 KB in the check, hiding the rest.
LEFT_OUT_CHARS = 1000


def cut(item: str) -> str:
    """`item` if it fits LEFT_OUT_CHARS, else its start and how long it was."""
    return item if len(item) <= LEFT_OUT_CHARS else f"{item[:LEFT_OUT_CHARS]}… ({len(item)} characters)"


def first_few(items: Sequence[str], most: int = MAX_LEFT_OUT_SHOWN, total: int | None = None) -> str:
    """`items` for the one-line check output: the first `most` (each service in turn), then how many
    more (of `total`, when `items` are some of them)."""
    total = len(items) if total is None else total
    shown = fairly_listed(items, most)
    more = f" (and {total - len(shown)} more)" if total > len(shown) else ""
    return "; ".join(shown) + more


def fairly_listed(items: Sequence[str], most: int = MAX_LEFT_OUT_LISTED) -> list[str]:
    """At most `most` of `items`, taken from each service in turn (an item's service: its text
    before the first ", "), in their order. Taken in sorted order, one registrant's 1,100
    instances of a service sorting first filled the list, and a real service's problem was on
    neither the page nor the check (helper-133, /tmp/rev79)."""
    if len(items) <= most:
        return list(items)
    groups: dict[str, list[int]] = {}
    for at, item in enumerate(items):
        groups.setdefault(item.split(", ", 1)[0], []).append(at)
    chosen: list[int] = []
    for row in itertools.zip_longest(*groups.values()):
        chosen.extend(at for at in row if at is not None)
        if len(chosen) >= most:
            break
    return [items[at] for at in sorted(chosen[:most])]


# Where the reports cut a service name (`logs.shown`): the listing's notes at 100 characters, an
# instance's items at `dependency.QUOTED_LIMIT` (test_status_server checks the two agree).
NAME_CUTS = (100, 200)


def of_service(items: Sequence[str], service: str, most: int = MAX_LEFT_OUT_LISTED) -> tuple[list[str], int]:
    """The items of `items` about `service`, as the page's search asks (`/left-out`): at most `most`
    of them, and how many there are. `service` as the items show it: a plain name, or quoted as
    Python quotes it (a name with other characters), or cut where the reports cut a long one
    (another name of the same start and length is found with it). When 1,000 services' items fill
    the listed ones, a victim's are found this way (helper-133, /tmp/rev79)."""
    forms = dict.fromkeys((service, repr(service), *(shown(service, cut) for cut in NAME_CUTS)))
    prefixes = tuple(f"service {form}{end}" for form in forms for end in ",:")
    found = [item for item in items if item.startswith(prefixes)]
    return found[:most], len(found)


MAX_SERVERS_LISTED = 1000  # per template, in /status and on the page (the counts are always whole)

_SECTIONS = frozenset(
    {
        "global", "defaults", "frontend", "backend", "listen", "resolvers", "peers", "userlist", "mailers",
        "program", "http-errors", "ring", "cache", "log-forward", "fcgi-app", "crt-store", "traces",
    }
)  # fmt: skip
# A line that may open a section: it starts with a word (confirmed by `section_chunks`). An
# indented section line is not a candidate: it only stays in the chunk before it.
_SECTION_CANDIDATE = re.compile(r"\n(?=[^\s#])")
_LEFT_OUT_COMMENT = re.compile(r"#[ \t]*left out:[ \t]*(.*)$", re.MULTILINE)
# The report's own words are found outside quoted values only: a value Consul gave is quoted by
# `shown` (Python's repr: `'…'` or `"…"`, its quotes escaped inside), so that a name holding
# ", field Address: drained" splits nothing.
_QUOTED = r"'(?:[^'\\\n]|\\.)*'" + "|" + r'"(?:[^"\\\n]|\\.)*"'
_FIELD_REASON = re.compile(rf"^(?P<what>(?:{_QUOTED}|[^'\"])*?, field [^:'\"]+): (?P<why>.*)$", re.DOTALL)
_PLAIN_REASON = re.compile(rf"^(?P<what>(?:{_QUOTED}|[^:'\"])+): (?P<why>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ServerView:
    """One `server` line as an operator reads it."""

    name: str
    address: str
    weight: int  # HAProxy's default is 1
    state: str  # "active", "backup" or "maintenance" (the line says `disabled`)
    checked: bool  # health-checked (`check`)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "weight": self.weight, "state": self.state,
                "checked": self.checked}  # fmt: skip


@dataclass(frozen=True)
class BackendView:
    """A `backend` (or a `listen` with servers) and its servers, in file order."""

    name: str
    servers: tuple[ServerView, ...]


def read_backends(text: str) -> tuple[BackendView, ...]:
    """Every backend section, and every listen section that has servers, with their servers."""
    found: list[BackendView] = []
    kind, name, servers = "", "", list[ServerView]()
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in _SECTIONS:
            _close(found, kind, name, servers)
            kind, name, servers = words[0], " ".join(words[1:]), []
        elif words[0] == "server" and kind in ("backend", "listen") and len(words) >= 3:
            servers.append(_server(words))
    _close(found, kind, name, servers)
    return tuple(found)


def section_chunks(text: str) -> list[str]:
    """`text` cut before each line that opens a section, so that `read_backends` of each chunk,
    joined, is `read_backends(text)`. A cut is made only after a newline (always a line break) and
    only where that line's first word is a section keyword, read by the same rule as
    `read_backends`; a section line the quick scan misses only leaves two sections in one chunk."""
    cuts = [0]
    for match in _SECTION_CANDIDATE.finditer(text):
        start = match.end()
        end = text.find("\n", start)
        line = text[start : end if end >= 0 else len(text)].splitlines()[:1]
        words = line[0].split("#", 1)[0].split() if line else []
        if words and words[0] in _SECTIONS:
            cuts.append(start)
    cuts.append(len(text))
    return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]


@dataclass
class BackendReader:
    """`read_backends` with a memory of the last text's sections: a change to a 10,000-server file
    touches a few sections, and only those are read again (the rest are dictionary lookups)."""

    _memo: dict[str, tuple[BackendView, ...]] = field(default_factory=dict)

    def read(self, text: str) -> tuple[BackendView, ...]:
        memo: dict[str, tuple[BackendView, ...]] = {}
        found: list[BackendView] = []
        for chunk in section_chunks(text):
            views = memo.get(chunk)
            if views is None:
                views = self._memo.get(chunk)
                if views is None:
                    views = read_backends(chunk)
                memo[chunk] = views
            found += views
        self._memo = memo
        return tuple(found)


def _close(found: list[BackendView], kind: str, name: str, servers: list[ServerView]) -> None:
    if kind == "backend" or (kind == "listen" and servers):
        found.append(BackendView(name, tuple(servers)))


def _server(words: list[str]) -> ServerView:
    options = words[3:]
    weight = 1
    if "weight" in options[:-1]:
        value = options[options.index("weight") + 1]
        # ASCII digits only, and short: '²' is a digit int() refuses, and a 5,000-digit one passes
        # its limit; either raised from a view that promises never to (an attacker's review).
        weight = int(value) if value.isascii() and value.isdigit() and len(value) <= 6 else weight
    state = "maintenance" if "disabled" in options else "backup" if "backup" in options else "active"
    return ServerView(words[1], words[2], weight, state, "check" in options)


@dataclass(frozen=True)
class LeftOut:
    """One instance or part left out of a file, split into what it is and why."""

    what: str
    why: str

    @classmethod
    def parse(cls, item: str) -> LeftOut:
        """`service web, instance 'x' on node 'n', field Address: <why>` → (the instance and field, why)."""
        match = _FIELD_REASON.match(item) or _PLAIN_REASON.match(item)
        return cls(match["what"], match["why"]) if match else cls(item, "")

    def as_dict(self) -> dict[str, str]:
        return {"what": self.what, "why": self.why}


@dataclass
class Served:
    """What one template's output that HAProxy (or the command) runs holds, and how it got there.

    The listing is read from the content when first asked for (the check, `/status`), not on the
    path of a change. Read whole, a 10,000-server file takes 20-30 ms of the loop, once a second
    (the check follows every apply); the reader, handed from one Served to the next, remembers the
    last file's sections, so after a change only the sections that changed are read (~1.5 ms).
    """

    content: str = field(repr=False)
    kind: ApplyKind  # how the last change was applied
    after_change_ms: float | None  # from the Consul change to applied
    at: float  # wall-clock time of the last apply
    previous: str | None = field(default=None, repr=False)  # the content it replaced, for the diff
    reader: BackendReader = field(default_factory=BackendReader, repr=False, compare=False)

    @classmethod
    def of(cls, content: str, kind: ApplyKind, after_change_s: float, previous: Served | None = None) -> Served:
        """`previous`: what this output replaces (kept for the diff; its reader's memory of the
        sections makes reading this one cost the sections that changed)."""
        after = round(after_change_s * 1000, 1) if after_change_s == after_change_s else None
        if previous is None:
            return cls(content, kind, after, time.time())
        return cls(content, kind, after, time.time(), previous.content, previous.reader)

    @functools.cached_property
    def backends(self) -> tuple[BackendView, ...]:
        return self.reader.read(self.content)

    @functools.cached_property
    def counts(self) -> tuple[int, int, tuple[str, ...]]:
        """(backends, servers, the template's "left out: …" comments, each `cut`)."""
        servers = sum(len(backend.servers) for backend in self.backends)
        return len(self.backends), servers, tuple(cut(note) for note in _LEFT_OUT_COMMENT.findall(self.content))

    def listing(self) -> list[dict[str, Any]]:
        """Backends → servers, at most MAX_SERVERS_LISTED servers in all (the counts say how many)."""
        room, listed = MAX_SERVERS_LISTED, []
        for backend in self.backends:
            shown = backend.servers[: max(room, 0)]
            room -= len(shown)
            listed.append({"name": backend.name, "servers": [s.as_dict() for s in shown],
                           "more": len(backend.servers) - len(shown)})  # fmt: skip
        return listed

    def as_dict(self) -> dict[str, Any]:
        backends, servers, left_out = self.counts
        return {"backends": backends, "servers": servers, "left_out": list(left_out[:MAX_LEFT_OUT_LISTED]),
                "left_out_total": len(left_out), "kind": self.kind,
                "after_change_ms": self.after_change_ms, "at": self.at, "listing": self.listing(),
                "has_previous": self.previous is not None}  # fmt: skip

    def describe(self, name: str) -> str:
        backends, servers, left_out = self.counts
        lag = f" {self.after_change_ms:.0f} ms after the Consul change" if self.after_change_ms is not None else ""
        when = time.strftime("%H:%M:%S", time.localtime(self.at))
        if self.kind is ApplyKind.ALREADY_LIVE:
            text = f"{name}: {backends} backend(s), {servers} server(s); already live when the renderer started"
        else:
            text = f"{name}: {backends} backend(s), {servers} server(s); last applied by {self.kind}{lag} at {when}"
        if left_out:
            text += f"; left out: {first_few(left_out)}"
        return text
