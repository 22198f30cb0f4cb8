"""The batch parser never raises, and accepts exactly what the documented schema accepts."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream.events import Reading
from stream.parse import parse_records

NOW = 1.9e9  # 2030-03: timestamps up to then are not "in the future"

timestamps = st.one_of(
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
    st.datetimes().map(lambda d: d.replace(second=0, microsecond=0,
                                           minute=30 * (d.minute // 30)).isoformat() + "+00:00"),
    st.sampled_from(["2013-01-01T00:30:00Z", "2013-01-01T01:00:00+01:00",
                     "2013-02-30T00:00:00Z", "2013-01-01T00:30:00", "2013-01-01 00:30:00Z",
                     "2013-01-01T00:30:00.000+00:00", "2013-01-01T24:00:00Z", "", "Z"]),
    st.text(max_size=30), st.integers(-2**63, 2**63 - 1), st.none())
kwhs = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 100),
                 st.booleans(), st.text(max_size=5), st.none())
households = st.one_of(st.text(min_size=0, max_size=70), st.integers(-2**63, 2**63 - 1), st.none())


@st.composite
def reading_docs(draw):  # type: ignore[no-untyped-def]
    doc = {}
    for key, strat in (("household_id", households), ("ts", timestamps), ("kwh", kwhs)):
        if draw(st.booleans()) or draw(st.booleans()):
            doc[key] = draw(strat)
    return doc


def _schema_accepts(doc: dict) -> bool:
    try:
        r = Reading.model_validate(doc)
    except ValidationError:
        return False
    return r.ts.timestamp() <= NOW + 86400


@settings(max_examples=400, deadline=None)
@given(st.lists(reading_docs(), min_size=1, max_size=20))
def test_parser_agrees_with_the_schema(docs: list[dict]) -> None:
    values = [orjson.dumps(d) for d in docs]
    batch = parse_records(values, now_s=NOW)
    accepted = set(batch.record.tolist())
    rejected = {r.index for r in batch.rejections}
    assert accepted.isdisjoint(rejected) and accepted | rejected == set(range(len(docs)))
    for i, doc in enumerate(docs):
        assert (i in accepted) == _schema_accepts(doc), (doc, batch.rejections)
    for j, i in enumerate(batch.record.tolist()):
        r = Reading.model_validate(docs[i])
        assert batch.household[j] == r.household_id
        assert batch.ts[j] == int(r.ts.timestamp())
        assert math.isclose(batch.kwh[j], r.kwh, rel_tol=1e-6, abs_tol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=30))
def test_parser_never_raises_on_arbitrary_bytes(values: list[bytes]) -> None:
    batch = parse_records(values, now_s=NOW)
    assert len(batch.rejections) + len(set(batch.record.tolist())) <= len(values)
    for r in batch.rejections:
        assert r.reason and 0 <= r.index < len(values)


def test_arrays_keep_their_valid_readings_and_report_the_bad_ones() -> None:
    good = {"household_id": "H", "ts": "2013-01-01T00:30:00Z", "kwh": 0.5}
    bad = {"household_id": "H", "ts": "2013-01-01T00:30:00Z", "kwh": -1}
    batch = parse_records([orjson.dumps([good, bad, good])], now_s=NOW)
    assert len(batch) == 2
    assert [r.reason for r in batch.rejections] == ["bad_kwh"]
    assert "reading[1]" in batch.rejections[0].detail


@pytest.mark.parametrize(("value", "reason"), [
    (b"{", "not_json"), (b"[]", "bad_shape"), (b'"x"', "bad_shape"),
    (b'{"ts": "2013-01-01T00:30:00Z", "kwh": 1}', "missing_field"),
    (b'{"household_id": "H", "ts": "2013-01-01T00:30:00Z", "kwh": 51}', "bad_kwh"),
    (b'{"household_id": "H", "ts": "2013-01-01T00:30:00Z", "kwh": "NaN"}', "bad_kwh"),
    (b'{"household_id": "H", "ts": "2013-01-01T00:31:00Z", "kwh": 1}', "not_half_hour"),
    (b'{"household_id": "H", "ts": "2099-01-01T00:30:00Z", "kwh": 1}', "future_timestamp"),
    (b'{"household_id": "H", "ts": "2013-01-01T00:30:00", "kwh": 1}', "bad_timestamp"),
    (b"[" + b",".join([b"{}"] * 10_001) + b"]", "too_many_readings"),
])
def test_each_rejection_has_its_reason(value: bytes, reason: str) -> None:
    batch = parse_records([value], now_s=NOW)
    assert len(batch) == 0 and [r.reason for r in batch.rejections] == [reason]
