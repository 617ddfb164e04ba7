"""Hitless membership changes: turn a config change into Runtime API commands, or say it needs a reload.

`plan_runtime(old, new)` returns None when anything but server lines changed (a structural change:
the caller reloads) and otherwise the list of server changes. `RuntimeApplier.run(plan)` carries
them out in an order that never leaves a backend short: additions first, then changes, removals
last. Measured on HAProxy 2.8 and handled here:
- a server added at runtime starts in maintenance with health checks off: `enable health`, then
  `enable server`;
- it does not inherit `default-server` keywords, so they are spelled out in the `add server` line;
- only a server in maintenance without connections, idle ones included, can be deleted: `disable
  server` (no new request reaches it at once), then `del server` until its connections are gone.
  The default template sets a short `pool-purge-delay`, so idle keep-alive connections go within
  ms; without it they held `del server` off for more than 10 s under keep-alive load. Sessions are
  never killed (`shutdown sessions` fails in-flight requests), and no change waits for a drain: a
  server that cannot go at once stays in maintenance (it gets no traffic) and `cleanup()` deletes
  it later; if it comes back meanwhile with the same keywords, it is re-enabled in place.
Any refusal raises RuntimeApplyError and the caller falls back to a validated reload.

Every command is built from words checked for their position (`runtime_grammar`): a plan whose
words do not all match, or that would name two servers alike, is no plan (a validated reload
instead). Planning never raises: whatever it cannot read means "reload".
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from renderer.errors import ReloadError
from renderer.haproxy import runtime_grammar as words
from renderer.haproxy.checked import canonical_ip
from renderer.haproxy.config_text import (
    SERVER_SECTIONS,
    Section,
    Server,
    changed_span,
    defaults_before,
    parse_options,
    parse_section,
    servers_of,
    split_raw,
    takes_runtime_servers,
)
from renderer.haproxy.control import RuntimeAPI
from renderer.haproxy.keywords import FILE_KEYWORDS, UnknownServerKeyword
from renderer.haproxy.runtime_grammar import Command, UnsafeCommand

log = logging.getLogger(__name__)

# Keywords `set server` can change in place; anything else means delete and add again.
_IN_PLACE = ("weight", "disabled")


class ChangeAction(StrEnum):
    """What the Runtime API does to one server."""

    ADD = "add"
    REMOVE = "remove"
    SET = "set"  # address, port, weight or maintenance changed in place


class RuntimeApplyError(ReloadError):
    """The Runtime API refused a step; the caller reloads instead."""


@dataclass(frozen=True)
class ServerChange:
    action: ChangeAction
    backend: str
    server: Server
    old: Server | None = None
    defaults: tuple[tuple[str, str | None], ...] = ()

    @property
    def reads_files(self) -> bool:
        """An added server whose keywords (its own or its `default-server` ones) name a file HAProxy
        reads when it adds it (a CA, a CRL, a client certificate)."""
        keywords = {key for key, _ in self.server.options} | {key for key, _ in self.defaults}
        return self.action is ChangeAction.ADD and not keywords.isdisjoint(FILE_KEYWORDS)

    def describe(self) -> str:
        where = f"{self.backend}/{self.server.name}"
        if self.action is ChangeAction.SET and self.old is not None:
            return f"set {where} {self.old.address}:{self.old.port} → {self.server.address}:{self.server.port}"
        return f"{self.action} {where} {self.server.address}:{self.server.port}"


def plan_runtime(old_text: str, new_text: str, span: tuple[int, int, int] | None = None) -> list[ServerChange] | None:
    """The server changes between two configs, or None if anything else changed.

    Only the span of whole sections around what differs is cut into sections and compared (see
    `changed_span`; `span` when the caller has it), and only the sections that differ there are
    parsed, so the cost of a change follows the sections it touches, not the size of the file. A server line that cannot
    be read exactly (a keyword HAProxy 2.8 does not list) is never guessed at: None, a reload.
    """
    try:
        plan = _plan(old_text, new_text, span or changed_span(old_text, new_text))
        if plan is not None:
            for change in plan:
                change_commands(change)  # every word checked now, before any is sent
        return plan
    except (UnknownServerKeyword, UnsafeCommand, DuplicateServer) as err:
        log.info("applying by reload: a changed server line cannot be sent as runtime commands (%s)", err)
        return None
    except Exception as err:
        log.warning("applying by reload: planning runtime changes failed (%s: %s)", type(err).__name__, err)
        return None


class DuplicateServer(ValueError):
    """A backend names two servers alike: no runtime command could tell them apart."""


def _plan(old_text: str, new_text: str, span: tuple[int, int, int]) -> list[ServerChange] | None:
    start, old_end, new_end = span
    old_chunks, new_chunks = split_raw(old_text[start:old_end]), split_raw(new_text[start:new_end])
    if len(old_chunks) != len(new_chunks):
        return None
    changes: list[ServerChange] = []
    for index, (old_chunk, new_chunk) in enumerate(zip(old_chunks, new_chunks, strict=True)):
        if old_chunk == new_chunk:
            continue
        old, new = parse_section(old_chunk), parse_section(new_chunk)
        if old is None or new is None:
            if (old, new) != (None, None):
                return None
            continue
        if old.header != new.header:
            return None
        if old.kind not in SERVER_SECTIONS:
            if old.lines != new.lines:
                return None
            continue
        old_other, old_servers = _servers(old)
        new_other, new_servers = _servers(new)
        if old_other != new_other:
            return None
        at = start + sum(len(chunk) for chunk in new_chunks[:index])
        defaults = _default_server_options(new_text, at, new)
        section_changes = _server_changes(new.name, old_servers, new_servers, defaults)
        why = _by_reload(new, _defaults_section(new_text, at), section_changes)
        if why is not None:
            log.info("applying by reload: %s: %s", new.header, why)  # the timeline's SERVERS_ONLY says "see the log"
            return None
        changes += section_changes
    return changes


def membership_only(base: str, content: str, leave: Collection[str] = ()) -> str | None:
    """`base` with `content`'s server lines in each backend (or listen) section whose other lines,
    name and `defaults` section `content` leaves as they are: the part of a structural change the
    Runtime API can carry out on its own; sections named in `leave` stay as in `base`. None when
    there is no such part, or when anything cannot be read exactly. Like `plan_runtime`, it parses
    only the sections that differ."""
    try:
        start, base_end, content_end = changed_span(base, content)
        old_chunks, new_chunks = split_raw(base[start:base_end]), split_raw(content[start:content_end])
        unchanged = set(old_chunks) & set(new_chunks)
        old_found, new_found = _changed_sections(old_chunks, unchanged), _changed_sections(new_chunks, unchanged)
        out, taken = list(old_chunks), False
        for header, olds in old_found.items():
            news = new_found.get(header, [])
            if len(olds) != 1 or len(news) != 1:
                continue
            (index, old_at, old), (new_index, new_at, new) = olds[0], news[0]
            if old.name in leave:
                continue
            section_changes = _server_changes(new.name, servers_of(old)[1], servers_of(new)[1], ())
            if _by_reload(new, _defaults_section(content, start + new_at), section_changes) is not None:
                continue
            same_defaults = defaults_before(base, start + old_at) == defaults_before(content, start + new_at)
            if same_defaults and servers_of(old)[0] == servers_of(new)[0]:
                out[index], taken = new_chunks[new_index], True
        return base[:start] + "".join(out) + base[base_end:] if taken else None
    except Exception as err:  # planning never raises: no partial change, the reload carries it all
        log.debug("no membership part of the change (%s: %s)", type(err).__name__, err)
        return None


def _changed_sections(chunks: list[str], unchanged: set[str]) -> dict[str, list[tuple[int, int, Section]]]:
    """The backend and listen sections among `chunks` that are not `unchanged`, by header: (their
    index, their offset, the section), one per section of that header (a name used twice: several)."""
    found: dict[str, list[tuple[int, int, Section]]] = {}
    at = 0
    for index, chunk in enumerate(chunks):
        section = parse_section(chunk) if chunk not in unchanged else None
        if section is not None and section.kind in SERVER_SECTIONS:
            found.setdefault(section.header, []).append((index, at, section))
        at += len(chunk)
    return found


STATIC_BALANCE = (
    "its balance is static: HAProxy adds no server there (a hash balance takes servers at runtime with "
    "`hash-type consistent` beside it; static-rr never)"
)


def _by_reload(section: Section, defaults: Section | None, changes: list[ServerChange]) -> str | None:
    """Why HAProxy 2.8 would not take a section's server changes through the Runtime API, or None.
    A backend whose balance is static refuses `add server` ("Backend must use a dynamic load
    balancing…") and weights but 0% and 100% (helper-130, /tmp/rev76; it still takes removals and
    moves, helper-132, /tmp/rev78); a server named by a host name is resolved only when HAProxy
    loads its file: added at runtime it has no address (down for good), and `set server addr`
    refuses a name ("Invalid addr", helper-131, /tmp/rev77)."""
    static = not takes_runtime_servers(section, defaults)
    for change in changes:
        named = canonical_ip(change.server.address) is None  # not an IP address: a host name
        if change.action is ChangeAction.ADD and (static or named):
            return STATIC_BALANCE if static else "a server named by a host name"
        if change.action is ChangeAction.SET and change.old is not None:
            moved = (change.server.address, change.server.port) != (change.old.address, change.old.port)
            if named and moved:
                return "a server named by a host name moves"
            if static and change.server.option("weight") != change.old.option("weight"):
                return "its balance is static: HAProxy takes weights of 0% and 100% only there"
    return None


def _defaults_section(text: str, at: int) -> Section | None:
    defaults = defaults_before(text, at)
    return parse_section(defaults) if defaults is not None else None


def _servers(section: Section) -> tuple[tuple[str, ...], dict[str, Server]]:
    """`servers_of`, refusing a section that names two servers alike (DuplicateServer)."""
    others, servers = servers_of(section)
    count = sum(1 for line in section.lines if line.startswith("server "))
    if count != len(servers):
        raise DuplicateServer(f"{section.header} names two servers alike")
    return others, servers


def _default_server_options(text: str, at: int, section: Section) -> tuple[tuple[str, str | None], ...]:
    """The `default-server` keywords in force for the section at `at`: the last defaults', then its own."""
    options: dict[str, str | None] = {}
    defaults = defaults_before(text, at)
    parsed = parse_section(defaults) if defaults is not None else None
    if parsed is not None:
        options.update(_default_server_lines(parsed))
    options.update(_default_server_lines(section))
    return tuple(options.items())


