"""50,000 hostile records of ~35 kinds interleaved with a valid stream, through the real
(embedded) broker and the real service (issue 15).

The generator is our own and seeded. Every hostile record has an expected dead-letter
reason, and per-reading counts, fixed by the kind that made it. The test checks: the
service stays up; each hostile record (by its partition and offset) has exactly one
dead-letter record with the expected reason and its original value (cut with a flag when
large); ``meterwatch_invalid_readings_total`` counts the expected readings per reason; the
valid stream's day scores and alerts are those of a clean run, with no extra day score.
Both runs use ``--timezone Europe/London``, where a year-0001 timestamp used to kill the
consume loop.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import day_records, ts_text
from tests.conftest import HISTORY_DAYS, inject_gross, read_topic, unique_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_HOSTILE = 50_000
HOUSEHOLDS = 40
DAYS = 3
TIMEZONE = "Europe/London"


@dataclass
class Hostile:
    key: bytes | None
    value: bytes | None
    reason: str
    counts: dict[str, int] = field(default_factory=dict)  # rejected readings by reason

    def __post_init__(self) -> None:
        self.counts = self.counts or {self.reason: 1}


def _deep(rng: random.Random) -> bytes:
    d = rng.choice([2, 100, 990, 1000, 1023])
    return b"[" * d + b"]" * d


def _obj(hid: object = "SYN000001", ts: object = "2013-01-23T10:00:00Z",
         kwh: object = 0.25, drop: str = "") -> bytes:
    doc = {"household_id": hid, "ts": ts, "kwh": kwh}
    doc.pop(drop, None)
    return orjson.dumps(doc)


def _raw(hid: bytes, ts: bytes, kwh: bytes) -> bytes:
    return b'{"household_id":%s,"ts":%s,"kwh":%s}' % (hid, ts, kwh)


BAD_TS = ["2013-01-23T10:00:00+00:00garbage", "2013-01-23T10:00:00Z\x00",
          "2013-01-23T10:00:00\x00Z", "2013-01-23T10:30:00+00:30:00.5",
          "2013-01-23T10:00:00+00:00:00", "2013-W04-3T10:00:00Z", "20130123T100000Z",
          "2013-01-23t10:00:00z", "2013-01-23T10:00:00", "2013-01-23T10:00:00+01",
          "2013-01-23T24:00:00Z", "2013-02-30T10:00:00Z", "13/01/2013 10:00", "",
          "٢٠١٣-01-23T10:00:00Z", "2013-01-23T10:00:00Z" * 20, "yesterday",
          "0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z", "0000-01-01T00:00:00Z",
          "1899-12-31T23:30:00Z", "2200-01-01T00:00:00Z", "9999-12-31T23:30:00-14:00"]
BAD_IDS = ["", "x" * 65, "SYN\x00001", "SYN000001\n", "SYN\u202e100", "SYN\u200b1",
           "SYN\x7f", "SYN\x85", "\ud800"]


def hostile_record(rng: random.Random, i: int, hids: list[str],
                   slot_ts: Callable[[], str]) -> Hostile:
    """Hostile record number ``i``: a kind by ``i``, a variant by ``rng``."""
    hid = rng.choice(hids)
    other = rng.choice([h for h in hids if h != hid])
    any_key = rng.choice([hid.encode(), None, b"\xff\xfe", other.encode(), b""])
    ts = slot_ts()  # a real slot of the streamed days: accepted, it would change a day
    if i % 10_000 == 9_999:  # rare and large: more readings than allowed
        n = 10_001
        return Hostile(hid.encode(), orjson.dumps([orjson.loads(_obj(hid, ts))] * n),
                       "too_many_readings", {"too_many_readings": n})
    if i % 10_000 == 4_999:  # rare and large: 700 kB of garbage (its dead letter is cut)
        return Hostile(any_key, b"~" + rng.randbytes(700_000), "not_json")
    kind = i % 34
    if kind == 0:
        return Hostile(any_key, b"~" + rng.randbytes(rng.randrange(0, 80)), "not_json")
    if kind == 1:
        v = _obj(hid, ts)
        return Hostile(any_key, v[:rng.randrange(1, len(v) - 1)], "not_json")
    if kind == 2:
        lit = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"0x10", b"+1", b".5"])
        return Hostile(any_key, _raw(b'"%s"' % hid.encode(), b'"%s"' % ts.encode(), lit),
                       "not_json")
    if kind == 3:
        return Hostile(any_key, rng.choice([b"1", b'"x"', b"null", b"true", b"-0.5e3"]),
                       "bad_shape")
    if kind == 4:
        value = rng.choice([b"[]", b"{}", b"[1, 2]", b"[[]]", b"[null]"])
        return Hostile(any_key, value, "bad_shape", {"bad_shape": 2 if value == b"[1, 2]" else 1})
    if kind == 5:
        return Hostile(any_key, _obj(hid, ts, drop=rng.choice(["household_id", "ts", "kwh"])),
                       "missing_field")
    if kind == 6:
        return Hostile(any_key, _obj(rng.choice([[hid], {"id": hid}, -17, True, 1.5]), ts),
                       "bad_household")
    if kind == 7:
        return Hostile(any_key, _obj(None, ts), "missing_field")
    if kind == 8:
        bad = rng.choice(BAD_IDS)
        value = _raw(orjson.dumps(bad) if bad != "\ud800" else b'"\\ud800"',
                     b'"%s"' % ts.encode(), b"0.25")
        return Hostile(rng.choice([bad.encode("utf-8", "surrogatepass"), any_key]), value,
                       "bad_household")
    if kind == 9:
        return Hostile(any_key, _raw(_deep(rng), b'"%s"' % ts.encode(), b"0.25"),
                       "bad_household")
    if kind == 10:
        return Hostile(any_key, _obj(hid, ts, rng.choice(["0.3", True, False, [0.3], {}])),
                       "bad_kwh")
    if kind == 11:
        lit = rng.choice([b"-0.1", b"-1e-9", b"50.0001", b"1e6", b"1e309", b"-1e309",
                          b"9" * 400, b"18446744073709551616"])
        return Hostile(any_key, _raw(b'"%s"' % hid.encode(), b'"%s"' % ts.encode(), lit),
                       "bad_kwh")
    if kind == 12:
        return Hostile(any_key, _raw(b'"%s"' % hid.encode(), b'"%s"' % ts.encode(),
                                     _deep(rng)), "bad_kwh")
    if kind == 13:
        far = rng.choice(["2099-06-01T00:00:00Z", "2150-01-01T00:30:00+01:00"])
        return Hostile(any_key, _obj(hid, far), "future_timestamp")
    if kind in (14, 15):
        return Hostile(any_key, _obj(hid, rng.choice(BAD_TS)), "bad_timestamp")
    if kind == 16:
        t = rng.choice([ts[:14] + "10:00Z", ts[:17] + "01Z", ts[:-1] + ".001Z",
                        ts[:-1] + "+00:15"])
        return Hostile(any_key, _obj(hid, t), "not_half_hour")
    if kind == 17:
        return Hostile(any_key, _obj(hid, rng.choice([1358935200, [ts], {"t": ts}, True])),
                       "bad_timestamp")
    if kind == 18:
        return Hostile(any_key, _raw(b'"%s"' % hid.encode(), _deep(rng), b"0.25"),
                       "bad_timestamp")
    if kind == 19:
        return Hostile(any_key, _obj(hid, None), "missing_field")
    if kind in (20, 21):  # duplicate fields, either order, or spelled with an escape
        qh, qt = b'"%s"' % hid.encode(), b'"%s"' % ts.encode()
        value = rng.choice([
            b'{"household_id":%s,"household_id":"FAKE1","ts":%s,"kwh":0.3}' % (qh, qt),
            b'{"household_id":%s,"ts":%s,"kwh":"x","kwh":0.3}' % (qh, qt),
            b'{"household_id":%s,"ts":"2099-01-01T00:00:00Z","ts":%s,"kwh":0.3}' % (qh, qt),
            b'{"household_id":%s,"ts":%s,"kwh":0.3,"k\\u0077h":49}' % (qh, qt)])
        return Hostile(hid.encode(), value, "bad_shape")
    if kind in (22, 23, 24):  # a real reading under another household's key
        key = rng.choice([other.encode(), None, b"\xff\xfe", hid.encode() + b"\x00",
                          hid.lower().encode(), b""])
        return Hostile(key, _obj(hid, ts, 49.0), "key_mismatch")
    if kind == 25:  # an array: the bad readings, each with its own reason
        value = orjson.dumps([orjson.loads(_obj(hid, ts, -1.0)),
                              orjson.loads(_obj(hid, ts, drop="ts")),
                              orjson.loads(_obj(other, ts, 49.0)),
                              orjson.loads(_obj(hid, "2013-01-23T10:00:00"))])
        return Hostile(hid.encode(), value, "bad_kwh",
                       {"bad_kwh": 1, "missing_field": 1, "key_mismatch": 1,
                        "bad_timestamp": 1})
    if kind == 26:  # an array, all of another household under this key
        n = rng.randrange(1, 20)
        value = orjson.dumps([orjson.loads(_obj(other, slot_ts(), 49.0)) for _ in range(n)])
        return Hostile(hid.encode(), value, "key_mismatch", {"key_mismatch": n})
    if kind == 27:
        return Hostile(rng.choice([hid.encode(), b"\xff\xfe"]), None, "not_json")  # tombstone
    if kind == 28:  # bytes that are not UTF-8 inside a string
        return Hostile(any_key, _raw(b'"SYN\xff\xfe"', b'"%s"' % ts.encode(), b"0.3"),
                       "not_json")
    if kind == 29:
        enc = rng.choice(["utf-16", "utf-32", "utf-8-sig"])
        return Hostile(any_key, _obj(hid, ts).decode().encode(enc), "not_json")
    if kind == 30:  # control characters in a string: not JSON
        return Hostile(any_key, _raw(b'"SYN\x01"', b'"%s"' % ts.encode(), b"0.3"), "not_json")
    if kind == 31:  # compact look-alikes the byte-level path must not misread
        value = rng.choice([
            b'{"household_id":"%s","ts":"%s","kwh":00.3}' % (hid.encode(), ts.encode()),
            b'{"household_id":"%s","ts":"%s","kwh":.3}' % (hid.encode(), ts.encode()),
            b'{"household_id":"%s","ts":"%s","kwh":0.3,}' % (hid.encode(), ts.encode())])
        return Hostile(hid.encode(), value, "not_json")
    if kind == 32:
        return Hostile(any_key, _obj(hid, ts, -0.0001), "bad_kwh")
    return Hostile(any_key, _raw(b'"%s"' % hid.encode(), orjson.dumps(rng.choice(BAD_TS[:5])),
                                 b"0.3"), "bad_timestamp")


async def _run(broker, detector, data, days, hostile: list[Hostile] | None):
    settings = unique_settings(broker, timezone=TIMEZONE)
    sent: dict[tuple[int, int], Hostile] = {}
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                    linger_ms=5, max_request_size=4 << 20)
        await producer.start()
        try:
            nprng = np.random.default_rng(0)
            valid = [r for d in days for r in day_records(data, d, nprng, array_fraction=0.1)]
            futures: list[asyncio.Future[Any]] = []
            which: list[Hostile | None] = []
            per_valid = len(hostile or []) / len(valid)
            owed, k = 0.0, 0
            for key, value, _ in valid:
                owed += per_valid
                while owed >= 1 and hostile is not None and k < len(hostile):
                    owed -= 1
                    h = hostile[k]
                    futures.append(await producer.send(settings.input_topic, h.value,
                                                       key=h.key))
                    which.append(h)
                    k += 1
                futures.append(await producer.send(settings.input_topic, value, key=key))
                which.append(None)
            for h in (hostile or [])[k:]:
                futures.append(await producer.send(settings.input_topic, h.value, key=h.key))
                which.append(h)
            for md, source in zip(await asyncio.gather(*futures), which, strict=True):
                if source is not None:
                    sent[(md.partition, md.offset)] = source
        finally:
            await producer.stop()
        scores = await read_topic(settings, settings.scores_topic,
                                  min_records=HOUSEHOLDS * DAYS, timeout_s=120)
        alerts = await read_topic(settings, settings.alerts_topic)
        dead = await read_topic(settings, settings.dead_letter_topic,
                                min_records=len(sent), timeout_s=120)
        assert all(not t.done() for t in service._tasks), "a stage died"
        registry = service.metrics.registry
        invalid = {reason: registry.get_sample_value("meterwatch_invalid_readings_total",
                                                     {"reason": reason}) or 0
                   for reason in {r for h in sent.values() for r in h.counts}}
    return settings, scores, alerts, dead, sent, invalid


async def test_hostile_records_are_dead_lettered_and_change_nothing_valid(
        broker, detector):
    data = generate(SyntheticConfig(n_households=HOUSEHOLDS, n_days=HISTORY_DAYS + DAYS,
                                    anomaly_rate=0.0, seed=31))
    days = range(HISTORY_DAYS, HISTORY_DAYS + DAYS)
    truth = inject_gross(data, days)
    rng = random.Random(15)
    day0 = int(data.days[HISTORY_DAYS])

    def slot_ts() -> str:
        return ts_text((day0 + rng.randrange(DAYS)) * 86400 + rng.randrange(48) * 1800)

    hostile = [hostile_record(rng, i, list(data.household_ids), slot_ts)
               for i in range(N_HOSTILE)]
    took: dict[str, float] = {}

    async def timed(name: str, records: list[Hostile] | None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return await _run(broker, detector, data, days, records)
        finally:
            took[name] = time.perf_counter() - t0

    # the clean and the hostile run are independent (topics, group and service of their
    # own): side by side, their waits overlap
    async with asyncio.TaskGroup() as group:  # one failing stops the other
        clean_run = group.create_task(timed("clean", None))
        hostile_run = group.create_task(timed("hostile", hostile))
    _, clean_scores, clean_alerts, clean_dead, _, _ = clean_run.result()
    settings, scores, alerts, dead, sent, invalid = hostile_run.result()
    print(f"side by side: clean run {took['clean']:.1f} s, hostile run "
          f"{took['hostile']:.1f} s ({len(sent)} hostile records)")

    assert len(sent) == N_HOSTILE and not clean_dead
    # every hostile record: exactly one dead letter, the expected reason, its own bytes
    assert len(dead) == len(sent)
    by_source = {(d["partition"], d["offset"]): d for d in dead}
    assert len(by_source) == len(dead) and set(by_source) == set(sent)
    wrong = Counter((h.reason, by_source[k]["reason"]) for k, h in sent.items()
                    if by_source[k]["reason"] != h.reason)
    assert not wrong, wrong
    for k, h in sent.items():
        d = by_source[k]
        kept = base64.b64decode(d["value"])
        original = h.value or b""
        assert original.startswith(kept) and d["topic"] == settings.input_topic
        assert d.get("value_truncated", False) == (len(kept) < len(original))
    assert sum(1 for d in dead if d.get("value_truncated")) == \
        sum(1 for h in sent.values() if len(h.value or b"") > 512 * 1024) >= 10
    # readings, not records, are counted, by reason
    expected: Counter[str] = Counter()
    for h in sent.values():
        expected.update(h.counts)
    assert {r: int(v) for r, v in invalid.items() if v} == dict(expected)
    # the valid stream's outcome is unchanged, and nothing was added to it
    key = lambda d: (d["household_id"], d["date"])  # noqa: E731
    assert sorted(map(key, scores)) == sorted(map(key, clean_scores))
    assert len(scores) == HOUSEHOLDS * DAYS
    assert sorted(map(key, alerts)) == sorted(map(key, clean_alerts))
    assert set(truth) <= set(map(key, alerts))
    clean = {key(s): s for s in clean_scores}
    for s in scores:
        c = clean[key(s)]
        assert (s["status"], s["readings"], s["missing_slots"]) == \
            (c["status"], c["readings"], c["missing_slots"])
        assert s["score"] == pytest.approx(c["score"], rel=1e-4, abs=1e-4)
