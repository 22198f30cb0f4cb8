"""Records as Kafka Connect's JsonConverter writes them with ``schemas.enable=true`` (its
default): each value ``{"schema": ..., "payload": ...}``, a database timestamp column as a
``Timestamp`` (epoch milliseconds), a numeric column as a ``Decimal`` (base64), and each key
the household id in an envelope of its own (or, without schemas, as a JSON string). Before,
every such record was dead-lettered (``missing_field``, then ``key_mismatch``)."""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import given, settings
from hypothesis import strategies as st

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.events import Reading
from meterwatch.stream.parse import _decode_fast, parse_records
from meterwatch.stream.service import Service
from meterwatch.stream.validation import CONNECT_DECIMAL, CONNECT_TIMESTAMP
from tests.conftest import HISTORY_DAYS, read_topic, unique_settings
from tests.test_parse import NOW, assert_same_outcome, hostile_records, record_keys

#: A struct of the reading's own JSON types (a source that gives strings and doubles).
PLAIN_SCHEMA = (b'{"type":"struct","fields":[{"type":"string","optional":false,'
                b'"field":"household_id"},{"type":"string","optional":false,"field":"ts"},'
                b'{"type":"double","optional":true,"field":"kwh"}],"optional":false,'
                b'"name":"meter.reading"}')
#: A JDBC source's: a timestamp column and a NUMERIC(10, 3) column.
JDBC_SCHEMA = {"type": "struct", "optional": False, "name": "readings", "fields": [
    {"type": "string", "optional": False, "field": "household_id"},
    {"type": "int64", "optional": False, "name": CONNECT_TIMESTAMP, "version": 1,
     "field": "ts"},
    {"type": "bytes", "optional": True, "name": CONNECT_DECIMAL, "version": 1,
     "parameters": {"scale": "3", "connect.decimal.precision": "10"}, "field": "kwh"},
    {"type": "int32", "optional": True, "field": "quality"}]}
#: The same table with the meter point number in an integer column (BIGINT).
NUMBERED_SCHEMA = {**JDBC_SCHEMA, "fields": [
    {"type": "int64", "optional": False, "field": "household_id"}, *JDBC_SCHEMA["fields"][1:]]}
KEY_SCHEMA = b'{"type":"string","optional":false}'


def envelope(schema: bytes, payload: bytes) -> bytes:
    return b'{"schema":' + schema + b',"payload":' + payload + b"}"


def connect_key(key: bytes | int | None, schemas: bool) -> bytes | None:
    """The key as JsonConverter writes a string key (an integer one: ``key`` an int): with
    schemas, an envelope; without, a JSON string (a JSON number)."""
    if key is None:
        return None
    if isinstance(key, int):
        return (b'{"schema":{"type":"int64","optional":false},"payload":%d}' % key
                if schemas else b"%d" % key)
    try:
        text = orjson.dumps(key.decode())
    except UnicodeDecodeError:
        return key
    return envelope(KEY_SCHEMA, text) if schemas else text


def decimal(kwh: float, scale: int = 3) -> str:
    """A Connect ``Decimal`` as JsonConverter writes it (Java's ``BigInteger.toByteArray``:
    the shortest big-endian two's complement, base64)."""
    unscaled = round(kwh * 10 ** scale)
    return base64.b64encode(unscaled.to_bytes(unscaled.bit_length() // 8 + 1, "big",
                                              signed=True)).decode()


def jdbc_record(household: str | int, ts_ms: int, kwh: object) -> bytes:
    return orjson.dumps({"schema": NUMBERED_SCHEMA if isinstance(household, int) else
                         JDBC_SCHEMA, "payload": {"household_id": household, "ts": ts_ms,
                                                  "kwh": kwh, "quality": 0}})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(hostile_records(), record_keys, st.booleans(), st.booleans(),
                          st.booleans()), min_size=1, max_size=12))
