"""The input consumer: aiokafka's group consumer, minus its per-record objects.

``AIOKafkaConsumer.getmany`` wraps every record in a ``ConsumerRecord`` dataclass built in
Python (11 fields, a headers tuple, two ``len`` calls). With the service's garbage-collector
settings (``stream.service._GcTuning``) that wrapper is most of what aiokafka spends per
record: 0.92-0.99 µs against 0.35-0.38 µs for the C-decoded record alone
(``benchmarks/decode.py``; with CPython's default collector both cost ~2 µs, lost to
collections).

``raw_records(consumer)`` makes the consumer hand out the decoded records themselves
(``aiokafka.record``'s ``DefaultRecord``/``LegacyRecord``; they have the same ``offset``,
``timestamp``, ``key``, ``value`` and ``headers`` attributes). Everything else stays
aiokafka's: fetch positions, control batches, aborted transactions under
``read_committed``, CRC checks, pause/seek/rebalance handling. It does so by giving each
fetched partition's record iterator an identity record factory when the fetcher stores
it. That touches three private names, so it is feature-checked: with an aiokafka that
lacks them, or with key/value deserializers set, nothing is changed and ``getmany`` yields
``ConsumerRecord`` objects as usual (``tests/test_consumer.py`` checks both ways give the
same records, and that the installed aiokafka takes the fast path).

``StarvedFetches`` raises a consumer's fetch wait when fetches come back empty although
records wait (``set_fetch_wait``: the fetcher's ``_fetch_max_wait_ms``, also feature-checked);
used by the input's source and by recovery's reader.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiokafka
from aiokafka import AIOKafkaConsumer, TopicPartition

log = logging.getLogger(__name__)


def _same_record(tp: object, record: Any) -> Any:
    return record


class _RawResults(collections.OrderedDict):
    """The fetcher's ``tp -> FetchResult`` map; patches each result as it is stored."""

    def __setitem__(self, tp: object, result: Any) -> None:
        records = getattr(result, "_partition_records", None)
        if records is not None and hasattr(records, "_consumer_record"):
            records._consumer_record = _same_record
        super().__setitem__(tp, result)


_warned = False


def _fallback(why: str) -> bool:
    """The slow path, logged once per process."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("aiokafka %s: %s; records are handed out as ConsumerRecord objects "
                    "(correct, slower; meterwatch was tested on aiokafka 0.14.x)",
                    aiokafka.__version__, why)
    return False


def raw_records(consumer: AIOKafkaConsumer) -> bool:
    """Switch a started consumer to raw records; True if it took effect.

    Call after ``consumer.start()`` and before the first fetch.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    results = getattr(fetcher, "_records", None)
    if type(results) is not collections.OrderedDict:
        return _fallback("the fetcher's record map differs")
    if getattr(fetcher, "_key_deserializer", None) or getattr(
            fetcher, "_value_deserializer", None):
        return False
    from aiokafka.consumer import fetcher as fetcher_module
    if not hasattr(getattr(fetcher_module, "PartitionRecords", None), "_consumer_record"):
        return _fallback("PartitionRecords has no _consumer_record")
    raw = _RawResults()
    for tp, result in results.items():
        raw[tp] = result
    fetcher._records = raw  # type: ignore[union-attr]
    return True


def set_fetch_wait(consumer: AIOKafkaConsumer, wait_ms: int) -> bool:
    """Make the consumer's next fetch requests wait up to ``wait_ms`` (its
    ``fetch_max_wait_ms``, which aiokafka reads each time it builds a request); True if it
    took effect. Feature-checked like ``raw_records``: an aiokafka without the attribute keeps
    its wait, and False is returned."""
    fetcher = getattr(consumer, "_fetcher", None)
    if type(getattr(fetcher, "_fetch_max_wait_ms", None)) is not int:
        return False
    fetcher._fetch_max_wait_ms = int(wait_ms)  # type: ignore[union-attr]
    return True


#: The longest wait the starved-fetch rule gives a fetch (far below the consumer's request
#: timeout, 40 s, which a waiting fetch must stay under), and the first wait it raises to.
MAX_FETCH_WAIT_MS = 5_000
RAISED_FETCH_WAIT_MS = 100
#: How long fetches must have come back empty, with records waiting, before the wait is
#: raised (at least twice the current wait, so that a raised wait gets two tries).
STARVED_S = 1.0


