"""The batch parser never raises, and accepts exactly what the documented schema accepts."""

from __future__ import annotations

import datetime
import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meterwatch.stream.events import Reading
from meterwatch.stream.parse import parse_records

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
    assert all(type(h) is str for h in batch.ids) and len(set(batch.id_index.tolist())) == \
        len(batch.ids)  # only the ids of accepted readings
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


# The compact path (bytes read with numpy) must agree with the general one (orjson) exactly.
ascii_ids = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                    min_size=0, max_size=70)
number_texts = st.one_of(
    st.floats(min_value=0, max_value=2e5, allow_nan=False).map(repr),
    st.integers(0, 10**17).map(str),
    st.integers(0, 12).flatmap(lambda p: st.decimals(min_value=0, max_value=1000, places=p)
                               ).map(lambda d: format(d, "f")),
    st.sampled_from(["0", "0.0", "00", "01", ".5", "5.", "1.2.3", "-0.5", "1e3", "1E-2", "0.10",
                     "true", "null", '"1"', "9999999999999999", "123456789012345.6",
                     "0.000000000000001", "200000.0", "200000.00001", "", " 1"]))


@st.composite
def compact_records(draw):  # type: ignore[no-untyped-def]
    hh = draw(st.one_of(ascii_ids, st.sampled_from(["MAC000002", "H1", "é", "a\\\\b"])))
    ts = draw(timestamps.filter(lambda t: isinstance(t, str)))
    num = draw(number_texts)
    colon, comma = draw(st.sampled_from([(":", ","), (": ", ", "), (":  ", ","), (":", " ,")]))
    doc = (f'{{"household_id"{colon}{orjson.dumps(hh).decode()}{comma}"ts"{colon}'
           f'{orjson.dumps(ts).decode()}{comma}"kwh"{colon}{num}}}')
    return draw(st.one_of(st.just(doc.encode()), st.just(doc.encode()[:-1]),
                          st.just((doc + " ").encode()), st.binary(max_size=80)))


@settings(max_examples=400, deadline=None)
@given(st.lists(compact_records(), min_size=1, max_size=30))
def test_compact_path_agrees_with_orjson_path(values: list[bytes]) -> None:
    from meterwatch.stream.parse import _parse_general
    fast = parse_records(values, now_s=NOW)
    slow = _parse_general(values, None, now_s=NOW, max_future_s=86_400.0)
    assert fast.household == slow.household
    assert fast.ts.tolist() == slow.ts.tolist()
    assert fast.kwh.tobytes() == slow.kwh.tobytes()
    assert fast.record.tolist() == slow.record.tolist()
    assert [(r.index, r.reason, r.detail) for r in fast.rejections] == \
        [(r.index, r.reason, r.detail) for r in slow.rejections]


def test_compact_path_reads_the_usual_layouts() -> None:
    import json

    from meterwatch.stream.parse import _parse_compact
    doc = {"household_id": "MAC000002", "ts": "2013-01-01T00:30:00Z", "kwh": 0.219}
    values = [orjson.dumps(doc), json.dumps(doc).encode(), b"[" + orjson.dumps(doc) + b"]"]
    out = _parse_compact(values, None, NOW, 86_400.0)
    assert out is not None
    batch, rest = out
    assert batch.record.tolist() == [0, 1] and rest.tolist() == [2]
    assert batch.kwh.tolist() == [np.float32(0.219)] * 2


