"""No single record can crash parsing (issue 15): regressions, the timestamp grammar, the
key policy, per-reading counts and dead letters that always fit."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meterwatch.stream import parse
from meterwatch.stream.alerts import day_date
from meterwatch.stream.config import Settings
from meterwatch.stream.events import DeadLetter, Reading
from meterwatch.stream.outputs import DEAD_LETTER_MAX_BYTES, dead_letter_record
from meterwatch.stream.parse import MAX_DETAIL_CHARS, _parse_compact, parse_records
from meterwatch.stream.timegrid import TimeGrid
from meterwatch.stream.validation import MAX_TS, MIN_TS, Invalid, check_reading, loads

NOW = 1.9e9
OK_TS = "2013-03-04T06:00:00Z"


def _one(value: bytes, key: bytes | None = None) -> tuple[int, list[tuple[str, str]]]:
    b = parse_records([value], now_s=NOW, keys=None if key is None else [key])
    return len(b), [(r.reason, r.detail) for r in b.rejections]


def _schema_reason(value: bytes) -> str | None:
    """The dead-letter reason the documented schema gives (None: accepted)."""
    try:
        doc = loads(value)
        if isinstance(doc, list):
            return None  # arrays are a record-level form, not a Reading
        check_reading(doc, now_s=NOW)
    except Invalid as exc:
        return exc.reason
    return None


# 1. the two single-record crashes -----------------------------------------------------
@pytest.mark.parametrize("depth", [1, 50, 995, 1000, 1023])
@pytest.mark.parametrize(("field", "reason"), [("kwh", "bad_kwh"),
                                               ("household_id", "bad_household"),
                                               ("ts", "bad_timestamp")])
def test_deeply_nested_values_are_rejected_not_fatal(field: str, reason: str,
                                                      depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    doc = {"household_id": b'"PX1"', "ts": f'"{OK_TS}"'.encode(), "kwh": b"0.1"}
    doc[field] = nested
    value = b"{" + b",".join(b'"%s":%s' % (k.encode(), v) for k, v in doc.items()) + b"}"
    n, rej = _one(value, b"PX1")
    assert n == 0 and len(rej) == 1 and rej[0][0] == reason
    assert "a JSON array of" in rej[0][1] and len(rej[0][1]) < 200


def test_nesting_beyond_the_decoder_limit_is_not_json() -> None:
    value = b'{"household_id":"PX1","ts":"' + OK_TS.encode() + b'","kwh":' + b"[" * 1100 \
        + b"]" * 1100 + b"}"
    assert _one(value, b"PX1")[1][0][0] == "not_json"


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z",
                                "0000-01-01T00:00:00Z", "1899-12-31T23:30:00Z",
                                "1900-01-01T00:00:00+00:30", "2200-01-01T00:00:00Z",
                                "9999-12-31T23:30:00-14:00"])
def test_dates_outside_the_supported_range_are_rejected(ts: str) -> None:
    value = orjson.dumps({"household_id": "PX2", "ts": ts, "kwh": 0.1})
    n, rej = _one(value, b"PX2")
    assert n == 0 and rej[0][0] == "bad_timestamp"
    assert "outside the supported range" in rej[0][1] or ts.startswith("0000")
    # far future dates too when the future check allows them
    b = parse_records([value], now_s=NOW, max_future_s=1e12)
    assert len(b) == 0 and b.rejections[0].reason == "bad_timestamp"


@pytest.mark.parametrize("tz", ["UTC", "Europe/London", "Pacific/Kiritimati",
                                "Pacific/Pago_Pago", "America/St_Johns"])
def test_every_accepted_instant_has_a_local_day_in_every_time_zone(tz: str) -> None:
    grid = TimeGrid(tz)
    edges = np.array([MIN_TS, MIN_TS + 1800, MAX_TS - 1800, 0], dtype=np.int64)
    day, slot, _ = grid.locate(edges)
    for d in day.tolist():
        day_date(d)
        grid.bounds(d)
        grid.expected_readings(d)
    assert ((slot >= 0) & (slot < 48)).all()
    for ts in ("1900-01-01T00:00:00Z", "2199-12-31T23:30:00Z"):
        b = parse_records([orjson.dumps({"household_id": "H", "ts": ts, "kwh": 1})],
                          now_s=8e9)
        assert len(b) == 1


# 2. the timestamp grammar: one answer from every path -----------------------------------
ACCEPTED = ["2013-01-01T00:30:00Z", "2013-01-01T00:30:00.000Z", "2013-01-01T00:30Z",
            "2013-01-01 00:30:00+00:00", "2013-01-01T01:30:00+01:00",
            "2013-01-01T01:30:00+0100", "2012-12-31T19:30:00-05:00",
            "2013-01-01T00:30:00.000000000Z", "2013-01-01T00:30:00.000000+00:00"]
REJECTED = {
    "2013-03-04T04:00:00+00:00garbage": "bad_timestamp",
    "2013-03-06T05:00:00Z\x00": "bad_timestamp",
    "2013-03-08T04:00:00\x00Z": "bad_timestamp",
    "\x002013-03-08T04:00:00Z": "bad_timestamp",
    "2013-03-08T08:30:00+00:30:00.5": "bad_timestamp",
    "2013-03-08T08:30:00+00:30:00": "bad_timestamp",
    "2013-W10-1T00:00:00Z": "bad_timestamp",
    "20130304T040000Z": "bad_timestamp",
    "2013-03-04t04:00:00z": "bad_timestamp",
    "2013-03-04T04:00:00z": "bad_timestamp",
    "2013-03-04T04:00:00": "bad_timestamp",
    "2013-03-04T04:00:00+01": "bad_timestamp",
    "2013-03-04T04:00:00 Z": "bad_timestamp",
    "2013-03-04T04:00:00.Z": "bad_timestamp",
    "2013-03-04T04:00:00.0000000000Z": "bad_timestamp",
    "2013-063T04:00:00Z": "bad_timestamp",
    "2013-02-29T00:00:00Z": "bad_timestamp",
    "2013-01-01T24:00:00Z": "bad_timestamp",
    "2013-01-01T00:30:60Z": "bad_timestamp",
    "2013-01-01T00:30:00+24:00": "bad_timestamp",
    "２０１３-01-01T00:30:00Z": "bad_timestamp",
    "2013-01-01T00:30:00Z" + "0" * 100: "bad_timestamp",
    "2013-01-01T00:30:00.001Z": "not_half_hour",
    "2013-01-01T00:10:00Z": "not_half_hour",
    "2013-01-01T00:30:00+00:15": "not_half_hour",
}


def _all_paths(ts: str) -> list[tuple[int, list[str]]]:
    """(readings, reasons) from the compact path, the general path (an array) and the
    schema, for one reading with this timestamp."""
    doc = {"household_id": "H", "ts": ts, "kwh": 0.5}
    compact = orjson.dumps(doc)
    out = []
    b = parse_records([compact], now_s=NOW, keys=[b"H"])
    out.append((len(b), [r.reason for r in b.rejections]))
    b = parse_records([orjson.dumps([doc])], now_s=NOW, keys=[b"H"])
    out.append((len(b), [r.reason for r in b.rejections]))
    reason = _schema_reason(compact)
    out.append((int(reason is None), [] if reason is None else [reason]))
    return out


@pytest.mark.parametrize("ts", ACCEPTED)
def test_the_grammar_accepts(ts: str) -> None:
    assert _all_paths(ts) == [(1, [])] * 3
    b = parse_records([orjson.dumps({"household_id": "H", "ts": ts, "kwh": 0.5})], now_s=NOW)
    r = Reading.model_validate({"household_id": "H", "ts": ts, "kwh": 0.5})
    assert int(b.ts[0]) == int(r.ts.timestamp())


@pytest.mark.parametrize(("ts", "reason"), list(REJECTED.items()))
def test_the_grammar_rejects(ts: str, reason: str) -> None:
    assert _all_paths(ts) == [(0, [reason])] * 3


def test_the_compact_path_never_reads_a_cut_timestamp() -> None:
    """The compact path reads its 20..25-character timestamps itself; NULs never reach it
    (not printable ASCII), and anything longer is read in full by the general path."""
    values = [orjson.dumps({"household_id": "H", "ts": t, "kwh": 0.5})
              for t in REJECTED if isinstance(t, str)]
    out = _parse_compact(values, None, NOW, 86_400.0)
    assert out is not None
    batch, _ = out
    assert len(batch) == 0


# 3. JSON-level ambiguities -----------------------------------------------------------
@pytest.mark.parametrize(("value", "reason"), [
    (b'{"household_id":"H","household_id":"G","ts":"2013-01-01T00:30:00Z","kwh":1}',
     "bad_shape"),
    (b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":"1","kwh":0.5}', "bad_shape"),
    (b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","k\\u0077h":1,"kwh":0.5}',
     "bad_shape"),
    (b'{"household_id":"H","ts":"2099-01-01T00:30:00Z","ts":"2013-01-01T00:30:00Z",'
     b'"kwh":1}', "bad_shape"),
    (b'[{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":1,"kwh":2}]', "bad_shape"),
    (b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":1e309}', "bad_kwh"),
    (b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":-1e309}', "bad_kwh"),
    (b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":' + b"9" * 400 + b"}",
     "bad_kwh"),
    (b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":NaN}', "not_json"),
    (b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":Infinity}', "not_json"),
    (b'{"household_id":"H\\u0000","ts":"2013-01-01T00:30:00Z","kwh":1}', "bad_household"),
    (b'{"household_id":"H\\u202e1","ts":"2013-01-01T00:30:00Z","kwh":1}', "bad_household"),
    (b'{"household_id":"H\\ud800","ts":"2013-01-01T00:30:00Z","kwh":1}', "bad_household"),
    (b'{"household_id":"H\\n","ts":"2013-01-01T00:30:00Z","kwh":1}', "bad_household"),
])
def test_json_ambiguities_have_one_answer(value: bytes, reason: str) -> None:
    assert _one(value, b"H")[1][0][0] == reason
    assert _schema_reason(value) == reason or value.startswith(b"[")
    if not value.startswith(b"["):
        with pytest.raises(ValueError, match=reason):
            Reading.model_validate_json(value)


def test_duplicates_of_other_keys_and_field_names_inside_values_are_fine() -> None:
    values = [b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":1,"x":1,"x":2}',
              b'{"household_id":"ts","ts":"2013-01-01T00:30:00Z","kwh":1}',
              b'{"household_id":"H","ts":"2013-01-01T00:30:00Z","kwh":1,"m":{"kwh":2}}',
              b'{"household_id":"H\\u00e9","ts":"2013-01-01T00:30:00Z","kwh":1}']
    b = parse_records(values, now_s=NOW, keys=[b"H", b"ts", b"H", "Hé".encode()])
    assert len(b) == 4 and not b.rejections


# 4. containment of the unforeseen ------------------------------------------------------
def test_an_exception_in_one_record_is_that_records_internal_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = parse._decode_fast

    def faulty(values: list[bytes | None]) -> list[object] | None:
        if any(v is not None and b"BOOM" in v for v in values):
            raise RecursionError("maximum recursion depth exceeded")
        return real(values)

    monkeypatch.setattr(parse, "_decode_fast", faulty)
    good = orjson.dumps({"household_id": "H", "ts": "2013-01-01T00:30:00Z", "kwh": 0.5})
    general = orjson.dumps([{"household_id": "H", "ts": "2013-01-01T01:00:00Z", "kwh": 1}])
    boom = b'{"kwh": 1, "household_id": "BOOM", "ts": "2013-01-01T00:30:00Z"}'
    b = parse_records([good, boom, general, b"{"], now_s=NOW)
    assert b.record.tolist() == [0, 2] and b.household == ["H", "H"]
    assert [(r.index, r.reason) for r in b.rejections] == [(1, "internal_error"),
                                                           (3, "not_json")]
    assert "RecursionError" in b.rejections[0].detail


def test_details_are_bounded() -> None:
    bad = [{"household_id": "x" * 10_000, "ts": "t" * 10_000, "kwh": 1}] * 50
    b = parse_records([orjson.dumps(bad)], now_s=NOW)
    assert len(b.rejections[0].detail) <= MAX_DETAIL_CHARS
    assert b.rejections[0].counts == {"bad_household": 50}


# 5. keys ---------------------------------------------------------------------------
def test_key_policy() -> None:
    def r(h: str, t: str = "2013-01-01T00:30:00Z") -> dict[str, object]:
        return {"household_id": h, "ts": t, "kwh": 0.5}

    values = [orjson.dumps(r("H1")),  # right key
              orjson.dumps(r("H1")),  # null key
              orjson.dumps(r("H1")),  # another household's key
              orjson.dumps(r("H1")),  # not UTF-8
              orjson.dumps([r("H1"), r("H2"), r("H1", "2013-01-01T01:00:00Z"), r("H3")]),
              orjson.dumps([r("H2"), {"household_id": "H2", "kwh": -1}]),
              orjson.dumps(r("H1 ")), orjson.dumps(r("Hé"))]
    keys = [b"H1", None, b"H2", b"\xff", b"H1", b"H1", b"H1", "Hé".encode()]
    b = parse_records(values, now_s=NOW, keys=keys)
    assert b.record.tolist() == [0, 4, 4, 7] and b.household == ["H1", "H1", "H1", "Hé"]
    rej = {r.index: r for r in b.rejections}
    assert {i: x.reason for i, x in rej.items()} == {
        1: "key_mismatch", 2: "key_mismatch", 3: "key_mismatch", 4: "key_mismatch",
        5: "key_mismatch", 6: "key_mismatch"}
    assert "record key is null" in rej[1].detail
    assert "not UTF-8" in rej[3].detail
    assert "reading[1]" in rej[4].detail and "reading[3]" in rej[4].detail \
        and "reading[0]" not in rej[4].detail
    assert rej[4].counts == {"key_mismatch": 2}
    assert rej[5].counts == {"key_mismatch": 1, "bad_kwh": 1}


# 6. dead letters -------------------------------------------------------------------
@pytest.mark.parametrize(("value_size", "key_size"), [(10, 5), (900_000, 5), (9_300_000, 5),
                                                      (600_000, 2_000_000), (0, 0)])
def test_dead_letters_always_fit(value_size: int, key_size: int) -> None:
    value = bytes(range(256)) * (value_size // 256) + b"x" * (value_size % 256)
    key = b"k" * key_size
    rec = dead_letter_record(Settings(), reason="too_large", detail="d" * 100_000,
                             topic="t", partition=3, offset=7, key=key, value=value,
                             timestamp_ms=1)
    assert len(rec.value or b"") + len(rec.key or b"") <= DEAD_LETTER_MAX_BYTES
    doc = orjson.loads(rec.value or b"")
    DeadLetter.model_validate(doc)
    kept = base64.b64decode(doc["value"])
    assert value.startswith(kept)
    if len(kept) < len(value):
        assert doc["value_truncated"] is True and doc["value_size"] == value_size
        assert len(kept) > DEAD_LETTER_MAX_BYTES // 2  # cut only as far as needed
    else:
        assert "value_truncated" not in doc
    if key_size > 1024:
        assert rec.key is None and doc["key_truncated"] and doc["key_size"] == key_size
    else:
        assert rec.key == key


def test_no_recursion_anywhere_in_validation() -> None:
    """With only 80 frames of stack left, a 1,023-deep value in each field is still
    rejected (building its detail never recurses into the value)."""
    import sys

    values = [_raw_with(field) for field in ("household_id", "ts", "kwh")]
    depth = len(__import__("inspect").stack(0))
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 80)
    try:
        b = parse_records(values, now_s=NOW, keys=[b"PX1"] * 3)
    finally:
        sys.setrecursionlimit(old)
    assert [r.reason for r in b.rejections] == ["bad_household", "bad_timestamp", "bad_kwh"]
    assert all(r.counts == {r.reason: 1} for r in b.rejections)


def _raw_with(field: str) -> bytes:
    doc = {"household_id": b'"PX1"', "ts": f'"{OK_TS}"'.encode(), "kwh": b"0.1"}
    doc[field] = b"[" * 1023 + b"]" * 1023
    return b"{" + b",".join(b'"%s":%s' % (k.encode(), v) for k, v in doc.items()) + b"}"


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=30))
@example("\U00010000" * 12)  # 10 characters each, escaped: 122 (found by CI)
def test_describe_is_short_for_any_json_value(v: object) -> None:
    from meterwatch.stream.validation import describe
    assert len(describe(v)) <= 120
    with pytest.raises(Invalid):
        check_reading({"household_id": "H", "ts": OK_TS, "kwh": v}
                      if not isinstance(v, (int, float)) or isinstance(v, bool)
                      or not 0 <= v <= 50 else {"household_id": "H", "ts": v, "kwh": 1})


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 6000), st.one_of(st.none(), st.binary(max_size=1500)),
       st.text(max_size=300), st.integers(1500, 6000))
def test_dead_letters_fit_any_limit_and_are_cut_only_when_needed(
        value_size: int, key: bytes | None, detail: str, limit: int) -> None:
    value = b"\xff\x00" * (value_size // 2)
    kw = dict(reason="not_json", detail=detail, topic="t", partition=0, offset=1, key=key,
              timestamp_ms=None)
    rec = dead_letter_record(Settings(), value=value, max_bytes=limit, **kw)
    assert len(rec.value or b"") + len(rec.key or b"") <= limit
    doc = orjson.loads(rec.value or b"")
    if doc.get("value_truncated"):  # the whole value would not have fitted
        whole = dead_letter_record(Settings(), value=value, max_bytes=10**9, **kw)
        assert len(whole.value or b"") + len(whole.key or b"") > limit - 64
        assert value.startswith(base64.b64decode(doc["value"]))
    else:
        assert base64.b64decode(doc["value"]) == value
