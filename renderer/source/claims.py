"""Which watched service holds each instance: how an answer Consul left at its index is found stale.

Consul 1.8.7 leaves a service's index as it was when one of its instances is registered again
under another name with the same ID (helper-118, /tmp/rev65, on a real agent: `api` at 35, the
rename's write 36, `api` answered at 35 without the instance). Its blocking query is not woken and
a probe of its index finds it unchanged, so the old service kept serving the instance until its
own next write: a service with a query of its own until that query's wait ran out twice (2 × 10
minutes over HTTP/2), a swept one until the reconcile for services the summaries did not name.

An instance is one registration: its service ID is unique on its node within a datacenter. Seen in
the answers of two services, one of those answers is stale: the one whose copy was written
earlier (Consul's ModifyIndex of the registration, which a registrant cannot set). `Claims.update`
says which keys hold such a copy; the watcher reads them again whole (`Sweeper.read_whole`). An
instance of unknown ModifyIndex (0) is never taken as older or newer than another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from renderer.source.dependency import ServiceInstance

__all__ = ["Claims"]

Instance = tuple[str, str, str]  # (datacenter, node, service ID)


@dataclass
class Claims:
    """Per instance, the keys whose latest answer holds it, with its service's name and ModifyIndex there."""

    _held: dict[Instance, dict[str, tuple[str, int]]] = field(default_factory=dict)
    _by_key: dict[str, dict[Instance, int]] = field(default_factory=dict)

    def update(self, key: str, service: str, instances: Iterable[ServiceInstance]) -> set[str]:
        """`key`, an answer of `service`, now holds `instances`: the keys (this one included) whose
        answers hold one of them as another service's, written before the other copy. Only the
        instances new to the key, or written again, are compared: a check's status changing cost
        dropping and adding them all, 10.6 ms on the event loop for a service of 10,000 instances
        at each change (helper-119, /tmp/rev66); any conflict of the others was found when they, or
        the other copy, came."""
        mine = {(i.datacenter, i.node, i.id): i.changed_at for i in instances if i.node and i.id}
        before = self._by_key.get(key, {})
        if before == mine:
            return set()
        for instance in before.keys() - mine.keys():
            self._let_go(instance, key)
        stale: set[str] = set()
        for instance, changed_at in mine.items():
            if before.get(instance) == changed_at:
                continue
            holders = self._held.setdefault(instance, {})
            for other, (name, at) in holders.items():
                if name == service:
                    continue  # the same service through another key (a tag filter): no conflict
                if 0 < at < changed_at:
                    stale.add(other)
                elif 0 < changed_at < at:
                    stale.add(key)
            holders[key] = (service, changed_at)
        self._by_key[key] = mine
        return stale

    def drop(self, key: str) -> None:
        """`key` holds nothing any more (no longer watched)."""
        for instance in self._by_key.pop(key, {}):
            self._let_go(instance, key)

    def _let_go(self, instance: Instance, key: str) -> None:
        holders = self._held.get(instance)
        if holders is None:
            return
        holders.pop(key, None)
        if not holders:
            del self._held[instance]