def test_connect_envelopes_are_read_as_their_payloads(
        records: list[tuple[bytes, bytes | None, bool, bool, bool]]) -> None:
    """Any record, wrapped as JsonConverter wraps it (and its key too, with schemas or
    without): the same readings and reasons as the record itself; duplicate fields inside a
    payload are still found."""
    plain = parse_records([v for v, *_ in records], now_s=NOW,
                          keys=[k for _, k, *_ in records])
    wrapped_values = [envelope(PLAIN_SCHEMA, v) if wrap and orjson_ok(v) else v
                      for v, _, wrap, _, _ in records]
    wrapped = parse_records(wrapped_values, now_s=NOW, keys=[
        connect_key(k, schemas) if wrap_key else k for _, k, _, wrap_key, schemas in records])
    assert_same_outcome(wrapped, plain)
    for w, p in zip(wrapped.rejections, plain.rejections, strict=True):
        if "the record key is" not in p.detail:  # (a key_mismatch shows the key as it came)
            assert w.detail == p.detail
    for v, w in zip([v for v, *_ in records], wrapped_values, strict=True):
        if not v.startswith(b"[") and w is not v:  # the documented schema reads them alike
            assert outcome(w) == outcome(v)


def orjson_ok(value: bytes) -> bool:
    """Whether a record is JSON (wrapping what is not would only change its error's text)."""
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


def outcome(value: bytes) -> object:
    from pydantic import ValidationError
    try:
        return Reading.model_validate_json(value)
    except ValidationError as exc:
        return exc.errors()[0]["ctx"]["error"].reason


def test_connect_logical_types_are_read():
    """A JDBC source's row: the Timestamp (milliseconds) and the Decimal (scale 3) are the
    reading's ts and kWh; what does not convert fails its rule with the reason it would have
    as plain JSON; a nullable column that is null is missing."""
    t = 1357000200000  # 2013-01-01T00:30:00Z
    values = [
        jdbc_record("H1", t, decimal(0.219)),
        jdbc_record("H2", t + 1_800_000, decimal(12.5)),
        jdbc_record("H3", t + 60_000, decimal(0.1)),  # 00:31
        jdbc_record("H4", t, None),  # NULL in the table
        jdbc_record("H5", t, decimal(-0.05)),  # export netted off
        jdbc_record("H6", t, "not base64!"),
        jdbc_record("H7", 253402214400000, decimal(0.1)),  # 9999-12-31: "no end date"
        jdbc_record("H8", t, 0.3),  # decimal.format=NUMERIC: a JSON number
    ]
    keys = [f"H{i}".encode() for i in range(1, 9)]
    batch = parse_records(values, now_s=NOW, keys=keys)
    assert list(zip(batch.household, batch.ts.tolist(), batch.kwh.tolist(), strict=True)) == [
        ("H1", 1357000200, pytest.approx(0.219)), ("H2", 1357002000, 12.5),
        ("H8", 1357000200, pytest.approx(0.3))]
    assert [(r.index, r.reason, r.detail) for r in batch.rejections] == [
        (2, "not_half_hour", "ts '2013-01-01T00:31:00.000Z' is not the start of a half-hour"),
        (3, "missing_field", "kwh is missing"),
        (4, "bad_kwh", "kwh -0.05 outside [0, 50.0]"),
        (5, "bad_kwh", "kwh 'not base64!' is not a number"),
        (6, "bad_timestamp", "ts '9999-12-31T00:00:00.000Z' is outside the supported range "
                             "[1900-01-01T00:00:00Z, 2200-01-01T00:00:00Z)")]
    # a connector that does not key its records: every reading's dead letter says how to
    unkeyed = parse_records(values[:1], now_s=NOW, keys=[None])
    assert [(r.reason, r.detail) for r in unkeyed.rejections] == [(
        "key_mismatch", "household_id 'H1' but the record key is null (key each record by its "
        "household id; from Kafka Connect, with the ValueToKey and ExtractField$Key "
        "transforms)")]
    # without schemas (schemas.enable=false) a Timestamp is a bare number: the detail says
    # what it looks like and the two ways out
    bare = parse_records([b'{"household_id":"H1","ts":1357000200000,"kwh":0.2}'], now_s=NOW,
                         keys=[b"H1"])
    assert [(r.reason, r.detail) for r in bare.rejections] == [(
        "bad_timestamp", "ts 1357000200000 is not a string (epoch milliseconds? give ISO 8601 "
        "with a UTC offset; from Kafka Connect, keep schemas.enable=true or convert it with "
        "TimestampConverter)")]
    # the envelopes' schemas name the fields once more, which is not a duplicate field: the
    # batch is decoded at once by orjson, not record by record by Python's decoder
    assert _decode_fast(values) is not None
    # the documented schema reads the same record alike
    assert Reading.model_validate_json(values[0]).kwh == pytest.approx(0.219)
    # and an array of structs under an array schema
    array = orjson.dumps({"schema": {"type": "array", "items": JDBC_SCHEMA}, "payload": [
        orjson.loads(v)["payload"] for v in values[:2]]})
    both = parse_records([array], now_s=NOW, keys=[b"H1"])
    assert both.household == ["H1"] and [r.reason for r in both.rejections] == ["key_mismatch"]


