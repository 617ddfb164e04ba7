"""What an apply changed, told to Status for the timeline: the servers added, removed or changed,
and for a reload why the Runtime API could not take it.

The runtime plan already names the server changes of a hitless apply; it is passed on, not
recomputed. A reload has no plan, so its server changes and its reason (the first line that is not
a server line) are read here, from the sections around what differs only (the change's span): the
cost follows the change, not the file. Never raises: what cannot be read is reported as unknown.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from renderer.deliver.change import ConfigChange
from renderer.deliver.runtime import ChangeAction, ServerChange
from renderer.errors import ApplyKind
from renderer.haproxy.config_text import (
    SERVER_SECTIONS,
    Section,
    Server,
    changed_span,
    parse_section,
    parse_server,
    split_raw,
)
from renderer.status.diff import hide_secrets
from renderer.status.timeline import AppliedChange, ReloadWhy, Servers

log = logging.getLogger(__name__)

MAX_LINE_SHOWN = 160


def describe_apply(previous: str | None, change: ConfigChange, kind: ApplyKind) -> AppliedChange:
    """What taking HAProxy from `previous` (what it served) to `change.content` by `kind` changed;
    the change's runtime plan (for a reload too: it was refused) and span are used, not redone."""
    if kind in (ApplyKind.NONE, ApplyKind.ALREADY_LIVE):
        return AppliedChange()
    plan = change.plan
    try:
        if kind is ApplyKind.RUNTIME and plan is not None:
            return from_plan(plan)
        if previous is None:
            return AppliedChange(reload_why=ReloadWhy.FIRST if kind is ApplyKind.RELOAD else None)
        span = change.span if previous == change.base else None
        added, removed, changed, line = compare(previous, change.content, span)
        why: ReloadWhy | None = None
        if kind is ApplyKind.RELOAD:
            why = ReloadWhy.RUNTIME_REFUSED if plan else ReloadWhy.STRUCTURAL if line else ReloadWhy.SERVERS_ONLY
        return AppliedChange(Servers.of(added), Servers.of(removed), Servers.of(changed), why, line if why else None)
    except Exception as err:  # contained: a report never fails an apply that succeeded
        log.warning("could not describe the %s apply for the timeline: %s: %s", kind, type(err).__name__, err)
        return AppliedChange(reload_why=ReloadWhy.STRUCTURAL if kind is ApplyKind.RELOAD else None)


def from_plan(plan: list[ServerChange]) -> AppliedChange:
    added = [_entry(c.backend, c.server) for c in plan if c.action is ChangeAction.ADD]
    removed = [_entry(c.backend, c.server) for c in plan if c.action is ChangeAction.REMOVE]
    changed = [_moved(c.backend, c.old, c.server) for c in plan if c.action is ChangeAction.SET and c.old]
    return AppliedChange(Servers.of(added), Servers.of(removed), Servers.of(changed))


def compare(
    old_text: str, new_text: str, span: tuple[int, int, int] | None = None
) -> tuple[list[str], list[str], list[str], str | None]:
    """(servers added, removed, changed, the first changed line that is not a server line)."""
    start, old_end, new_end = span or changed_span(old_text, new_text)
    old_chunks, new_chunks = split_raw(old_text[start:old_end]), split_raw(new_text[start:new_end])
    same = set(old_chunks) & set(new_chunks)  # sections equal in both: nothing to read
    old_sections = _sections(chunk for chunk in old_chunks if chunk not in same)
    new_sections = _sections(chunk for chunk in new_chunks if chunk not in same)
    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []
    first_line: str | None = None
    for header in _ordered(old_sections, new_sections):
        old, new = old_sections.get(header), new_sections.get(header)
        old_servers, old_other = _split(old)
        new_servers, new_other = _split(new)
        if old is not None and new is not None and header[0] in SERVER_SECTIONS:
            backend = header[1]
            added += [_entry(backend, new_servers[n]) for n in new_servers if n not in old_servers]
            removed += [_entry(backend, old_servers[n]) for n in old_servers if n not in new_servers]
            changed += [_moved(backend, old_servers[n], new_servers[n]) for n in new_servers
                        if n in old_servers and old_servers[n] != new_servers[n]]  # fmt: skip
        if first_line is None:
            first_line = _first_difference(header, old, new, old_other, new_other)
    return added, removed, changed, first_line


def _sections(chunks: Iterable[str]) -> dict[tuple[str, str], Section]:
    found: dict[tuple[str, str], Section] = {}
    for chunk in chunks:
        section = parse_section(chunk)
        if section is not None:
            found.setdefault((section.kind, section.name), section)
    return found


def _ordered(old: dict[tuple[str, str], Section], new: dict[tuple[str, str], Section]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(itertools.chain(new, old)))


def _split(section: Section | None) -> tuple[dict[str, Server], tuple[str, ...]]:
    """(servers by name, the other lines), tolerant: a server line that cannot be read counts as other."""
    if section is None:
        return {}, ()
    servers: dict[str, Server] = {}
    other: list[str] = []
    for line in section.lines:
        try:
            server = parse_server(line) if line.startswith("server ") else None
        except ValueError:
            server = None
        if server is not None and server.name not in servers:
            servers[server.name] = server
        else:
            other.append(line)
    return servers, tuple(other)


def _first_difference(
    header: tuple[str, str], old: Section | None, new: Section | None, old_other: tuple[str, ...],
    new_other: tuple[str, ...],
) -> str | None:  # fmt: skip
    where = f"{header[0]} {header[1]}".strip()
    if old is None:
        return f"{where}: section added"
    if new is None:
        return f"{where}: section removed"
    for index, (before, after) in enumerate(itertools.zip_longest(old_other, new_other)):
        if before == after:
            continue
        if after is not None and after not in old_other:
            return _shown(f"{where}: + {after}")
        if before is not None and before not in new_other:
            return _shown(f"{where}: - {before}")
        return _shown(f"{where}: line {index + 1} moved: {after or before}")
    return None


def _shown(line: str) -> str:
    """A config line for the timeline and the log, passwords hidden (`stats auth`, a userlist's):
    they reached /status, the page and the log line (helper-133, /tmp/rev79)."""
    line = hide_secrets(line)
    return line if len(line) <= MAX_LINE_SHOWN else line[: MAX_LINE_SHOWN - 1] + "…"


def _entry(backend: str, server: Server) -> str:
    return f"{backend}/{server.name} {_address(server)}"


def _address(server: Server) -> str:
    if server.port is None:
        return server.address
    return f"[{server.address}]:{server.port}" if ":" in server.address else f"{server.address}:{server.port}"


def _moved(backend: str, old: Server | None, new: Server) -> str:
    where = f"{backend}/{new.name}"
    if old is None:
        return where
    parts = []
    if _address(old) != _address(new):
        parts.append(f"address {_address(old)} → {_address(new)}")
    if old.option("weight") != new.option("weight"):
        parts.append(f"weight {old.option('weight') or '1'} → {new.option('weight') or '1'}")
    if old.has("disabled") != new.has("disabled"):
        parts.append("now in maintenance" if new.has("disabled") else "out of maintenance")
    return f"{where} {'; '.join(parts) or 'keywords changed'}"
