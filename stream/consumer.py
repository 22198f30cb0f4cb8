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

``set_fetch_wait(consumer, ms)`` changes how long the consumer's fetch requests may wait, for
``stream.source``'s starved-fetch rule (the fetcher's ``_fetch_max_wait_ms``, also
feature-checked).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import aiokafka
from aiokafka import AIOKafkaConsumer

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
