"""The garbage collector while services run in this process (``GC``, refcounted)."""

from __future__ import annotations

import gc


class GcTuning:
    """The garbage collector while services run in this process (refcounted, restored when
    the last one stops).

    The input path allocates a short-lived decoded record per Kafka record. With CPython's
    default gen-0 threshold (700) the records of a fetch outlive several collections, get
    promoted, and trigger full collections that walk the whole heap (torch, numpy, the
    model): measured, that made aiokafka's record hand-out 2-7x slower (``benchmarks/decode.py``;
    benchmarks/RESULTS.md, "Hot-path rework"). meterwatch raises the gen-0 threshold, so
    records die by reference count before a collection sees them, and freezes what exists
    at start-up (modules, model) out of the collector's walks.
    """

    def __init__(self) -> None:
        self.users = 0
        self.saved: tuple[int, int, int] | None = None

    def acquire(self, gen0: int) -> None:
        if self.users == 0:
            self.saved = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(gen0, *self.saved[1:])
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.saved is not None:
            gc.set_threshold(*self.saved)
            gc.unfreeze()


GC = GcTuning()