def _default_server_lines(section: Section) -> dict[str, str | None]:
    merged: dict[str, str | None] = {}
    for line in section.lines:
        if line.startswith("default-server "):
            merged.update(parse_options(shlex.split(line)[1:]))
    return merged


def _server_changes(
    backend: str, old: dict[str, Server], new: dict[str, Server], defaults: tuple[tuple[str, str | None], ...]
) -> list[ServerChange]:
    """Additions first, then in-place changes, then replacements (remove + add), removals last."""
    adds = [
        ServerChange(ChangeAction.ADD, backend, new[name], defaults=defaults)
        for name in sorted(new.keys() - old.keys())
    ]
    sets, replacements = [], []
    for name in sorted(new.keys() & old.keys()):
        before, after = old[name], new[name]
        if before == after:
            continue
        if before.without(*_IN_PLACE) == after.without(*_IN_PLACE) and after.port is not None:
            sets.append(ServerChange(ChangeAction.SET, backend, after, old=before))
        else:  # other keywords changed: the same name must go before it can come back
            replacements += [
                ServerChange(ChangeAction.REMOVE, backend, before),
                ServerChange(ChangeAction.ADD, backend, after, defaults=defaults),
            ]
    removes = [ServerChange(ChangeAction.REMOVE, backend, old[name]) for name in sorted(old.keys() - new.keys())]
    return adds + sets + replacements + removes


