"""Runtime API commands built only from checked words.

HAProxy's CLI splits a line on `;` into several commands, reads quotes and backslashes, and takes
`@<pid>` prefixes on the master socket: one unchecked word could pause a frontend with admin level.
So a command is a `Command`, which only `command()` makes, and only from words that each matched
the grammar of their position:

    add server <backend>/<server> <endpoint> [<keyword> [<argument>]]...
    set server <backend>/<server> addr <address> port <port>
    set server <backend>/<server> weight <weight>
    set server <backend>/<server> state ready|maint
    enable|disable server|health <backend>/<server>
    del server <backend>/<server>
    show servers state

A word that does not match raises `UnsafeCommand` before anything is sent; callers plan again
with a reload (a validated file) instead.
"""

from __future__ import annotations

import re

from renderer.haproxy.checked import IDENTIFIER, address_problem, weight_problem
from renderer.haproxy.keywords import SERVER_KEYWORDS, VARIABLE

_ARGUMENT = re.compile(r"[A-Za-z0-9._:/@+,=%-]{1,256}")  # a server keyword's argument, e.g. 100ms, layer4
_DIGITS = re.compile(r"[0-9]{1,5}")
_WORD = re.compile(r"[A-Za-z0-9._:/@+,=%\[\]-]{1,512}")  # the union of the above: the last check of a line
VERBS = frozenset({"add", "set", "enable", "disable", "del", "show", "new", "commit"})
# The longest command line sent (a payload's lines aside): far below any CLI buffer (`tune.bufsize`,
# 16 KiB by default). A payload line ending at the buffer's size less one makes HAProxy 2.8.25 abort
# (see deliver/certs.py, CLI_RESERVE); plain lines of every length around it were answered
# (helper-140), so this is a margin, not a known fault. An `add server` line is ~200 characters.
MAX_LINE = 4096
# A payload (`<<` then lines, ended by an empty line): PEM blocks only, base64 lines between
# BEGIN/END lines; no empty line inside, nothing else.
_PEM_PAYLOAD = re.compile(
    r"(?:-----BEGIN [A-Z0-9 ]{1,40}-----\n(?:[A-Za-z0-9+/=]{1,76}\n)+-----END [A-Z0-9 ]{1,40}-----\n)+"
)


class UnsafeCommand(ValueError):
    """A word outside its position's grammar: the command is never sent."""


class Command(str):
    """A Runtime API command line whose every word was checked (made by `command()` only)."""


def command(*words: str) -> Command:
    """Join checked words into a command; UnsafeCommand if any word could be read as more than one."""
    if not words or words[0] not in VERBS:
        raise UnsafeCommand(f"runtime command must start with one of {sorted(VERBS)}: {words[:1]!r}")
    for word in words:
        if not _WORD.fullmatch(word):
            raise UnsafeCommand(f"runtime command word {word[:80]!r} is outside [A-Za-z0-9._:/@+,=%[]-]")
    line = " ".join(words)
    if len(line) > MAX_LINE:
        raise UnsafeCommand(f"runtime command of {len(line)} characters, more than {MAX_LINE}: {line[:80]!r}…")
    return Command(line)


def payload_command(payload: str, *words: str) -> Command:
    """`command(*words)` followed by a PEM payload (`… <<`, the payload, an empty line)."""
    if not _PEM_PAYLOAD.fullmatch(payload):
        raise UnsafeCommand("runtime command payload is not PEM blocks only")
    return Command(f"{command(*words)} <<\n{payload}")


def name(value: str, what: str = "name") -> str:
    """A proxy or server name: HAProxy's identifier characters [A-Za-z0-9._:-]."""
    if not IDENTIFIER.fullmatch(value):
        raise UnsafeCommand(f"{what} {value[:80]!r} is not an HAProxy identifier")
    return value


def target(backend: str, server: str) -> str:
    """`backend/server`, both checked."""
    return f"{name(backend, 'backend')}/{name(server, 'server')}"


def address(value: str) -> str:
    """A bare address for `set server … addr`: IPv4, IPv6 without zone, or a host name."""
    problem = address_problem(value)
    if problem is not None:
        raise UnsafeCommand(problem)
    return value


def port(value: int | None) -> str:
    if value is None or not _DIGITS.fullmatch(str(value)) or not 0 < int(value) < 65536:
        raise UnsafeCommand(f"port {value!r} is not 1-65535")
    return str(value)


def endpoint(host: str, port_number: int | None) -> str:
    """`v4:port`, `[v6]:port` or `host:port` for `add server`; a port is required (the file's
    servers always carry one, and a server without one would take the client's port)."""
    checked = address(host)
    return f"[{checked}]:{port(port_number)}" if ":" in checked else f"{checked}:{port(port_number)}"


def weight(value: str) -> str:
    problem = weight_problem(value)
    if problem is not None:
        raise UnsafeCommand(problem)
    return value


def keyword(value: str) -> str:
    """A server keyword HAProxy 2.8 lists with a fixed number of arguments."""
    if SERVER_KEYWORDS.get(value, VARIABLE) == VARIABLE:
        raise UnsafeCommand(f"server keyword {value[:80]!r} is not one this grammar reads exactly")
    return value


def argument(value: str) -> str:
    if not _ARGUMENT.fullmatch(value):
        raise UnsafeCommand(f"server keyword argument {value[:80]!r} is outside [A-Za-z0-9._:/@+,=%-]")
    return value


def state(value: str) -> str:
    if value not in ("ready", "maint"):
        raise UnsafeCommand(f"server state {value!r} is not ready or maint")
    return value