# One specification: the compact path, the general path and the schema, on hostile bytes.
def _ts_forms(dt: datetime.datetime, off_min: int, form: int) -> str:
    sign = "-" if off_min < 0 else "+"
    oh, om = divmod(abs(off_min), 60)
    off = ["Z", f"{sign}{oh:02d}:{om:02d}", f"{sign}{oh:02d}{om:02d}"][form % 3]
    body = dt.strftime("%Y-%m-%d") + "T " [form // 3 % 2] + dt.strftime("%H:%M")
    secs = ["", dt.strftime(":%S"), dt.strftime(":%S") + ".000", dt.strftime(":%S.%f")]
    return body + secs[form // 6 % 4] + off


def _mutate(s: str, how: int, pos: int, junk: str) -> str:
    p = pos % (len(s) + 1)
    return [s, s[:p] + "\x00" + s[p:], s + junk, s[:p] + junk + s[p:], s[:p], s.lower(),
            s + ":00", s + ":00.5", s.replace("-", "", 2), s * 3, s.replace("T", "t"),
            s[:p] + s[p + 1:]][how if how < 12 else 0]


adversarial_ts = st.builds(
    _mutate,
    st.builds(_ts_forms, st.datetimes(min_value=datetime.datetime(1890, 1, 1),
                                      max_value=datetime.datetime(2210, 1, 1)).map(
        lambda d: d.replace(minute=d.minute // 30 * 30, second=0, microsecond=0)
        if d.second % 2 else d),
        st.integers(-14 * 60, 14 * 60).map(lambda m: m // 15 * 15), st.integers(0, 23)),
    st.integers(0, 23), st.integers(0, 40),
    st.sampled_from(["garbage", "Z", "\x00", "+00:00", "0", " ", "٣", "\u202e", "\ud800"]))
good_numbers = st.floats(0, 50).map(lambda f: repr(round(f, 3)))
raw_numbers = st.one_of(good_numbers, good_numbers, number_texts, st.sampled_from(
    ["1e309", "-1e309", "1e-400", "9" * 30, "18446744073709551616", "50", "50.0000001",
     "5e1", "0e0", "-0"]))
good_ids = st.sampled_from(["H1", "MAC000002", "x" * 64])
raw_ids = st.one_of(good_ids, good_ids, good_ids, ascii_ids, st.sampled_from(
    ["H1", "H\x00", "H\x7f", "H\u202e", "H\u0085", "Hé", "ts", "kwh", "x" * 64, "x" * 65]))


def _json_str(s: str) -> str:
    return orjson.dumps(s).decode() if "\ud800" not in s else '"' + s.replace(
        "\ud800", "\\ud800").replace('"', '\\"') + '"'


@st.composite
def hostile_objects(draw) -> str:
    members = [("household_id", _json_str(draw(raw_ids))),
               ("ts", _json_str(draw(adversarial_ts))), ("kwh", draw(raw_numbers))]
    if draw(st.integers(0, 6)) == 0:  # a field twice (either value first)
        name = draw(st.sampled_from(["household_id", "ts", "kwh"]))
        members.insert(draw(st.integers(0, 3)), (name, draw(st.sampled_from(
            ['"H1"', '"2013-01-01T00:30:00Z"', "0.5", "null"]))))
    if draw(st.integers(0, 9)) == 0:
        del members[draw(st.integers(0, len(members) - 1))]
    if draw(st.integers(0, 9)) == 0:
        members.insert(0, ("x", "1"))
    sep = draw(st.sampled_from([(":", ","), (": ", ", ")]))
    return "{" + sep[1].join(f'"{k}"{sep[0]}{v}' for k, v in members) + "}"


@st.composite
def hostile_records(draw) -> bytes:
    if draw(st.integers(0, 9)) < 6:  # mostly one bare object (the compact path's form)
        return draw(hostile_objects()).encode("utf-8", "surrogatepass")
    objs = draw(st.lists(hostile_objects(), min_size=1, max_size=3))
    text = "[" + ",".join(objs) + "]"
    return text.encode("utf-8", "surrogatepass")


def _spec(value: bytes, key: bytes | None) -> tuple[int, str | None]:
    """(valid readings, record reason) straight from stream.validation and the key policy."""
    from meterwatch.stream.validation import Invalid, check_reading, loads
    try:
        doc = loads(value)
    except Invalid as exc:
        return 0, exc.reason
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        return 0, "bad_shape"
    n, reason = 0, None
    for item in items:
        try:
            r = check_reading(item, now_s=NOW)
            if r.household_id.encode() != key:
                raise Invalid("key_mismatch", "")
            n += 1
        except Invalid as exc:
            reason = reason or exc.reason
    return n, reason


record_keys = st.sampled_from([b"H1", b"MAC000002", b"x" * 64, "Hé".encode(), b"", None,
                               b"\xff", b"H1\x00"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(hostile_records(), record_keys), min_size=1, max_size=12))
def test_all_paths_agree_on_hostile_records(records: list[tuple[bytes, bytes | None]]) -> None:
    from meterwatch.stream.parse import _parse_general
    values = [v for v, _ in records]
    keys = [k for _, k in records]
    fast = parse_records(values, now_s=NOW, keys=keys)
    slow = _parse_general(values, keys, now_s=NOW, max_future_s=86_400.0)
    assert fast.household == slow.household and fast.ts.tolist() == slow.ts.tolist()
    assert fast.record.tolist() == slow.record.tolist()
    assert [(r.index, r.reason, r.detail, r.counts) for r in fast.rejections] == \
        [(r.index, r.reason, r.detail, r.counts) for r in slow.rejections]
    reasons = {r.index: r.reason for r in fast.rejections}
    kept = np.bincount(fast.record, minlength=len(values)).tolist()
    for i, v in enumerate(values):
        assert (kept[i], reasons.get(i)) == _spec(v, keys[i]), v
        if not v.startswith(b"["):  # the documented schema, from the same bytes
            try:
                Reading.model_validate_json(v)
                assert reasons.get(i) in (None, "future_timestamp", "key_mismatch")
            except ValidationError as exc:
                assert exc.errors()[0]["ctx"]["error"].reason == reasons[i]


def assert_same_outcome(got, want) -> None:  # type: ignore[no-untyped-def]
    """Two parses of the same records, wrapped one way or another: the same readings of the
    same records, and the same rejections by index, reason and counts."""
    assert got.household == want.household and got.ts.tolist() == want.ts.tolist()
    assert got.kwh.tobytes() == want.kwh.tobytes()
    assert got.record.tolist() == want.record.tolist()
    assert [(r.index, r.reason, r.counts) for r in got.rejections] == \
        [(r.index, r.reason, r.counts) for r in want.rejections]


# Confluent Schema Registry's wire format (a zero byte and a 4-byte schema id before the
# payload): what its JSON Schema serializer writes. The payload is read as if unframed.
registry_headers = st.binary(min_size=4, max_size=4).map(lambda b: b"\x00" + b)


def _framed_key(key: bytes | None, header: bytes | None) -> bytes | None:
    """The key as a JSON Schema key serializer frames it (a JSON string after the header)."""
    if key is None or header is None:
        return key
    try:
        return header + orjson.dumps(key.decode())
    except UnicodeDecodeError:
        return header + key


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(hostile_records(), record_keys, st.none() | registry_headers,
                          st.booleans()), min_size=1, max_size=12))
def test_schema_registry_framing_is_read_through(
        records: list[tuple[bytes, bytes | None, bytes | None, bool]]) -> None:
    """Framed values (and framed keys) are read as their payloads: the same readings and
    reasons as unframed; a not-JSON payload's detail names the schema id."""
    from meterwatch.stream.validation import framed_detail
    plain = parse_records([v for v, _, _, _ in records], now_s=NOW,
                          keys=[k for _, k, _, _ in records])
    framed = parse_records([v if h is None else h + v for v, _, h, _ in records], now_s=NOW,
                           keys=[_framed_key(k, h) if fk else k for _, k, h, fk in records])
    assert_same_outcome(framed, plain)
    for f, r in zip(framed.rejections, plain.rejections, strict=True):
        header = records[r.index][2]
        if header is None:
            assert f.detail == r.detail
        elif r.reason == "not_json":
            assert f.detail == framed_detail(int.from_bytes(header[1:], "big"), r.detail)
        elif "the record key is" not in r.detail:  # (a key_mismatch shows the key as it came)
            assert f.detail == r.detail


def test_a_framed_payload_that_is_not_json_says_so() -> None:
    """An Avro (or Protobuf) serializer's record: dead-lettered as ``not_json``, the detail
    naming the framing and the schema id, the same from the parser and the schema."""
    avro = b"\x00\x00\x00\x01\x2a" + b"\x12MAC000002\x80\xa0\xe4\xd3\x0a"
    batch = parse_records([avro, b"\x00\x01"], now_s=NOW)
    assert len(batch) == 0
    (first, second) = batch.rejections
    assert first.reason == "not_json" and "schema id 298" in first.detail, first.detail
    assert "Schema Registry" not in second.detail  # two bytes are not the wire format
    with pytest.raises(ValidationError) as exc:
        Reading.model_validate_json(avro)
    assert exc.value.errors()[0]["ctx"]["error"].detail == first.detail
    good = b'{"household_id": "H1", "ts": "2013-01-01T00:30:00Z", "kwh": 0.5}'
    assert Reading.model_validate_json(b"\x00\x00\x00\x01\x2a" + good).kwh == 0.5