def add_server_line(change: ServerChange) -> Command:
    """`add server` with the default-server keywords spelled out (runtime servers don't inherit them)."""
    server = change.server
    merged: dict[str, str | None] = dict(change.defaults)
    merged.update(dict(server.without("disabled")))
    line = ["add", "server", words.target(change.backend, server.name), words.endpoint(server.address, server.port)]
    for keyword, value in merged.items():
        line.append(words.keyword(keyword))
        if value is not None:
            line.append(words.argument(value))
    return words.command(*line)


def change_commands(change: ServerChange) -> list[Command]:
    """Every command a change may send, built from checked words (UnsafeCommand if one is not)."""
    where = words.target(change.backend, change.server.name)
    built = [words.command(verb, what, where) for verb in ("enable", "disable") for what in ("server", "health")]
    built.append(words.command("del", "server", where))
    if change.action is ChangeAction.ADD:
        built.append(add_server_line(change))
    if change.action is ChangeAction.SET:
        built += [command for command, _ in _set_commands(change)]
    return built


def _set_commands(change: ServerChange) -> list[tuple[Command, bool]]:
    """(command, whether HAProxy answers it with a message) for an in-place change."""
    assert change.old is not None
    where = words.target(change.backend, change.server.name)
    new, old = change.server, change.old
    built = []
    if (new.address, new.port) != (old.address, old.port):
        move = ("set", "server", where, "addr", words.address(new.address), "port", words.port(new.port))
        built.append((words.command(*move), True))  # answered "IP changed from … to …"
    if new.option("weight") != old.option("weight"):
        weight = words.weight(new.option("weight") or "1")
        built.append((words.command("set", "server", where, "weight", weight), False))
    if new.has("disabled") != old.has("disabled"):
        state = "maint" if new.has("disabled") else "ready"
        built.append((words.command("set", "server", where, "state", state), False))
    return built