def test_only_the_place_of_the_id_in_a_key_is_learnt(monkeypatch: pytest.MonkeyPatch):
    """How a key wraps its id is remembered so that later keys match with one lookup; a key
    whose id also appears elsewhere (or is written with escapes) must not teach a wrapper
    that makes another household's key match."""
    from meterwatch.stream import parse
    monkeypatch.setattr(parse, "_KEY_WRAPPERS", set())

    def accepted(hid: str, key: bytes) -> bool:
        value = b'{"household_id":"%s","ts":"2013-01-01T00:30:00Z","kwh":0.5}' % hid.encode()
        return len(parse_records([value], now_s=NOW, keys=[key])) == 1

    assert accepted("A", b'{"payload":"A","schema":{"type":"string","doc":"A"}}')
    assert accepted("A", b'{"schema":{"type":"string","doc":"A"},"payload":"\\u0041"}')
    # keys that hold A, with X where A was written elsewhere: not X's keys
    assert not accepted("X", b'{"payload":"A","schema":{"type":"string","doc":"X"}}')
    assert not accepted("X", b'{"schema":{"type":"string","doc":"X"},"payload":"\\u0041"}')
    # what was learnt is the payload's place, and matches as it should
    assert accepted("B", b'{"schema":{"type":"string","optional":false},"payload":"B"}')
    assert (b'{"schema":{"type":"string","optional":false},"payload":', b"}") in \
        parse._KEY_WRAPPERS


def test_household_ids_written_as_numbers_are_their_digits():
    """A meter point number from a database's integer column comes as a JSON number: read as
    its decimal digits (the same household as the string of them, under the same key bytes);
    a negative, fractional or boolean id is still ``bad_household``."""
    t = "2013-01-01T00:30:00Z"
    values = [b'{"household_id":%s,"ts":"%s","kwh":0.5}' % (hid.encode(), t.encode())
              for hid in ("1012345678903", '"1012345678903"', "0", "-5", "1.5", "true",
                          "1" + "0" * 70)]
    keys = [b"1012345678903", b"1012345678903", b"0", b"-5", b"1.5", b"true", b"1" * 71]
    batch = parse_records(values, now_s=NOW, keys=keys)
    assert batch.household == ["1012345678903", "1012345678903", "0"]
    assert [(r.index, r.reason, r.detail) for r in batch.rejections] == [
        (3, "bad_household", "household_id -5 is not a string or a non-negative integer"),
        (4, "bad_household", "household_id 1.5 is not a string or a non-negative integer"),
        (5, "bad_household", "household_id true is not a string or a non-negative integer"),
        # past 64 bits, JSON decoders read an integer as a float (orjson does)
        (6, "bad_household", "household_id 1e+70 is not a string or a non-negative integer")]
    assert Reading.model_validate_json(values[0]).household_id == "1012345678903"
    # from Kafka Connect: an int64 column, keyed by an int64 key, with schemas or without
    rows = [jdbc_record(1012345678903, 1357000200000, decimal(0.5))] * 2
    keyed = parse_records(rows, now_s=NOW, keys=[connect_key(1012345678903, schemas)
                                                 for schemas in (True, False)])
    assert keyed.household == ["1012345678903"] * 2 and not keyed.rejections


def debezium_row(hid: str, ts: object, ts_type: str, kwh: object, kwh_type: str | None
                 ) -> bytes:
    """A row as Debezium writes it after ``ExtractNewRecordState``, with JsonConverter's
    schemas: a PostgreSQL ``TIMESTAMP`` column in ``ts_type`` and ``kwh`` as given."""
    kwh_field = {"type": "double", "optional": True, "field": "kwh"} if kwh_type is None else \
        {"type": "struct" if "Variable" in kwh_type else "bytes", "optional": True,
         "name": kwh_type, "field": "kwh",
         **({} if "Variable" in kwh_type else {"parameters": {"scale": "3"}})}
    schema = {"type": "struct", "optional": False, "name": "meters.public.readings.Value",
              "fields": [{"type": "string", "optional": False, "field": "household_id"},
                         {"type": "int64", "optional": False, "name": ts_type, "version": 1,
                          "field": "ts"}, kwh_field]}
    return orjson.dumps({"schema": schema, "payload": {"household_id": hid, "ts": ts,
                                                        "kwh": kwh}})


