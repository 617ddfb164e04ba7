"""The change, once: one rendered file against what HAProxy runs.

`ConfigChange.of(content, running, live, hitless)` is computed once per rendered file, from the
live file read once (or, while a file is still written behind its runtime changes, from the
content HAProxy was last sent). Every later step of delivery takes it and none recomputes it:
the span of whole sections that differ (`changed_span`), the kind (same, membership only,
structural), the runtime plan of a membership change, whether any `bind` line is touched (the
bind pre-check), the summary of the log line and, for the timeline, the span again.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from renderer.deliver.runtime import ServerChange, plan_runtime
from renderer.haproxy.config_text import changed_span
from renderer.status.diff import hide_secrets

MAX_LINES_SHOWN = 3  # of the added and of the removed lines, in the log summary


class ChangeKind(StrEnum):
    """How a rendered file differs from what HAProxy runs."""

    SAME = "same"  # HAProxy already runs it
    MEMBERSHIP = "membership"  # only server lines: the Runtime API takes it
    STRUCTURAL = "structural"  # anything else, or what HAProxy runs is unknown: validate, swap, reload


@dataclass(frozen=True)
class ConfigChange:
    """A rendered file (`content`) against `running`, what HAProxy runs (None: no file yet, or
    unknown after a failed apply); `live` the live file's bytes as read for it; `behind`: running
    is content sent through the Runtime API whose file is still being written."""

    content: str
    running: str | None
    live: bytes | None
    plan: list[ServerChange] | None = None
    behind: bool = False
    serving: str | None = None  # what HAProxy runs while `running` is unknown: a reload it refused

    @classmethod
    def of(
        cls,
        content: str,
        running: str | None,
        live: bytes | None,
        hitless: bool,
        behind: bool = False,
        serving: str | None = None,
    ) -> ConfigChange:
        """The change; `hitless`: whether a membership change may go through the Runtime API here;
        `serving`: what HAProxy runs after it refused a reload of the live file (see `base`)."""
        change = cls(content, running, live, None, behind, serving)
        if hitless and running is not None and running != content:
            return cls(content, running, live, plan_runtime(running, content, change.span), behind)
        return change

    @property
    def kind(self) -> ChangeKind:
        if self.running is not None and self.running == self.content:
            return ChangeKind.SAME
        return ChangeKind.MEMBERSHIP if self.plan is not None else ChangeKind.STRUCTURAL

    @property
    def reads_no_file(self) -> bool:
        """HAProxy takes this change without reading a file: it runs the content already, or only
        servers changed and no added one names a file (a CA, a CRL, a certificate). Such a change
        may go ahead of the other templates' files, which HAProxy reads only when it reloads."""
        if self.kind is ChangeKind.SAME:
            return True
        return self.plan is not None and not any(change.reads_files for change in self.plan)

    @property
    def base(self) -> str | None:
        """What the file is compared with: what HAProxy runs, else the live file's text. After a
        reload HAProxy refused (it could not bind a listener), what it runs is known although the
        apply is pending: the live file is the refused one, and compared with it a TCP service moved
        to the port taken found its old port "in use" (HAProxy's own), its refused version stood in
        for it and the next reload failed again, each a ~2 s pause (helper-150's F1)."""
        if self.running is not None:
            return self.running
        if self.serving is not None:
            return self.serving
        return self.live.decode(errors="replace") if self.live is not None else None

    @cached_property
    def span(self) -> tuple[int, int, int] | None:
        """(start, base_end, content_end): the whole sections around everything that differs."""
        base = self.base
        return changed_span(base, self.content) if base is not None else None

    @cached_property
    def binds_touched(self) -> bool:
        """Whether a `bind` line may differ (the bind pre-check runs only then)."""
        base, span = self.base, self.span
        if base is None or span is None:
            return True
        start, base_end, content_end = span
        return "bind" in base[start:base_end] or "bind" in self.content[start:content_end]

    @cached_property
    def summary(self) -> str:
        """`+N -M lines: + added…; - removed…` (or `new file, N lines`), for the log line. The lines
        of the span are compared as a multiset, not diffed: a change to one backend of a
        20,000-line file costs well under a millisecond."""
        base, span = self.base, self.span
        if base is None or span is None:
            return f"new file, {len(self.content.splitlines())} lines"
        start, base_end, content_end = span
        old = collections.Counter(base[start:base_end].splitlines())
        new = collections.Counter(self.content[start:content_end].splitlines())
        added = [hide_secrets(line.strip()) for line in (new - old).elements()]
        removed = [hide_secrets(line.strip()) for line in (old - new).elements()]
        shown = [f"+ {a}" for a in added[:MAX_LINES_SHOWN]] + [f"- {r}" for r in removed[:MAX_LINES_SHOWN]]
        return f"+{len(added)} -{len(removed)} lines: {'; '.join(shown)}"