class RuntimeApplier:
    """Carries out a plan through the Runtime API, checking every answer. Commands that do no harm
    after a refusal share a line (one round trip): a removal's three, an addition's `enable`s; an
    `add server` always goes alone."""

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api
        self.leftovers: dict[str, Server] = {}  # "backend/server" in maintenance, deletion pending
        self.sent = 0  # commands sent

    def run(self, plan: list[ServerChange]) -> None:
        steps = {ChangeAction.ADD: self._add, ChangeAction.SET: self._set, ChangeAction.REMOVE: self._remove}
        for change in plan:
            sent, started = self.sent, time.perf_counter()
            try:
                steps[change.action](change)
            except UnsafeCommand as err:  # planned plans never get here; anything else is refused too
                raise RuntimeApplyError(f"refusing to send a runtime command for {change.describe()}: {err}") from err
            took_ms = (time.perf_counter() - started) * 1000
            log.info("runtime: %s (%d commands, %.1f ms)", change.describe(), self.sent - sent, took_ms)

    def _send(self, command: Command) -> str:
        self.sent += 1
        return self.api.command(command)

    def _chain(self, commands: list[Command]) -> list[str]:
        """Several commands on one line (see `RuntimeAPI.chain`): each one's answer, stripped."""
        if not commands:
            return []
        self.sent += len(commands)
        try:
            return [answer.strip() for answer in self.api.chain(commands)]
        except ReloadError as err:
            raise RuntimeApplyError(str(err)) from err

    def _command(self, command: Command, expect: str = "") -> str:
        answer = self._send(command).strip()
        if answer != expect:
            raise RuntimeApplyError(f"runtime API refused `{command}`: {answer or '(no answer)'}")
        return answer

    def _add(self, change: ServerChange) -> None:
        """`add server` alone (nothing may follow a refused add: `enable server` would then act on
        whatever holds that name), then its `enable` commands on one line. HAProxy refuses `enable
        health` and `enable server` for the same reasons (no such server, no permission), so the
        second never runs where the first was refused for cause; either refusal means a reload. An
        entry still draining that a refused step leaves in maintenance stays a leftover (the reload's
        saved server state must not keep it in maintenance)."""
        where = words.target(change.backend, change.server.name)
        leftover = self.leftovers.pop(where, None)
        try:
            if leftover is not None and self._delete(where):
                leftover = None  # its old entry is gone: nothing of it is left in maintenance
            self._add_or_reuse(change, where, leftover)
        except BaseException:
            if leftover is not None:  # still in maintenance: the reload that follows must not keep it so
                self.leftovers[where] = leftover
            raise

    def _add_or_reuse(self, change: ServerChange, where: str, leftover: Server | None) -> None:
        """`add server`, or the entry still draining (`leftover`) set to the new one's weight."""
        if leftover is not None:
            if leftover.without("weight") != change.server.without("weight"):
                raise RuntimeApplyError(f"{where} came back with other keywords while its old entry drains")
            self._set(ServerChange(ChangeAction.SET, change.backend, change.server, old=leftover))
        else:
            self._command(add_server_line(change), "New server registered.")
        enable = []
        if change.server.has("check") or dict(change.defaults).get("check", "") is None:
            enable.append(words.command("enable", "health", where))
        if not change.server.has("disabled"):
            enable.append(words.command("enable", "server", where))
        for command, answer in zip(enable, self._chain(enable), strict=True):
            if answer:
                raise RuntimeApplyError(f"runtime API refused `{command}`: {answer}")

    def _set(self, change: ServerChange) -> None:
        for command, answered in _set_commands(change):
            if not answered:
                self._command(command)
                continue
            answer = self._send(command).strip()
            # "IP changed from …", or "no need to change the addr…" (the same address, spelled apart)
            if answer and "changed" not in answer and not answer.startswith("no need to change"):
                raise RuntimeApplyError(f"runtime API refused `{command}`: {answer}")

    def _remove(self, change: ServerChange) -> None:
        """`disable server` (no new request reaches it), `disable health`, `del server`: one line,
        one round trip (a refused `disable server` leaves the server out of maintenance, and HAProxy
        deletes only a server in maintenance: nothing after it can do harm)."""
        where = words.target(change.backend, change.server.name)
        disable = words.command("disable", "server", where)
        delete = words.command("del", "server", where)
        disabled, _, deleted = self._chain([disable, words.command("disable", "health", where), delete])
        if disabled:
            raise RuntimeApplyError(f"runtime API refused `{disable}`: {disabled}")
        if not self._deleted(delete, deleted):
            log.debug("runtime: %s still has connections; deleted once they close", where)
            self.leftovers[where] = change.server

    def _delete(self, where: str) -> bool:
        """True once deleted; False while connections hold it; RuntimeApplyError for anything else."""
        delete = words.command("del", "server", where)
        return self._deleted(delete, self._send(delete).strip())

    @staticmethod
    def _deleted(delete: Command, answer: str) -> bool:
        if answer in ("Server deleted.", "No such server."):
            return True
        if "connection" in answer:
            return False
        raise RuntimeApplyError(f"runtime API refused `{delete}`: {answer}")

    def cleanup(self) -> None:
        """Delete the servers whose connections have closed since they were removed."""
        for where in sorted(self.leftovers):
            if self._delete(where):
                del self.leftovers[where]
                log.debug("runtime: %s deleted", where)

    def forget_leftovers(self) -> None:
        """After a reload the new worker has none of them."""
        self.leftovers.clear()