def test_debezium_s_logical_types_are_read():
    """Debezium's time types (a PostgreSQL TIMESTAMP column is MicroTimestamp by default)
    and its NUMERIC without a scale (VariableScaleDecimal) are read like Connect's: a
    microsecond off the half-hour is still off it, not rounded away."""
    t = 1357000200  # 2013-01-01T00:30:00Z
    micro, nano = "io.debezium.time.MicroTimestamp", "io.debezium.time.NanoTimestamp"
    variable = "io.debezium.data.VariableScaleDecimal"
    values = [
        debezium_row("H1", t * 10**6, micro, 0.25, None),
        debezium_row("H2", t * 10**9, nano, decimal(0.219), CONNECT_DECIMAL),
        debezium_row("H3", t * 1000, "io.debezium.time.Timestamp",
                     {"scale": 4, "value": base64.b64encode((1250).to_bytes(2, "big")).decode()},
                     variable),
        debezium_row("H4", t * 10**6 + 1, micro, 0.25, None),
        debezium_row("H5", t * 10**6, micro, {"scale": "4", "value": "BOI="}, variable),
    ]
    batch = parse_records(values, now_s=NOW, keys=[f"H{i}".encode() for i in range(1, 6)])
    assert list(zip(batch.household, batch.ts.tolist(), batch.kwh.tolist(), strict=True)) == [
        ("H1", t, 0.25), ("H2", t, pytest.approx(0.219)), ("H3", t, 0.125)]
    assert [(r.index, r.reason, r.detail) for r in batch.rejections] == [
        (3, "not_half_hour", "ts '2013-01-01T00:30:00.000001Z' is not the start of a "
                             "half-hour"),
        (4, "bad_kwh", "kwh a JSON object of 2 members is not a number")]


def test_struct_keys_of_the_household_alone_are_its_id_and_wider_ones_say_why_not(
        monkeypatch: pytest.MonkeyPatch):
    """A key that is an object of the one member household_id (a table keyed by the
    household: Debezium's key, a connector's struct key, with or without schemas) is that
    household's key. A key of more columns (a readings table's primary key, household and
    time) would put one household's readings on several partitions: dead-lettered, with the
    fix; a one-member key of another household is a plain mismatch."""
    from meterwatch.stream import parse
    monkeypatch.setattr(parse, "_KEY_WRAPPERS", set())
    t = b"2013-01-01T00:30:00Z"
    value = b'{"household_id":"H1","ts":"%s","kwh":0.5}' % t
    numbered = b'{"household_id":7,"ts":"%s","kwh":0.5}' % t
    one = b'{"schema":{"type":"struct","fields":[{"type":"string","optional":false,' \
          b'"field":"household_id"}],"optional":false,"name":"readings.Key"},' \
          b'"payload":{"household_id":"H1"}}'
    wide = orjson.dumps({"schema": {"type": "struct", "fields": [
        {"type": "string", "field": "household_id"}, {"type": "string", "field": "ts"}]},
        "payload": {"household_id": "H1", "ts": t.decode()}})
    keys = [one, b'{"household_id":"H1"}', b'{"household_id":7}', wide,
            b'{"household_id":"H1","ts":"x"}', b'{"household_id":"H2"}']
    for _ in range(2):  # the second time through the wrappers learnt the first
        batch = parse_records([value, value, numbered, value, value, value], now_s=NOW,
                              keys=keys)
        assert batch.household == ["H1", "H1", "7"]
        reasons = [(r.index, r.reason) for r in batch.rejections]
        assert reasons == [(3, "key_mismatch"), (4, "key_mismatch"), (5, "key_mismatch")]
        wider = "a key of more than the household, 'household_id', 'ts'"
        assert all(wider in r.detail and "ExtractField$Key" in r.detail
                   for r in batch.rejections[:2])
        assert batch.rejections[2].detail == (
            "household_id 'H1' but the record key is '{\"household_id\":\"H2\"}'")
    assert parse._KEY_WRAPPERS


