"""A rejected file never freezes the rest: the part `haproxy -c` names is left out, the rest applied.

When HAProxy rejects a rendered file, its messages name a place (`[file:LINE]`) or a proxy
(`backend 'api'`, `Proxy 'api'`). If that place is inside a backend (or listen) section, the file
is repaired and checked again:
- a `server` line is dropped (the other servers of the backend stay);
- any other line of a backend: the whole section is replaced by the version the live file has
  (the last one HAProxy accepted), or by an empty backend of that name when it has none, so
  `use_backend` rules keep resolving; a second section of a name already declared is dropped.
What was left out is remembered per destination (`Quarantine`) and taken out of the next renders
before they are checked, so a bad registration costs one failed check, not one per change; it is
forgotten once the render no longer carries it, and tried again every `RECHECK_S` (a host name
that failed to resolve once comes back once it resolves). A place outside backends (global, defaults, a
frontend: the template's own text) is not repaired: the file stays rejected and is reported.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from renderer.deliver.write import live_bytes, write_atomically
from renderer.errors import WriteError
from renderer.haproxy.config_text import SECTION_KEYWORDS, bind_addresses, changed_span, split_bind_address

log = logging.getLogger(__name__)

REPAIRABLE = frozenset({"backend", "listen"})
MAX_ROUNDS = 4  # each round leaves out at least one part; a file needing more stays rejected
RECHECK_S = 300.0  # a part left out is tried again this long after (one failed check if still bad)
FEW_PARTS = 8  # Quarantine.apply: up to this many parts, each one's section is read back from it
PORT_HOLD_S = 600.0  # a port a listener served stays its own this long after the render stopped binding it

_LINE = re.compile(r"\[[^\]\n]*:(\d+)\]")
_PROXY = re.compile(r"(?:backend|proxy|listen) '([^'\n]{1,200})'", re.IGNORECASE)
_DUPLICATE = "has the same name as"


@dataclass(frozen=True)
class LeftOut:
    """One part of a rendered file left out because HAProxy rejected it."""

    section: str  # its header, e.g. "backend api"
    text: str  # the exact text taken out (a server line, or the whole section)
    replacement: str  # what stands in its place ("" or the live/empty section)
    reason: str  # why: HAProxy's message, or the clash
    at: float = field(default_factory=time.monotonic)  # when it was left out

    def describe(self) -> str:
        what = self.text.strip().splitlines()[0] if self.text.strip() else self.section
        part = "server line" if what.startswith("server ") else "section"
        return f"{self.section}: {part} {what[:120]!r} left out ({self.reason[:220]})"


@dataclass
class Quarantine:
    """What one destination has left out, applied to each new render before its check."""

    parts: list[LeftOut] = field(default_factory=list)

    def apply(self, content: str) -> str:
        """`content` with every remembered part taken out where it was, in a section of its header
        (a custom template may write one server line in two backends: only the one HAProxy named
        goes); parts no longer rendered there are forgotten. In the order they were left out, each
        in what the ones before left, as the repair rounds cut them: a section left out in a
        second round holds its text without the server line a first round took."""
        now = time.monotonic()
        rendered = [part for part in self.parts if now - part.at < RECHECK_S]  # found in the cut content below
        # Many parts: every section start found once and kept in step with the cuts (a binary search
        # each); a few: each one's section read back from it (one file scan would cost more).
        headers = _Headers.of(content) if len(rendered) > FEW_PARTS else None
        kept: list[LeftOut] = []
        for part in rendered:
            span = _span_in(part, content, headers)
            if span is not None:
                content = content[: span[0]] + part.replacement + content[span[1] :]
                if headers is not None:
                    headers.cut(span, part.replacement)
                kept.append(part)
        self.parts = kept
        return content

    def described(self) -> tuple[str, ...]:
        return tuple(part.describe() for part in self.parts)

    def expiries(self) -> list[float]:
        """When each part left out is tried again (monotonic): the next `apply` after it renders it."""
        return [part.at + RECHECK_S for part in self.parts]


def repair(content: str, check_output: str, live: str | None) -> tuple[str, list[LeftOut]] | None:
    """`content` without the parts HAProxy's `check_output` names, each taken out where it was
    named (never another copy of its text), or None when none is in a backend (nothing this
    module may leave out)."""
    lines = content.splitlines(keepends=True)
    sections = _sections(lines)
    offsets = list(itertools.accumulate(map(len, lines), initial=0))
    found: dict[tuple[int, int], LeftOut] = {}  # by place: one part named by several alerts is left out once
    for message in _alerts(check_output):
        named = _part_for(message, lines, sections, live)
        if named is not None:
            (start, end), part = named
            found.setdefault((offsets[start], offsets[end]), part)
    if not found:
        return None
    kept = _outermost(found)
    return _cut(content, {span: part.replacement for span, part in kept.items()}), list(kept.values())


def _outermost(parts: dict[tuple[int, int], LeftOut]) -> dict[tuple[int, int], LeftOut]:
    """The parts not inside another one (a server line of a section left out whole goes with it)."""
    kept: dict[tuple[int, int], LeftOut] = {}
    end = -1
    for span in sorted(parts, key=lambda span: (span[0], -span[1])):
        if span[0] >= end:
            kept[span] = parts[span]
            end = span[1]
    return kept


def _cut(content: str, cuts: dict[tuple[int, int], str]) -> str:
    """`content`, each span (start, end) of characters replaced by its text; spans do not overlap."""
    if not cuts:
        return content
    out: list[str] = []
    at = 0
    for (start, end), replacement in sorted(cuts.items()):
        out += (content[at:start], replacement)
        at = end
    out.append(content[at:])
    return "".join(out)


def _span_in(part: LeftOut, content: str, headers: _Headers | None) -> tuple[int, int] | None:
    """Where `part` is in `content` (character offsets): a copy of its text in whole lines in a
    section of its header (a whole section: from its header up to the next section); None when
    there is none. `headers`: the sections of `content`, if found already."""
    whole = _section_header(_line_at(part.text, 0)) == part.section  # else a line (or lines) of it
    at = content.find(part.text)
    while at >= 0:
        end = at + len(part.text)
        starts = at == 0 or content[at - 1] == "\n"
        if end == len(content) or not whole:
            ends = end == len(content) or part.text.endswith("\n")
        else:
            ends = (
                headers.starts_at(end) if headers is not None else _section_header(_line_at(content, end)) is not None
            )
        holding = headers.holding(at) if headers is not None else _header_of_line_at(content, at)
        if starts and ends and holding == part.section:
            return at, end
        at = content.find(part.text, at + 1)
    return None


@dataclass
class _Headers:
    """Where each section of a text starts, with its header, kept in step with the cuts made in it
    (`Quarantine.apply`): a part's section is then a binary search, not a walk back over its lines."""

    starts: list[int]
    names: list[str]

    @classmethod
    def of(cls, content: str) -> _Headers:
        starts = [0] if _section_header(_line_at(content, 0)) is not None else []
        starts += [match.start() + 1 for match in _HEADER_START.finditer(content)]
        return cls(starts, [_section_header(_line_at(content, at)) or "" for at in starts])

    def holding(self, at: int) -> str | None:
        """The header of the section holding offset `at`."""
        index = bisect.bisect_right(self.starts, at) - 1
        return self.names[index] if index >= 0 else None

    def starts_at(self, at: int) -> bool:
        index = bisect.bisect_left(self.starts, at)
        return index < len(self.starts) and self.starts[index] == at

    def cut(self, span: tuple[int, int], replacement: str) -> None:
        """`span` of the text replaced by `replacement` (a line, or a section by its stand-in or by
        nothing): the sections it held go, the stand-in's come, those after it move."""
        start, end = span
        first, last = bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)
        new = _Headers.of(replacement) if replacement else _Headers([], [])
        delta = len(replacement) - (end - start)
        self.starts[first:] = [start + at for at in new.starts] + [at + delta for at in self.starts[last:]]
        self.names[first:] = new.names + self.names[last:]