class StarvedFetches:
    """The starved-fetch rule for one consumer; ``after`` every ``getmany``.

    When fetches have brought nothing for a while although records wait past the position
    of a partition being fetched, the broker did not gather them within the fetch's wait.
    The embedded Tansu answers so once a partition holds many batches (its memory storage
    scans them on every fetch: 7 ms at 3,300 batches, 24 ms at 33,000 here), and always to
    a wait of 0. In a half-hour soak at default settings (25 ms) the service stood still
    after 6 minutes, ready, its lag growing, its log silent. The wait is then doubled (from
    ``RAISED_FETCH_WAIT_MS`` to ``MAX_FETCH_WAIT_MS``) and stays so: going back would
    starve again at the next records (Tansu's scan only grows), and a longer wait costs only
    latency on a partition with nothing new, on a broker that does not wake a waiting fetch.
    On Kafka the same signs come from a producer's open transaction, which holds
    ``read_committed`` consumers at the last stable offset until it ends: a longer wait
    costs nothing there (a waiting fetch returns when records come), and the warning says
    what is happening. The first raise and the raise to the cap are warnings, the others
    information. ``what`` names the reader in them."""

    def __init__(self, consumer: AIOKafkaConsumer, setting_ms: int, what: str) -> None:
        self.consumer = consumer
        self.setting_ms = setting_ms
        self.what = what
        #: the wait in force: the setting, or raised
        self.fetch_wait_ms = setting_ms
        self._since: float | None = None  # fetches empty since

    async def after(self, data: Mapping[TopicPartition, list[Any]]) -> None:
        """``data``: what ``getmany`` returned. The partitions judged are the assigned ones
        not paused (a partition read to its end has no records waiting)."""
        if any(data.values()):
            self._since = None
            return
        if self.fetch_wait_ms >= MAX_FETCH_WAIT_MS:
            return
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since < max(STARVED_S, 2 * self.fetch_wait_ms / 1000):
            return
        consumer = self.consumer
        waiting = await self._waiting(sorted(set(consumer.assignment()) - consumer.paused()))
        if not waiting:
            self._since = None
            return
        old = self.fetch_wait_ms
        new = min(max(2 * old, RAISED_FETCH_WAIT_MS), MAX_FETCH_WAIT_MS)
        records = f"{sum(waiting.values()):,}"
        parts = ", ".join(str(p) for p in list(waiting)[:8]) + (", ..." * (len(waiting) > 8))
        self._since = now
        if not set_fetch_wait(self.consumer, new):
            self.fetch_wait_ms = MAX_FETCH_WAIT_MS  # do not try again
            log.warning("%s: fetches bring no records although %s wait on partitions %s, and "
                        "this aiokafka's fetch wait cannot be raised", self.what, records,
                        parts)
            return
        self.fetch_wait_ms = new
        first = old == self.setting_ms
        (log.warning if first or new == MAX_FETCH_WAIT_MS else log.info)(
            "%s: fetches bring no records although %s wait on partitions %s: the broker "
            "did not gather them within %d ms; fetches now wait up to %d ms (the embedded "
            "Tansu's in-memory log slows its fetches as it grows; on Kafka, a producer's "
            "open transaction holds read_committed consumers back until it ends)",
            self.what, records, parts, old, new)

    async def _waiting(self, fetched: list[TopicPartition]) -> dict[int, int]:
        """Partition -> records past the position: to the highwater of the last fetch
        response, or to the end offset where no response carried one (Tansu's, to a wait of
        0)."""
        consumer = self.consumer
        ends = {tp: consumer.highwater(tp) for tp in fetched}
        unknown = [tp for tp, hw in ends.items() if hw is None]
        if unknown:
            with contextlib.suppress(Exception):
                ends.update(await asyncio.wait_for(consumer.end_offsets(unknown), 5.0))
        waiting: dict[int, int] = {}
        for tp, hw in ends.items():
            if hw is None:
                continue
            try:
                pos = await asyncio.wait_for(consumer.position(tp), 1.0)
            except Exception:  # revoked meanwhile, a reset pending, a timeout
                continue
            if hw > pos:
                waiting[tp.partition] = hw - pos
        return waiting
