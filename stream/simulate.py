"""Producing meter readings to Kafka: synthetic or recorded households, as the field sends them.

Readings are keyed by household id (so a household stays on one partition), produced day by
day, shuffled within each day, a share of them batched as JSON arrays, optionally with
malformed records mixed in (each with the reason it is malformed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from meterwatch.model import ContextTables, SyntheticData
from meterwatch.model.inject import inject, random_labels
from meterwatch.model.loaders import Readings, day_to_date
from meterwatch.stream.outputs import fitting_batch
from meterwatch.stream.preflight import check_bootstrap, connection_refusal, record_limit
from meterwatch.stream.timegrid import TimeGrid
from meterwatch.stream.validation import MAX_KWH

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

#: Malformed records and the dead-letter reason each must produce.
MALFORMED = (
    (b"this is not json", "not_json"),
    (b'{"household_id": "X1", "ts": "2013-01-01T00:30:00Z"}', "missing_field"),
    (b'{"household_id": "X1", "ts": "2013-01-01T00:30:00Z", "kwh": -1.5}', "bad_kwh"),
    (b'{"household_id": "X1", "ts": "yesterday at noon", "kwh": 0.4}', "bad_timestamp"),
    (b'{"household_id": "X1", "ts": "2013-01-01T00:10:00Z", "kwh": 0.4}', "not_half_hour"),
    (b'{"household_id": [17], "ts": "2013-01-01T00:30:00Z", "kwh": 0.4}', "bad_household"),
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


@dataclass
class RecordedDays:
    """Recorded readings for ``produce_synthetic``, one day at a time: what ``recorded``
    returns. It holds the loader's (M, 48) rows as they are, an index of them by day and the
    injected household-days, never a households x days x 48 grid (2 GB for the 5,567
    households of the Low Carbon London set); ``day_kwh(d)`` builds one day's
    (households, 48) block when it is produced."""

    household_ids: list[str]
    days: np.ndarray  # int32 (D,) days since 1970-01-01
    labels: np.ndarray  # int8 (H, D): 0 normal, else index into ANOMALY_TYPES
    kwh_rows: np.ndarray  # float32 (M, 48): the loader's rows, NaN where missing
    row_household: np.ndarray  # int32 (K,): household of each kept row, in day order
    row_source: np.ndarray  # int64 (K,): its row in kwh_rows
    day_bounds: np.ndarray  # int64 (D + 1,): day d is entries day_bounds[d]:day_bounds[d+1]
    injected_at: np.ndarray  # int64 (I,): entries (in day order) with an injected anomaly
    injected_kwh: np.ndarray  # float32 (I, 48): their readings after the injection

    def day_kwh(self, d: int) -> np.ndarray:
        """float32 (H, 48) readings of day index ``d``; NaN where none was recorded."""
        lo, hi = int(self.day_bounds[d]), int(self.day_bounds[d + 1])
        out = np.full((len(self.household_ids), 48), np.nan, np.float32)
        out[self.row_household[lo:hi]] = self.kwh_rows[self.row_source[lo:hi]]
        a, b = np.searchsorted(self.injected_at, (lo, hi))
        if b > a:
            out[self.row_household[self.injected_at[a:b]]] = self.injected_kwh[a:b]
        return out


def recorded(readings: Readings, *, start: int | None = None, days: int | None = None,
             households: int | None = None, anomaly_rate: float = 0.0,
             seed: int = 0, tables: ContextTables | None = None) -> RecordedDays:
    """Recorded readings (``model.loaders``: any layout ``meterwatch train --data`` reads)
    for ``produce_synthetic`` to send day by day: the first ``households`` households (all
    by default, in the order of the data) over ``days`` days from ``start`` (days since
    1970-01-01; default: from the first day of the data to its last). A missing reading
    stays NaN and is never sent. With ``anomaly_rate`` a share of the household-days that
    have readings get one anomaly of ``model.inject`` each (any type that applies to the
    day), and ``labels`` says which, as for synthetic data; ``tables``' weather tells heating
    on a mild day where to go (without it every day counts as mild).

    Memory: the loader's rows are used in place (no copy); beside them about 20 bytes per
    household-day of index and the injected household-days only.

    >>> r = Readings(["A", "A", "B"], np.array([10, 12, 11], np.int32),
    ...              np.ones((3, 48), np.float32))
    >>> g = recorded(r)
    >>> g.household_ids, g.days.tolist(), [int(np.isnan(g.day_kwh(d)[:, 0]).sum())
    ...                                    for d in range(3)]
    (['A', 'B'], [10, 11, 12], [1, 1, 1])
    """
    order = list(dict.fromkeys(readings.household_ids))[:households]
    if not len(readings) or not order:
        raise ValueError("--data: no readings to produce")
    first = int(readings.day.min()) if start is None else start
    n_days = int(readings.day.max()) - first + 1 if days is None else days
    if n_days < 1:
        raise ValueError(f"--start: the data ends on {_date(int(readings.day.max()))}, before "
                         f"{_date(first)}; give an earlier --start")
    code = {h: i for i, h in enumerate(order)}
    household = np.fromiter((code.get(h, -1) for h in readings.household_ids),
                            dtype=np.int32, count=len(readings))
    keep = np.flatnonzero((household >= 0) & (readings.day >= first)
                          & (readings.day < first + n_days))
    if not len(keep):
        raise ValueError("--start/--days: the data has no readings in that window")
    rows = household[keep]
    del household
    keep_day = readings.day[keep]
    cols = keep_day.astype(np.int64) - first
    labels = np.zeros((len(order), n_days), np.int8)
    hit = np.zeros(0, np.int64)
    hit_kwh = np.zeros((0, 48), np.float32)
    if anomaly_rate > 0:
        # The draws of one injection over every kept household-day (the labels, then each
        # type's rows), applied to the labelled household-days only: the same anomalies in
        # the same places as over all of them, without copying the rest.
        rng = np.random.default_rng(seed)
        day_labels = random_labels(len(keep), anomaly_rate, rng, day=keep_day)
        hit = np.flatnonzero(day_labels)
        original = readings.kwh[keep[hit]]
        temp = None if tables is None else tables.max_temperature(keep_day[hit])
        hit_kwh = inject(original, day_labels[hit], rng, day=keep_day[hit], temp_max=temp)
        # a type that changed nothing (heating on a day that was not mild) is no anomaly
        changed = (np.abs(np.nan_to_num(hit_kwh) - np.nan_to_num(original)) > 1e-6).any(axis=1)
        labels[rows[hit], cols[hit]] = np.where(changed, day_labels[hit], 0)
    by_day = np.argsort(cols, kind="stable")
    position = np.empty(len(keep), np.int64)  # where each kept row lands in day order
    position[by_day] = np.arange(len(keep))
    injected_at = position[hit]
    inj_order = np.argsort(injected_at, kind="stable")
    return RecordedDays(
        household_ids=order, days=np.arange(first, first + n_days, dtype=np.int32),
        labels=labels, kwh_rows=readings.kwh, row_household=rows[by_day],
        row_source=keep[by_day].astype(np.int64),
        day_bounds=np.searchsorted(cols[by_day], np.arange(n_days + 1)).astype(np.int64),
        injected_at=injected_at[inj_order], injected_kwh=hit_kwh[inj_order])


def _date(day: int) -> str:
    return day_to_date(day).isoformat()


def day_records(data: SyntheticData | RecordedDays, d: int, rng: np.random.Generator, *,
                array_fraction: float = 0.1, grid: TimeGrid | None = None,
                ) -> Iterator[tuple[bytes, bytes, list[int]]]:
    """(key, value, household rows) records for day index ``d``, shuffled. ``grid``: the
    local days the service cuts (``--timezone``); by default UTC days. On a day the clocks
    go forward the skipped hour's slots are not sent (the service imputes them); on a day
    they go back the repeated hour's slots are sent twice, one reading for each pass."""
    day = int(data.days[d])
    h_n = len(data.household_ids)
    # a synthetic injected anomaly (a level x5 on a heavy user) can pass the service's
    # bound, which it would dead-letter: synthetic readings stay within it (recorded ones
    # are sent as they are, as the field sends them)
    block = data.day_kwh(d) if isinstance(data, RecordedDays) else \
        np.minimum(data.kwh[:, d], MAX_KWH)
    kwh: list[list[float]] = block.tolist()
    times = slot_times(day, grid)
    order = rng.permutation(h_n * 48)
    as_array = rng.random(h_n) < array_fraction
    order = order[~np.isnan(block).ravel()[order]]  # a missing reading is never sent
    arrays: dict[int, list[bytes]] = {}
    for k in order.tolist():
        h, s = divmod(k, 48)
        hid = data.household_ids[h]
        v = kwh[h][s]
        for t in times[s]:
            js = reading_json(hid, t, v)
            if as_array[h]:
                arrays.setdefault(h, []).append(js)
                if len(arrays[h]) == 12:  # four arrays of 12 readings per day
                    yield hid.encode(), b"[" + b",".join(arrays.pop(h)) + b"]", [h] * 12
            else:
                yield hid.encode(), js, [h]
    for h, items in arrays.items():
        yield data.household_ids[h].encode(), b"[" + b",".join(items) + b"]", [h] * len(items)