def _line_at(content: str, at: int) -> str:
    end = content.find("\n", at)
    return content[at : end if end >= 0 else len(content)]


def _section_header(line: str) -> str | None:
    """`backend api` for a line that starts a section, else None (as `_sections` reads them)."""
    words = line.split(maxsplit=2)
    if words and words[0] in SECTION_KEYWORDS and not line[:1].isspace():
        return " ".join(words[:2])
    return None


def _header_of_line_at(content: str, at: int) -> str | None:
    """The header of the section holding the line that starts at `at`: that line, or the last
    header line before it, found by scanning back in growing windows (C speed: a server line deep
    in a backend of thousands is found in a few scans, not a Python step per line)."""
    header = _section_header(_line_at(content, at))
    if header is not None:
        return header
    window = 4096
    while True:
        start = max(0, at - window)
        found = [match.start() for match in _HEADER_START.finditer(content, start, at)]
        if found:
            return _section_header(_line_at(content, found[-1] + 1))
        if start == 0:
            return _section_header(_line_at(content, 0)) if at > 0 else None
        window *= 4


_HEADER_START = re.compile(r"\n(?=(?:" + "|".join(sorted(SECTION_KEYWORDS)) + r")(?![^ \t\r\n]))")


@dataclass
class PortHolds:
    """Ports that sections of the live file served and the render no longer binds for them, each
    held for its section for PORT_HOLD_S (per destination). A redeploy that deregisters a TCP
    service's only instance before registering the new one takes the service out of the catalog
    for a moment, and a restart forgets what its instances agreed on: without the hold, a
    registration asking for the port took it then, and kept it once back as the live one."""

    held: dict[int, tuple[str, float]] = field(default_factory=dict)  # port → (section header, since)
    kept_at: Path | None = None  # where the holds are kept across a restart (see `for_destination`)
    _live: str | None = field(default=None, repr=False)  # the live file last read, and its binds
    _live_binds: dict[str, set[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_destination(cls, destination: Path) -> PortHolds:
        """The holds of `destination`, with those a previous run kept beside it still running
        (`.NAME.port-holds.json`, each with its wall-clock end). A restart forgot them: within the
        10 minutes after a listener left the applied file, a newcomer asking for its port took it."""
        kept_at = destination.with_name(f".{destination.name}.port-holds.json")
        return cls(held=_read_holds(kept_at), kept_at=kept_at)

    def serving(self, live: str | None) -> dict[str, set[int]]:
        """The ports each section of the live file binds (scanned again only when it changed)."""
        if live is None:
            return {}
        if live != self._live:
            self._live, self._live_binds = live, _binds(live)
        return self._live_binds

    def update(self, serving: dict[str, set[int]], binding: dict[str, set[int]], now: float) -> None:
        """`serving`: the live file's ports by section; `binding`: the render's. A hold ends when it
        expires, or once the live file shows its section binding the port again (a render that
        binds it is not enough: it may never be applied, and the newcomer would then win)."""
        before = dict(self.held)
        for header, served in serving.items():
            if header.split(" ", 1)[0] in REPAIRABLE:  # a service's, not the template's own
                for port in served - binding.get(header, set()):
                    self.held[port] = (header, now)  # it serves it until the live file says otherwise
        for port, (header, since) in list(self.held.items()):
            if (port in serving.get(header, ()) and port in binding.get(header, ())) or now - since >= PORT_HOLD_S:
                del self.held[port]
        if self.kept_at is not None and (self.held.keys() != before.keys() or _ends(self.held) != _ends(before)):
            _keep_holds(self.kept_at, self.held)

    def expiries(self) -> list[float]:
        """When each hold ends (monotonic): the next settle after it frees the port for a newcomer."""
        return [since + PORT_HOLD_S for _, since in self.held.values()]

    def owners(self, live: str | None) -> dict[str, set[int]]:
        """The ports each section keeps against a newcomer (see `_Claim.rank`): those it binds in the
        live file, and those held for it."""
        owned = {header: set(ports) for header, ports in self.serving(live).items()}
        for port, (header, _) in self.held.items():
            owned.setdefault(header, set()).add(port)
        return owned

    def against(self, claim: _Claim, now: float) -> str | None:
        """Why `claim` may not bind one of its ports now, if it may not: held for another section."""
        for port in claim.ports:
            holder = self.held.get(port)
            if holder is not None and holder[0] != claim.section.header:
                ago, left = now - holder[1], PORT_HOLD_S - (now - holder[1])
                return (
                    f"port {port} was served by {holder[0]} until {ago:.0f} s ago and stays held for it for "
                    f"{left:.0f} s more (a redeploy brings it back); give this service another port "
                    "(meta haproxy_port), or wait"
                )
        return None


_KEPT_HOLD = re.compile(r"(?:listen|backend) [!-~]{1,400}")  # as `_section_header` writes it
_ENDS_ROUNDED_S = 5.0  # a hold's end is kept again only when it moved this much (refreshed every settle)


def _ends(held: dict[int, tuple[str, float]]) -> dict[int, tuple[str, int]]:
    return {port: (header, round(since / _ENDS_ROUNDED_S)) for port, (header, since) in held.items()}


def _read_holds(path: Path) -> dict[int, tuple[str, float]]:
    """The holds a previous run kept at `path` that have not ended (monotonic `since` of this
    run); none when there is no file or it cannot be read (said once: the holds start empty)."""
    try:
        raw = live_bytes(path)
        kept = json.loads(raw) if raw is not None else {}
    except (WriteError, ValueError, RecursionError) as err:
        log.warning("port holds at %s not read (%s); starting with none", path, err)
        return {}
    held: dict[int, tuple[str, float]] = {}
    now_wall, now = time.time(), time.monotonic()
    for port, entry in kept.items() if isinstance(kept, dict) else ():
        if not (isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5):
            continue
        if not (0 < int(port) < 65536 and isinstance(entry, list) and len(entry) == 2):
            continue
        header, ends = entry
        if not (isinstance(header, str) and _KEPT_HOLD.fullmatch(header)):
            continue
        try:
            left = float(ends) - now_wall if isinstance(ends, int | float) and not isinstance(ends, bool) else -1.0
        except OverflowError:  # an integer too large for a float
            continue
        if math.isfinite(left) and left > 0:
            left = min(left, PORT_HOLD_S)  # the wall clock stepped back: no hold lasts longer than its time
            held[int(port)] = (header, now - (PORT_HOLD_S - left))
    return held


def _keep_holds(path: Path, held: dict[int, tuple[str, float]]) -> None:
    """Keep `held` at `path` for the next run, each with its wall-clock end (the file goes when
    none is held); a failure is said, and the holds live on in this process."""
    now_wall, now = time.time(), time.monotonic()
    kept = {
        str(port): [header, round(now_wall + PORT_HOLD_S - (now - since), 3)] for port, (header, since) in held.items()
    }
    try:
        if kept:
            write_atomically(path, json.dumps(kept, sort_keys=True))
        else:
            path.unlink(missing_ok=True)
    except (WriteError, OSError) as err:
        log.warning("port holds not kept at %s (a restart forgets them): %s", path, err)


def duplicate_binds(content: str, live: str | None = None, holds: PortHolds | None = None) -> tuple[str, list[LeftOut]]:
    """`content` without the backend/listen sections that bind a port another section keeps.

    HAProxy accepts two listeners on one port (SO_REUSEPORT) and `haproxy -c` says nothing, but the
    kernel would then share the port's connections between them: a TCP service asking for the
    frontend's port, or two asking for one port, would take traffic from another. Who keeps a port:
    a section that cannot be left out (the template's frontend), else a section that binds it in
    `live` (the file HAProxy runs) and still binds it, else the first section. So a registration
    never moves a port away from the service serving it, whatever their names' order; the others
    are left out and reported. Costs one regular-expression scan when nothing is duplicated."""
    return _without_clashes(content, lambda: live, holds)


def duplicate_binds_after(
    content: str, free: str | None, live_at: Path | None = None, holds: PortHolds | None = None
) -> tuple[str, list[LeftOut]]:
    """`duplicate_binds(content, live)`, where `free` is earlier content it found no clash in and
    `live_at` the file HAProxy runs (a file that is missing or cannot be read counts as none), and
    with `holds`, the destination's ports held for sections gone from the render (see PortHolds;
    the live file is then read whenever bind lines changed): when `free` and `content` differ only
    in sections without the word "bind" (a membership change), every bind line is the same and
    there is no clash, found without scanning the whole file (a ~0.5 MB scan per change at 1,000
    services)."""
    if free is not None:
        start, free_end, content_end = changed_span(free, content)
        if "bind" not in free[start:free_end] and "bind" not in content[start:content_end]:
            return content, []
    return _without_clashes(content, lambda: _live_text(live_at) if live_at is not None else None, holds)


def _without_clashes(
    content: str, live: Callable[[], str | None], holds: PortHolds | None = None
) -> tuple[str, list[LeftOut]]:
    """`duplicate_binds`, reading the live file (`live()`) only when a port is bound twice or
    `holds` are kept; a section binding a port held for another is left out too."""
    now = time.monotonic()
    ports = [p for p in map(_bind_port, bind_addresses(content)) if p is not None]
    running = live() if holds is not None else None
    if holds is not None:
        serving = holds.serving(running)
        if holds.held or any(header.split(" ", 1)[0] in REPAIRABLE for header in serving):
            holds.update(serving, _binds(content), now)  # a listener served a port: still bound?
    duplicated = len(ports) != len(set(ports))
    if not duplicated and not (holds is not None and holds.held and not holds.held.keys().isdisjoint(ports)):
        return content, []
    lines = content.splitlines(keepends=True)
    if holds is None:
        running = live()
        serving = _binds(running) if running is not None else {}
    else:
        serving = holds.owners(running)
    sections = _sections(lines)
    claims = [_Claim.of(section, lines, serving) for section in sections]
    referenced = _referenced_names(content)
    owners: dict[int, _Claim] = {}
    found: dict[int, LeftOut] = {}  # by the index of the section's header line
    for claim in sorted(claims, key=_Claim.rank):
        clash = next((p for p in claim.ports if p in owners), None)
        held = holds.against(claim, now) if holds is not None and claim.section.kind in REPAIRABLE else None
        if (clash is not None or held is not None) and claim.section.kind in REPAIRABLE:
            replacement = _unbound_stand_in(claim.section) if claim.section.name in referenced else ""
            why = _clash(clash, owners[clash]) if clash is not None else str(held)
            found[claim.section.start] = LeftOut(claim.section.header, claim.text, replacement, why)
            continue
        owners.update({p: claim for p in claim.ports if p not in owners})
    if not found:
        return content, []
    offsets = list(itertools.accumulate(map(len, lines), initial=0))
    cuts = {(offsets[s.start], offsets[s.end]): found[s.start].replacement for s in sections if s.start in found}
    return _cut(content, cuts), [found[start] for start in sorted(found)]


@dataclass(frozen=True)
class _Claim:
    """A section of the rendered file and the ports it binds; `serving`: it binds one of them in
    the live file too."""

    section: _Section
    text: str
    ports: tuple[int, ...]
    serving: bool

    @classmethod
    def of(cls, section: _Section, lines: list[str], serving: dict[str, set[int]]) -> _Claim:
        text = "".join(lines[section.start : section.end])
        ports = tuple(p for p in map(_bind_port, bind_addresses(text)) if p is not None)
        return cls(section, text, ports, bool(serving.get(section.header, set()).intersection(ports)))

    def rank(self) -> tuple[int, int]:
        """Who keeps a port first: sections never left out, then the live ones, then file order."""
        return (0 if self.section.kind not in REPAIRABLE else 1 if self.serving else 2), self.section.start


def _clash(port: int, owner: _Claim) -> str:
    serving = ", which serves it now" if owner.serving and owner.section.kind in REPAIRABLE else ""
    return (
        f"port {port} is already bound by {owner.section.header}{serving}; "
        "give this service another port (meta haproxy_port) or free that one"
    )


def _binds(text: str) -> dict[str, set[int]]:
    """The ports each section of `text` binds, by header ("listen db"): the bind lines found in one
    pass, each section's header read back from its line (bind lines open their sections)."""
    found: dict[str, set[int]] = {}
    for match in _BIND_AT.finditer("\n" + text):  # "\n" first: the scan skips to each newline (a "^" is far slower)
        port = _bind_port(match.group(1))
        if port is not None:  # the match's "\n" is at the offset of its line in `text`
            found.setdefault(_header_of_line_at(text, match.start()) or "", set()).add(port)
    return found


_BIND_AT = re.compile(r"\n[ \t]*bind[ \t]+(\S+)")


def _live_text(path: Path) -> str | None:
    try:
        live = live_bytes(path)
    except (WriteError, OSError) as err:  # e.g. a directory there (fdopen's IsADirectoryError)
        log.warning("port clashes settled without the live file: %s", err)
        return None
    return live.decode(errors="replace") if live is not None else None


def _bind_port(address: str) -> int | None:
    return split_bind_address(address)[1]


def _alerts(output: str) -> list[str]:
    return [line for line in output.splitlines() if "[ALERT]" in line and "Error(s) found" not in line]


@dataclass(frozen=True)
class _Section:
    kind: str
    name: str
    start: int  # index of its header line
    end: int  # index after its last line

    @property
    def header(self) -> str:
        return f"{self.kind} {self.name}".strip()


def _sections(lines: list[str]) -> list[_Section]:
    found: list[_Section] = []
    for index, line in enumerate(lines):
        words = line.split()
        if words and words[0] in SECTION_KEYWORDS and not line[:1].isspace():
            if found:
                found[-1] = _Section(found[-1].kind, found[-1].name, found[-1].start, index)
            found.append(_Section(words[0], " ".join(words[1:2]), index, len(lines)))
    return found


def _part_for(
    message: str, lines: list[str], sections: list[_Section], live: str | None
) -> tuple[tuple[int, int], LeftOut] | None:
    """The part a message names, with its span of lines, if it is one this module may leave out."""
    source = "HAProxy's reload" if "(reload)" in message.split(" : config : ", 1)[0] else "haproxy -c"
    reason = f"{source}: " + message.split(" : config : ", 1)[-1].strip()
    section, line_index = _place(message, lines, sections)
    if section is None or section.kind not in REPAIRABLE:
        return None
    whole = (section.start, section.end)
    text = "".join(lines[section.start : section.end])
    if _DUPLICATE in message or _declared_before(section, sections):
        return whole, LeftOut(section.header, text, "", reason)
    if line_index is not None and lines[line_index].split()[:1] == ["server"]:
        return (line_index, line_index + 1), LeftOut(section.header, lines[line_index], "", reason)
    return whole, LeftOut(section.header, text, _stand_in(section, live), reason)


def _place(message: str, lines: list[str], sections: list[_Section]) -> tuple[_Section | None, int | None]:
    """The section (and line index) a message names: by `[file:LINE]`, else by proxy name."""
    at = _LINE.search(message)
    if at is not None:
        index = int(at.group(1)) - 1
        if 0 <= index < len(lines):
            return next((s for s in sections if s.start <= index < s.end), None), index
    named = _PROXY.search(message)
    if named is not None:
        found = [s for s in sections if s.name == named.group(1) and s.kind in REPAIRABLE]
        if found:
            return found[-1], None
    return None, None


def _declared_before(section: _Section, sections: list[_Section]) -> bool:
    return any(s.name == section.name and s.kind in REPAIRABLE and s.start < section.start for s in sections)


def _referenced_names(content: str) -> set[str]:
    """The proxies a `default_backend` or `use_backend` line names literally: one left out whole
    would fail the whole file (`unable to find required default_backend`). One scan of the file
    for all of them (a scan per section left out took 4.6 s at 1,000 clashes)."""
    return set(_BACKEND_REFERENCE.findall(content))


_BACKEND_REFERENCE = re.compile(r"^[ \t]*(?:default_backend|use_backend)[ \t]+(\S+)", re.MULTILINE)


def _unbound_stand_in(section: _Section) -> str:
    """An empty section of the same name, binding nothing: what a proxy left out for its port keeps
    for those who name it (they answer 503 until the clash is resolved)."""
    return f"{section.header}\n    # left out by consul-renderer: the port it binds is another's\n\n"


def _stand_in(section: _Section, live: str | None) -> str:
    """The live file's version of the section, or an empty one of the same name."""
    if live is not None:
        live_lines = live.splitlines(keepends=True)
        for candidate in _sections(live_lines):
            if candidate.header == section.header:
                found = "".join(live_lines[candidate.start : candidate.end])
                return found if found.endswith("\n") else found + "\n"  # the live file's last line
    return f"{section.header}\n    # left out by consul-renderer: HAProxy rejected its rendered lines\n\n"
