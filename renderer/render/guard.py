"""The anti-empty guard: a service that suddenly has too few instances keeps its last list for a while.

During a Consul restart or leader election, Consul can answer an empty instance list. Rendering it
would empty a backend that HAProxy's own health checks would have kept serving. So a service whose
passing instances drop below `min_instances` keeps its last good list for `empty_grace`, unless
`allow_empty` is set; a longer drop is real and is rendered. The state lives in the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from renderer.config import TemplateSpec
from renderer.source.dependency import ServiceInstance, shown_name

log = logging.getLogger(__name__)


@dataclass
class GuardState:
    """What the anti-empty guard remembers of one service query between renders."""

    last_good: list[ServiceInstance] | None = None
    below_since: float | None = None


@dataclass
class Guard:
    """Holds a service's last instance list when Consul suddenly reports too few (see TemplateSpec)."""

    spec: TemplateSpec
    states: dict[str, GuardState] = field(default_factory=dict)

    def keep_only(self, read: set[str]) -> None:
        """Forget the services whose dependency key (`read`: those a whole render read) is not
        read any more. Else every service ever seen kept its last list for the process's life: a
        registrant cycling through new names grew it without bound (300 services of large meta
        held 159 MB), and a name registered again later was served its old, gone instances for
        `empty_grace` (addresses that may be another host's by then)."""
        for key in [key for key in self.states if key.rsplit("|", 1)[0] not in read]:
            del self.states[key]

    def filter(
        self, key: str, name: str, instances: list[ServiceInstance], now: float
    ) -> tuple[list[ServiceInstance], float | None]:
        """The list to render and, while holding, the seconds until the hold ends."""
        state = self.states.setdefault(key, GuardState())
        threshold = self.spec.min_instances_for(name)
        if self.spec.allow_empty or threshold == 0 or len(instances) >= threshold:
            if state.below_since is not None:
                log.info("guard: service %s back to %d instance(s)", shown_name(name), len(instances))
            state.last_good, state.below_since = list(instances), None
            return instances, None
        if not state.last_good or len(state.last_good) <= len(instances):
            return instances, None  # never had more: nothing to hold
        if state.below_since is None:
            state.below_since = now
            log.warning(
                "guard: Consul reports %d instance(s) of %s (had %d, min_instances %d); keeping the last "
                "%d for up to %.0fs (allow_empty or min_instances change this)",
                len(instances), shown_name(name), len(state.last_good), threshold, len(state.last_good),
                self.spec.empty_grace,
            )  # fmt: skip
        remaining = state.below_since + self.spec.empty_grace - now
        if remaining > 0:
            return list(state.last_good), remaining
        log.warning(
            "guard: %s had fewer than %d instance(s) for %.0fs: accepting it",
            shown_name(name), threshold, self.spec.empty_grace,
        )  # fmt: skip
        state.last_good, state.below_since = list(instances), None
        return instances, None