def test_records_of_another_shape_say_what_they_are():
    """A record with none of the reading's fields says which it has, and a Debezium change
    event (bare or in a Connect envelope) says how to unwrap it; a record missing one field
    says what it has instead (a field written as null is missing as before)."""
    row = {"household_id": "H1", "ts": "2013-01-01T00:30:00Z", "kwh": 0.5}
    change = {"before": None, "after": row, "source": {"connector": "postgresql"},
              "op": "c", "ts_ms": 1700000000000}
    values = [orjson.dumps(change),
              orjson.dumps({"schema": {"type": "struct", "fields": []}, "payload": change}),
              orjson.dumps({"meter": "H1", "timestamp": row["ts"], "value": 0.5}),
              orjson.dumps({"household_id": "H1", "time": row["ts"], "kwh": 0.5}),
              orjson.dumps({**row, "household_id": None}),
              orjson.dumps({f"m{i}": i for i in range(9)})]
    batch = parse_records(values, now_s=NOW, keys=[b"H1"] * len(values))
    details = [(r.reason, r.detail) for r in batch.rejections]
    debezium = ("missing_field", "household_id, ts and kwh are missing: a Debezium change "
                "event (op 'c'); unwrap it to its row with Debezium's transform "
                "io.debezium.transforms.ExtractNewRecordState")
    reading = 'a reading is {"household_id": ..., "ts": ..., "kwh": ...}'
    assert details == [
        debezium, debezium,
        ("missing_field", "household_id, ts and kwh are missing (the object has 'meter', "
         f"'timestamp', 'value'); {reading}"),
        ("missing_field", "ts is missing (the object has 'household_id', 'time', 'kwh')"),
        ("missing_field", "household_id is missing"),
        ("missing_field", "household_id, ts and kwh are missing (the object has 'm0', 'm1', "
         f"'m2', 'm3', 'm4', 'm5' and 3 more); {reading}")]


@pytest.mark.integration
async def test_a_jdbc_source_s_records_are_scored(broker, detector):
    """Through the service on a real broker: a day of four households as a JDBC source
    connector with JsonConverter's defaults writes them (values and keys in envelopes), of
    one more keyed by a JSON string (``key.converter.schemas.enable=false``), and of one
    whose id is a meter point number in an integer column (its key an int64 envelope), the
    third household's keyed as Debezium keys a table keyed by the household (a struct of
    the one member): every day scored, nothing dead-lettered."""
    settings_ = unique_settings(broker)
    data = generate(SyntheticConfig(n_households=6, n_days=HISTORY_DAYS + 1, seed=9,
                                    anomaly_rate=0.0))
    day = int(data.days[HISTORY_DAYS])
    ids: list[str | int] = [*data.household_ids[:5], 1012345678903]
    producer = AIOKafkaProducer(bootstrap_servers=settings_.bootstrap_servers, linger_ms=20)
    async with Service(settings_, detector=detector) as service:
        await service.wait_ready()
        await producer.start()
        try:
            sends = []
            for h, hid in enumerate(ids):
                key = connect_key(hid if isinstance(hid, int) else hid.encode(), h != 4)
                if h == 2:
                    key = orjson.dumps({"schema": {"type": "struct", "fields": [
                        {"type": "string", "optional": False, "field": "household_id"}],
                        "optional": False, "name": "meters.public.readings.Key"},
                        "payload": {"household_id": hid}})
                for s in range(48):
                    value = jdbc_record(hid, (day * 86400 + s * 1800) * 1000,
                                        decimal(float(data.kwh[h, HISTORY_DAYS, s])))
                    sends.append(await producer.send(settings_.input_topic, value, key=key))
            await asyncio.gather(*sends)
        finally:
            await producer.stop()
        scores = await read_topic(settings_, settings_.scores_topic, min_records=6)
        dead = await read_topic(settings_, settings_.dead_letter_topic)
        assert all(not t.done() for t in service._tasks), "a stage died"
    assert [(d["reason"], d["detail"]) for d in dead] == []
    assert sorted((s["household_id"], s["status"], s["readings"]) for s in scores) == \
        sorted((str(h), "scored", 48) for h in ids)