def slot_times(day: int, grid: TimeGrid | None = None) -> list[list[int]]:
    """UTC epoch seconds of each model slot of a local day: one each, except where the
    clocks change (none for the hour skipped, two for the hour repeated)."""
    if grid is None or grid.is_utc:
        return [[day * 86400 + s * 1800] for s in range(48)]
    start, end = grid.bounds(day)
    ts = np.arange(start, end, 1800, dtype=np.int64)
    _, slot, _ = grid.locate(ts)
    out: list[list[int]] = [[] for _ in range(48)]
    for t, s in zip(ts.tolist(), slot.tolist(), strict=True):
        out[s].append(t)
    return out


async def _refusal(bootstrap_servers: str, client: dict[str, Any]) -> str | None:
    """Why the brokers refused us, as the one line naming the flag to fix, when a server
    answered and refused our credentials, our TLS or our security protocol (a wrong password
    used to be reported as "--bootstrap-servers: cannot connect"), or advertised brokers this
    host cannot reach; None when none answered. Never the secret."""
    refused = await connection_refusal(check_bootstrap(bootstrap_servers), client,
                                       timeout_s=5.0)
    return None if refused is None else str(refused)


async def _batch_bytes(bootstrap_servers: str, topic: str, client: dict[str, Any]) -> int:
    """The largest record batch to build for ``topic``: 1 MiB, or less where the topic's
    ``max.message.bytes`` is smaller (a platform's input topic at 512 KB refused every full
    batch with ``MessageSizeTooLargeError``). The full size where the broker does not say
    (Tansu, a topic not made yet)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client)
    try:
        await admin.start()
        limit = await record_limit(admin, topic)
    except KafkaError as exc:
        log.debug("max.message.bytes of %s not known: %r", topic, exc)
        limit = None
    finally:
        await admin.close()
    return fitting_batch(limit)


def check_pacing(*, rate: float | None, duration: float | None, malformed_every: int) -> None:
    """``ValueError`` naming the flag of a pace that cannot be kept: a rate or duration that
    is not a positive finite number (NaN used to switch pacing off, and a NaN duration never
    ended), a negative ``--malformed-every`` (which silently sent none)."""
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError("--rate: must be a positive number of readings per second; leave it "
                         "out to produce as fast as the broker takes them")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise ValueError("--duration: must be a positive, finite number of seconds; leave it "
                         "out to stop when the days are produced")
    if malformed_every < 0:
        raise ValueError("--malformed-every: must be 0 (none) or a number of records")


async def produce_synthetic(bootstrap_servers: str, topic: str,
                            data: SyntheticData | RecordedDays, *,
                            days: range | None = None, malformed_every: int = 0,
                            array_fraction: float = 0.1, seed: int = 0,
                            producer: AIOKafkaProducer | None = None,
                            rate: float | None = None, duration: float | None = None,
                            timezone: str = "UTC", **client: object) -> ProduceStats:
    """Produce ``data`` (day by day) and wait for every acknowledgement.

    ``rate`` paces the readings (per second, on average over the run); ``duration`` stops
    after that many seconds, at the end of the record in flight (the day is then partial
    and not counted in ``days_produced``). ``timezone``: each day of ``data`` is that local
    day, as the service with the same ``--timezone`` cuts it.
    """
    check_pacing(rate=rate, duration=duration, malformed_every=malformed_every)
    rng = np.random.default_rng(seed)
    grid = TimeGrid(timezone)
    own = producer is None
    if producer is None:
        # first, what a producer would only retry for ever or time out on: credentials,
        # protocol, brokers that advertise addresses this host cannot reach
        refused = await _refusal(bootstrap_servers, client)
        if refused is not None:
            raise ConnectionError(refused)
        batch = await _batch_bytes(bootstrap_servers, topic, client)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all",
                                    linger_ms=5, max_batch_size=batch, **client)
        try:
            await producer.start()
        except KafkaError as e:
            await producer.stop()  # no leaked client
            refused = await _refusal(bootstrap_servers, client)
            raise ConnectionError(refused or (
                f"--bootstrap-servers: cannot connect to {bootstrap_servers} "
                f"({type(e).__name__}); check the address and the security settings "
                "(--security-protocol, --sasl-mechanism, --sasl-username/--sasl-password, "
                "--ssl-cafile)")) from None
    stats = ProduceStats()
    t0 = time.perf_counter()
    stop_at = t0 + duration if duration is not None else None
    try:
        for d in days if days is not None else range(len(data.days)):
            futures = []
            keys: list[bytes | None] = []
            stopped = False
            for i, (key, value, rows) in enumerate(day_records(data, d, rng, grid=grid,
                                                               array_fraction=array_fraction)):
                if rate is not None:
                    now = time.perf_counter()
                    ahead = stats.readings / rate - (now - t0)
                    if stop_at is not None and now + ahead >= stop_at:
                        # the next reading is due at or after the end: wait for the end,
                        # never past it, and send nothing more (never faster than --rate)
                        await asyncio.sleep(max(stop_at - now, 0.0))
                        stopped = True
                        break
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
    finally:
        if own:
            await producer.stop()
    stats.seconds = time.perf_counter() - t0
    return stats
