"""Producing meter readings to Kafka: synthetic or recorded households, as the field sends them.

Readings are keyed by household id (so a household stays on one partition), produced day by
day, shuffled within each day, a share of them batched as JSON arrays, optionally with
malformed records mixed in (each with the reason it is malformed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from meterwatch.model import ContextTables, SyntheticData
from meterwatch.model.inject import inject, random_labels
from meterwatch.model.loaders import Readings

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

#: Malformed records and the dead-letter reason each must produce.
MALFORMED = (
    (b"this is not json", "not_json"),
    (b'{"household_id": "X1", "ts": "2013-01-01T00:30:00Z"}', "missing_field"),
    (b'{"household_id": "X1", "ts": "2013-01-01T00:30:00Z", "kwh": -1.5}', "bad_kwh"),
    (b'{"household_id": "X1", "ts": "yesterday at noon", "kwh": 0.4}', "bad_timestamp"),
    (b'{"household_id": "X1", "ts": "2013-01-01T00:10:00Z", "kwh": 0.4}', "not_half_hour"),
    (b'{"household_id": 17, "ts": "2013-01-01T00:30:00Z", "kwh": 0.4}', "bad_household"),
    (b'[1, 2, 3]', "bad_shape"),
)


def ts_text(epoch_s: int) -> str:
    return (_EPOCH + dt.timedelta(seconds=int(epoch_s))).strftime("%Y-%m-%dT%H:%M:%SZ")


def reading_json(household_id: str, epoch_s: int, kwh: float) -> bytes:
    return (f'{{"household_id":"{household_id}","ts":"{ts_text(epoch_s)}",'
            f'"kwh":{kwh:.4f}}}').encode()


@dataclass
class ProduceStats:
    records: int = 0
    readings: int = 0
    malformed: int = 0
    seconds: float = 0.0
    #: whole days produced (fewer than asked when --duration ended it)
    days_produced: int = 0
    #: (household_id, day) -> wall time its last reading was acknowledged
    last_sent: dict[tuple[str, int], float] = field(default_factory=dict)


def recorded(readings: Readings, *, start: int | None = None, days: int | None = None,
             households: int | None = None, anomaly_rate: float = 0.0,
             seed: int = 0, tables: ContextTables | None = None) -> SyntheticData:
    """Recorded readings (``model.loaders``: any layout ``meterwatch train --data`` reads) on
    the grid ``produce_synthetic`` sends: the first ``households`` households (all by
    default, in the order of the data) over ``days`` days from ``start`` (days since
    1970-01-01; default: from the first day of the data to its last). A missing reading stays
    NaN and is never sent. With ``anomaly_rate`` a share of the household-days that have
    readings get one anomaly of ``model.inject`` each (any type that applies to the day), and
    ``labels`` says which, as for synthetic data; ``tables``' weather tells heating on a
    mild day where to go (without it every day counts as mild).

    >>> r = Readings(["A", "A", "B"], np.array([10, 12, 11], np.int32),
    ...              np.ones((3, 48), np.float32))
    >>> g = recorded(r)
    >>> g.household_ids, g.days.tolist(), int(np.isnan(g.kwh[:, :, 0]).sum())
    (['A', 'B'], [10, 11, 12], 3)
    """
    ids = np.asarray(readings.household_ids, dtype=str)
    order = list(dict.fromkeys(ids.tolist()))[:households]
    if not len(readings) or not order:
        raise ValueError("--data: no readings to produce")
    first = int(readings.day.min()) if start is None else start
    n_days = int(readings.day.max()) - first + 1 if days is None else days
    if n_days < 1:
        raise ValueError(f"--start: the data ends on {_date(int(readings.day.max()))}, before "
                         f"{_date(first)}; give an earlier --start")
    code = {h: i for i, h in enumerate(order)}
    keep = np.flatnonzero(np.isin(ids, order) & (readings.day >= first)
                          & (readings.day < first + n_days))
    if not len(keep):
        raise ValueError("--start/--days: the data has no readings in that window")
    kwh = np.full((len(order), n_days, 48), np.nan, np.float32)
    labels = np.zeros((len(order), n_days), np.int8)
    rows = np.array([code[h] for h in ids[keep]], dtype=np.int64)
    cols = readings.day[keep].astype(np.int64) - first
    day_kwh = readings.kwh[keep]
    if anomaly_rate > 0:
        rng = np.random.default_rng(seed)
        day_labels = random_labels(len(keep), anomaly_rate, rng, day=readings.day[keep])
        temp = None if tables is None else tables.max_temperature(readings.day[keep])
        hit = inject(day_kwh, day_labels, rng, day=readings.day[keep], temp_max=temp)
        # a type that changed nothing (heating on a day that was not mild) is no anomaly
        changed = (np.abs(np.nan_to_num(hit) - np.nan_to_num(day_kwh)) > 1e-6).any(axis=1)
        labels[rows, cols] = np.where(changed, day_labels, 0)
        day_kwh = hit
    kwh[rows, cols] = day_kwh
    return SyntheticData(household_ids=order,
                         days=np.arange(first, first + n_days, dtype=np.int32), kwh=kwh,
                         labels=labels, acorn_group=[""] * len(order),
                         tariff=[""] * len(order), tables=tables or ContextTables.empty())


def _date(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def day_records(data: SyntheticData, d: int, rng: np.random.Generator, *,
                array_fraction: float = 0.1) -> Iterator[tuple[bytes, bytes, list[int]]]:
    """(key, value, household rows) records for day index ``d``, shuffled."""
    day = int(data.days[d])
    h_n = len(data.household_ids)
    order = rng.permutation(h_n * 48)
    as_array = rng.random(h_n) < array_fraction
    arrays: dict[int, list[bytes]] = {}
    for k in order.tolist():
        h, s = divmod(k, 48)
        hid = data.household_ids[h]
        v = float(data.kwh[h, d, s])
        if np.isnan(v):
            continue  # a missing reading is simply never sent
        js = reading_json(hid, day * 86400 + s * 1800, v)
        if as_array[h]:
            arrays.setdefault(h, []).append(js)
            if len(arrays[h]) == 12:  # four arrays of 12 readings per day
                yield hid.encode(), b"[" + b",".join(arrays.pop(h)) + b"]", [h] * 12
        else:
            yield hid.encode(), js, [h]
    for h, items in arrays.items():
        yield data.household_ids[h].encode(), b"[" + b",".join(items) + b"]", [h] * len(items)


async def produce_synthetic(bootstrap_servers: str, topic: str, data: SyntheticData, *,
                            days: range | None = None, malformed_every: int = 0,
                            array_fraction: float = 0.1, seed: int = 0,
                            producer: AIOKafkaProducer | None = None,
                            rate: float | None = None, duration: float | None = None,
                            **client: object) -> ProduceStats:
    """Produce ``data`` (day by day) and wait for every acknowledgement.

    ``rate`` paces the readings (per second, on average over the run); ``duration`` stops
    after that many seconds, at the end of the record in flight (the day is then partial
    and not counted in ``days_produced``).
    """
    rng = np.random.default_rng(seed)
    own = producer is None
    if producer is None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all",
                                    linger_ms=5, max_batch_size=1 << 20, **client)
        try:
            await producer.start()
        except KafkaError as e:
            await producer.stop()  # no leaked client
            raise ConnectionError(
                f"--bootstrap-servers: cannot connect to {bootstrap_servers} "
                f"({type(e).__name__}); check the address and the security settings "
                "(--security-protocol, --sasl-mechanism, --sasl-username/--sasl-password, "
                "--ssl-cafile)") from None
    stats = ProduceStats()
    t0 = time.perf_counter()
    stop_at = t0 + duration if duration is not None else None
    try:
        for d in days if days is not None else range(len(data.days)):
            futures = []
            keys: list[bytes | None] = []
            stopped = False
            for i, (key, value, rows) in enumerate(day_records(data, d, rng,
                                                               array_fraction=array_fraction)):
                if rate is not None:
                    ahead = stats.readings / rate - (time.perf_counter() - t0)
                    if ahead > 0.002:
                        await asyncio.sleep(ahead)
                if stop_at is not None and time.perf_counter() >= stop_at:
                    stopped = True
                    break
                futures.append(await producer.send(topic, value, key=key))
                keys.append(key)
                stats.records += 1
                stats.readings += len(rows)
                if malformed_every and i % malformed_every == malformed_every - 1:
                    bad, _ = MALFORMED[stats.malformed % len(MALFORMED)]
                    futures.append(await producer.send(topic, bad, key=key))
                    keys.append(None)
                    stats.records += 1
                    stats.malformed += 1
            await asyncio.gather(*futures)
            if stopped:
                break
            stats.days_produced += 1
            now = time.time()
            day = int(data.days[d])
            for hid in data.household_ids:
                stats.last_sent[(hid, day)] = now
    finally:
        if own:
            await producer.stop()
    stats.seconds = time.perf_counter() - t0
    return stats
