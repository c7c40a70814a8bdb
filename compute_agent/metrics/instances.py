"""The host's instances as last read, for the per-instance series and the counts.

A scrape must not query the database, so this keeps what the statistics
cycle last loaded (one query it makes anyway), corrected at once by the
operations this agent runs (a build, a stop, a delete) and by the rows its
power syncs write (periodic, forced, or after a lifecycle event). The table is never
changed in place: each change builds a new dict and swaps it in, so the
scrape's native thread always reads a whole one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from compute_agent import green

# Records turned into facts between two yields of a full replace.
YIELD_EVERY = 500


@dataclass(frozen=True)
class InstanceFacts:
    uuid: str
    name: str
    vm_state: str
    power_state: str
    vcpus: int

    @classmethod
    def of(cls, inst: Any, values: dict[str, Any] | None = None) -> InstanceFacts:
        """From an ORM row or an InstanceRecord (read on the hub, never later).

        ``values``: columns written since the row was read, which win.
        """
        values = values or {}
        return cls(
            uuid=inst.uuid,
            name=inst.display_name or "",
            vm_state=str(values.get("vm_state", inst.vm_state)),
            power_state=str(values.get("power_state", inst.power_state)),
            vcpus=int(inst.vcpus or 0),
        )


class InstanceIndex:
    def __init__(self) -> None:
        self._facts: dict[str, InstanceFacts] = {}
        # uuid -> when an operation last changed it: a list loaded before
        # that must not undo the change (a deleted instance coming back).
        self._touched: dict[str, float] = {}

    def replace(self, instances: Iterable[Any], loaded_at: float) -> None:
        """Take a full list read at ``loaded_at`` (monotonic, taken before the query)."""
        facts: dict[str, InstanceFacts] = {}
        for n, inst in enumerate(instances, 1):
            facts[inst.uuid] = InstanceFacts.of(inst)
            if n % YIELD_EVERY == 0:
                green.yield_now()  # 10,000 instances took 15-25 ms in one stretch
        current = self._facts
        for uuid, when in list(self._touched.items()):
            if when < loaded_at:
                del self._touched[uuid]
            elif uuid in current:
                facts[uuid] = current[uuid]
            else:
                facts.pop(uuid, None)
        self._facts = facts

    def update(self, inst: Any, values: dict[str, Any] | None = None) -> None:
        """An instance as an operation or a sync left it (``values``: what it wrote)."""
        facts = dict(self._facts)
        facts[inst.uuid] = InstanceFacts.of(inst, values)
        self._touched[inst.uuid] = green.monotonic()
        self._facts = facts

    def update_many(self, changes: list[tuple[Any, dict[str, Any]]]) -> None:
        """Several rows at once (a batch of sync writes): one copy of the table."""
        facts = dict(self._facts)
        now = green.monotonic()
        for inst, values in changes:
            facts[inst.uuid] = InstanceFacts.of(inst, values)
            self._touched[inst.uuid] = now
        self._facts = facts

    def remove(self, uuid: str) -> None:
        facts = dict(self._facts)
        facts.pop(uuid, None)
        self._touched[uuid] = green.monotonic()
        self._facts = facts

    def snapshot(self) -> dict[str, InstanceFacts]:
        """The current table; treat it as read-only."""
        return self._facts
