"""Households that move to another input partition keep their state.

A household's state lives in the state partition of the input partition its readings
arrive on. When partitions are added to the input topic, the producers' partitioner sends
about half of the households (8 -> 16) to another partition; without this module they
started there again as new households (population statistics, cold-start scoring, the
sustained-change detector reset) while their state stayed behind.

Recovery (``stream.recovery``) opens an **adoption window** for a partition that has no
mark yet, or whose mark was written when the input had fewer partitions than now, or whose
window is still open. It reads the other state partitions once and keeps, per household,
its latest snapshot there (the raw record; among several partitions the highest ``seq``).
For the window's length (``WINDOW_S``, long enough for producers that send a day at a time)
a household that arrives on the partition with no state of its own here takes that
snapshot as its state (``Adoption.take``): it is marked dirty, so the next checkpoint makes
it durable in this partition's state. The mark carries the window's end and the partition
count, so a recovery inside the window opens it again (a household adopted after the last
mark is adopted again when its readings are replayed).

The snapshot's ``closed_max`` comes along: readings of a day the old partition already
closed are dropped as late here, so such a day is not scored twice. A day in progress at
the change still splits (its first readings went to the old partition, the rest come
here): both halves close incomplete, as before. The old partition keeps its stale copy;
it leaves memory after ``--household-idle-evict-days``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from meterwatch.stream.households import HouseholdTable

log = logging.getLogger(__name__)

#: How long after a partition is taken on (with more input partitions than its mark knew,
#: or none) households arriving there may take their state from another partition.
WINDOW_S = 2 * 86_400.0


@dataclass
class Adoption:
    """Snapshots of households held by other state partitions, for one input partition."""

    partition: int
    #: household -> (state partition, snapshot record value); shared by the partitions
    #: recovered together (each skips its own)
    elsewhere: Mapping[str, tuple[int, bytes]]
    until: float  # epoch seconds: the window's end
    adopted: int = 0
    _done: set[str] = field(default_factory=set)

    def open(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.until

    def take(self, households: HouseholdTable, ids: Iterable[str]) -> list[int]:
        """Give each of ``ids`` that has no state here (not in ``households``) and has one
        in another partition that state; their indices (to be made durable)."""
        new = [h for h in ids if h in self.elsewhere and h not in self._done
               and self.elsewhere[h][0] != self.partition]
        if not new:
            return []
        known = households.lookup(new, insert=False)
        out = []
        for h, idx in zip(new, known.tolist(), strict=True):
            self._done.add(h)
            if idx >= 0:  # it has a state here already: this partition's own wins
                continue
            out.append(households.restore(h, orjson.loads(self.elsewhere[h][1])))
        self.adopted += len(out)
        if out:
            log.info("input partition %d: %d households took their state from another "
                     "partition (%d so far)", self.partition, len(out), self.adopted)
        return out


def window_end(mark: Mapping[str, object] | None, input_partitions: int,
               now: float) -> float | None:
    """When a partition recovered with ``mark`` should stop adopting (None: no window): a
    partition without a mark, or whose mark knew fewer input partitions, opens one; an
    open window stays open until its end."""
    if mark is None:
        return now + WINDOW_S
    until = float(mark.get("adopt_until", 0.0))  # type: ignore[arg-type]
    if until > now:
        return until
    if int(mark.get("input_partitions", input_partitions)) < input_partitions:  # type: ignore[call-overload]
        return now + WINDOW_S
    return None


def latest_elsewhere(latest: Mapping[int, Mapping[str, bytes]]) -> dict[str, tuple[int, bytes]]:
    """Per household, its snapshot in the state partitions ``latest`` (partition ->
    household -> record value); held by several, the one with the highest ``seq``."""
    out: dict[str, tuple[int, bytes]] = {}
    for p, states in latest.items():
        for h, value in states.items():
            if h in out and _seq(out[h][1]) >= _seq(value):
                continue
            out[h] = (p, value)
    return out


def _seq(value: bytes) -> int:
    return int(orjson.loads(value).get("seq", 0))
