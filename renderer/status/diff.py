"""The live file against the one it replaced, as a unified diff of bounded size, passwords hidden.

Only the lines between the common head and tail are handed to difflib, so a change in a
10,000-server file costs what the change costs; the answer stops at MAX_DIFF_LINES lines.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

MAX_DIFF_LINES = 2000
# More changed lines than this (both sides together) are not matched by difflib (5.7 s for 10,000
# servers every other one changed, 24 s at 20,000): shown as one hunk, removed lines then added.
MAX_MATCHED_LINES = 4000
MAX_LINE_CHARS = 400
CONTEXT_LINES = 3
# Credentials a config may carry, hidden to the end of the line (a quoted one may hold spaces):
# `stats auth U:P`, `user U password|insecure-password P`, and the value of a header named
# Authorization or ending in key, token or secret where a line sets it (`set-header`, `add-header`),
# sends it (`http-check send … hdr`, `\r\n` in `option httpchk`) or matches it (`hdr(NAME)`).
# Header names only: a service named `authorization` keeps its routing lines (helper-137,
# /tmp/rev83), and bounded repeats keep a long line linear (`[\w-]*` took 4.5 s on 32 KB).
_HEADER = r"(?:proxy-)?authorization|[\w-]{0,64}(?:key|token|secret)(?=[\s):\\])"
_SECRET = re.compile(
    r"(?i)(\bstats\s+auth\s+|\b(?:insecure-)?password\s+"
    rf"|(?:\b(?:set|add)-header\s+|\bhdr\s+|\\n)(?:{_HEADER})(?::|\\?\s)+"
    rf"|\bhdr\s*\(\s*(?:{_HEADER})\s*\)(?:\s+-m\s+(?!found\b)\w+)?\s+(?!-m\s+found\b))\S.*$"
)


def hide_secrets(line: str) -> str:
    return _SECRET.sub(r"\1(hidden)", line)


def file_diff(previous: str, current: str, name: str) -> str:
    """`previous` → `current`, unified, with CONTEXT_LINES of context; "" when they are equal."""
    old, new = previous.splitlines(), current.splitlines()
    head = 0
    while head < min(len(old), len(new)) and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < min(len(old), len(new)) - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    start = max(head - CONTEXT_LINES, 0)
    keep = max(tail - CONTEXT_LINES, 0)
    old_part, new_part = old[start : len(old) - keep], new[start : len(new) - keep]
    if len(old_part) + len(new_part) > MAX_MATCHED_LINES:
        lines = _unmatched(old_part, new_part, name)
    else:
        lines = difflib.unified_diff(
            old_part, new_part, f"{name} (previous)", f"{name} (live)", n=CONTEXT_LINES, lineterm=""
        )
    out: list[str] = []
    for line in lines:  # compared as they are, shown with passwords hidden: a new password is a change
        line = _shift(line, start) if line.startswith("@@") else hide_secrets(line)
        if len(out) == MAX_DIFF_LINES:
            out.append(f"… cut at {MAX_DIFF_LINES} lines")
            break
        out.append(line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " …")
    return "\n".join(out) + ("\n" if out else "")


def _unmatched(old_part: list[str], new_part: list[str], name: str) -> Iterator[str]:
    """One hunk of every line of `old_part` removed, then every line of `new_part` added (lazily:
    the caller stops at MAX_DIFF_LINES)."""
    yield f"--- {name} (previous)"
    yield f"+++ {name} (live)"
    yield f"@@ -1,{len(old_part)} +1,{len(new_part)} @@ ({len(old_part) + len(new_part)} changed lines, not matched)"
    yield from (f"-{line}" for line in old_part)
    yield from (f"+{line}" for line in new_part)


_HUNK = re.compile(r"^@@ -(\d+)(,\d+)? \+(\d+)(,\d+)? @@")


def _shift(hunk: str, offset: int) -> str:
    """A hunk header of the cut-down texts, renumbered to the whole files' lines."""
    match = _HUNK.match(hunk)
    if not match or offset == 0:
        return hunk
    old_start, old_len, new_start, new_len = match.groups()
    shifted = f"@@ -{int(old_start) + offset}{old_len or ''} +{int(new_start) + offset}{new_len or ''} @@"
    return shifted + hunk[match.end() :]
