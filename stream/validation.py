"""The one specification of a valid input reading (docs/ingest.md has it as a table).

Every path that accepts readings answers to the functions here: ``stream.events.Reading``
(the documented schema) calls ``check_reading``; the batch parser (``stream.parse``) checks
whole columns at once for speed and asks ``check_reading`` for the reason and detail of
every reading its fast checks do not pass, so the reasons and details are the same by
construction; ``tests/test_parse.py`` property-tests that the accepted sets agree too.

A Kafka Connect envelope (``{"schema": ..., "payload": ...}``, what its ``JsonConverter``
writes by default) is read as its payload, its ``Timestamp`` and ``Decimal`` reading fields as
the JSON types below (``open_envelope``). Rules, in the order they are checked (the first
that fails gives the reason):

1. the reading is a JSON object with at least one member, none of ``household_id``,
   ``ts``, ``kwh`` given twice (``bad_shape``);
2. ``household_id``: a string of 1..64 characters without control, invisible-format or
   surrogate code points, or a non-negative integer, read as its decimal digits (a meter
   point number from an integer column) (``missing_field`` / ``bad_household``);
3. ``kwh``: a JSON number (not a boolean, not a string), finite, in [0, 50]
   (``missing_field`` / ``bad_kwh``);
4. ``ts``: a string of the timestamp grammar below, a real calendar date and time, an
   instant in the supported range [1900-01-01T00:00Z, 2200-01-01T00:00Z)
   (``missing_field`` / ``bad_timestamp``), the start of a half-hour (``not_half_hour``);
5. (the service only, it needs the wall clock) not more than ``max_future_s`` ahead of now
   (``future_timestamp``).

Timestamp grammar (ASCII digits only, nothing before or after)::

    YYYY-MM-DD ("T" | " ") HH:MM [":" SS ["." 1-9 digits]] ("Z" | ("+"|"-") HH [":"] MM)

It is parsed here, never by ``datetime.fromisoformat``, whose leniency differs between
Python 3.10 and 3.11 (3.11 accepts week dates, basic format, lowercase ``t``/``z``, offsets
with seconds). JavaScript's ``toISOString`` (``2013-01-01T00:30:00.000Z``), Python's
``isoformat`` with an offset and RFC 3339 with uppercase ``T``/``Z`` all fit it.

Details (the ``detail`` of a dead letter) are built without recursion and bounded:
``describe`` names a value's type and at most a short, ASCII-escaped prefix of a string.
"""

from __future__ import annotations

import binascii
import json
import re
from datetime import date, timedelta
from functools import lru_cache
from itertools import repeat
from typing import NamedTuple, TypeGuard

import orjson

#: Household ids are 1..64 characters.
MAX_HOUSEHOLD_ID_LEN = 64
#: Readings above this many kWh in one half-hour (100 kW average) are impossible for a home.
MAX_KWH = 50.0
#: Supported instants: [1900-01-01T00:00:00Z, 2200-01-01T00:00:00Z), epoch seconds.
MIN_TS = -2_208_988_800
MAX_TS = 7_258_118_400
SUPPORTED_RANGE = "[1900-01-01T00:00:00Z, 2200-01-01T00:00:00Z)"
#: Characters of a string value quoted in a detail (the whole rejection is capped in
#: stream.parse).
_PREFIX = 48
#: the longest the quoted, escaped prefix of a string may be in a description
_PREFIX_ESCAPED = 80

#: Dead-letter reasons (label values of meterwatch_invalid_readings_total).
REASONS = ("not_json", "bad_shape", "missing_field", "bad_household", "bad_timestamp",
           "not_half_hour", "future_timestamp", "bad_kwh", "too_many_readings", "too_large",
           "key_mismatch", "internal_error")

FIELDS = ("household_id", "ts", "kwh")

_TS_GRAMMAR = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?"
    r"(?:Z|([+-])([0-9]{2}):?([0-9]{2}))")
_TS_MAX_LEN = 35  # the longest string the grammar can match
#: C0/C1 controls and DEL, surrogates, and the invisible format characters that reorder or
#: hide text (soft hyphen, zero-width and bidi controls, BOM, interlinear annotation).
BAD_ID_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ud800-\udfff\ufeff\ufff9-\ufffb]")
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


class Invalid(ValueError):
    """A reading (or record) that breaks a rule: ``reason`` is its dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ValidReading(NamedTuple):
    household_id: str
    ts: int  # epoch seconds, start of the half-hour
    kwh: float
    offset_s: int  # the UTC offset the timestamp was written with


def describe(v: object) -> str:
    """A short, bounded, non-recursive description of a decoded JSON value.

    >>> describe("MAC\\x00" + "x" * 100)
    "'MAC\\\\x00xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (104 characters)"
    >>> describe([[[]]]), describe(10 ** 40), describe(True)
    ('a JSON array of 1 items', 'an integer of 133 bits', 'true')
    """
    t = type(v)
    if t is str:
        s: str = v  # type: ignore[assignment]
        k = min(len(s), _PREFIX)
        while len(text := ascii(s[:k])) > _PREFIX_ESCAPED:  # \U0001f600 is 10 characters
            k -= 1
        return text if k == len(s) else f"{text}... ({len(s)} characters)"
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    if t is int:
        i: int = v  # type: ignore[assignment]
        return str(i) if -10**18 < i < 10**18 else f"an integer of {i.bit_length()} bits"
    if t is float:
        return repr(v)
    if isinstance(v, list):
        return f"a JSON array of {len(v)} items"
    if isinstance(v, dict):
        return f"a JSON object of {len(v)} members"
    return f"a {t.__name__}"


def numeric_id(v: object) -> str | None:
    """A household id written as a JSON number (a meter point number from a database's
    integer column): a non-negative integer, as its decimal digits; else None."""
    if type(v) is int and v >= 0 and v.bit_length() <= _MAX_ID_BITS:
        return str(v)
    return None


_MAX_ID_BITS = 256  # 78 digits: past MAX_HOUSEHOLD_ID_LEN, so a longer id says so


def check_household(v: object) -> str:
    if v is None:
        raise Invalid("missing_field", "household_id is missing")
    if type(v) is not str:
        digits = numeric_id(v)
        if digits is None:
            raise Invalid("bad_household", f"household_id {describe(v)} is not a string "
                          "or a non-negative integer")
        v = digits
    s: str = v
    if not s:
        raise Invalid("bad_household", "household_id is empty")
    if len(s) > MAX_HOUSEHOLD_ID_LEN:
        raise Invalid("bad_household", f"household_id {describe(s)} is longer than "
                      f"{MAX_HOUSEHOLD_ID_LEN} characters")
    if BAD_ID_CHARS.search(s):
        raise Invalid("bad_household",
                      f"household_id {describe(s)} has a control or invisible character")
    return s


def kwh_float(v: object) -> float:
    """A JSON number as a float (huge integers become infinities)."""
    try:
        return float(v)  # type: ignore[arg-type]
    except OverflowError:
        return float("inf") if v > 0 else float("-inf")  # type: ignore[operator]


def check_kwh(v: object) -> float:
    if v is None:
        raise Invalid("missing_field", "kwh is missing")
    if type(v) is not int and type(v) is not float:
        raise Invalid("bad_kwh", f"kwh {describe(v)} is not a number")
    f = kwh_float(v)
    if not 0.0 <= f <= MAX_KWH:  # NaN fails too
        raise Invalid("bad_kwh", f"kwh {f!r} outside [0, {MAX_KWH}]")
    return f


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year, no datetime limits).

    >>> days_from_civil(2013, 1, 1), days_from_civil(1, 1, 1)
    (15706, -719162)
    """
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def check_ts(v: object) -> tuple[int, int]:
    """Epoch seconds and the written UTC offset (seconds) of a timestamp string."""
    if v is None:
        raise Invalid("missing_field", "ts is missing")
    if type(v) is not str:
        if type(v) is int and 10**11 <= abs(v) < 10**14:  # 1973-5138 in milliseconds
            raise Invalid("bad_timestamp", f"ts {describe(v)} is not a string (epoch "
                          "milliseconds? give ISO 8601 with a UTC offset; from Kafka Connect, "
                          "keep schemas.enable=true or convert it with TimestampConverter)")
        raise Invalid("bad_timestamp", f"ts {describe(v)} is not a string")
    s: str = v
    m = _TS_GRAMMAR.fullmatch(s) if len(s) <= _TS_MAX_LEN else None
    if m is None:
        raise Invalid("bad_timestamp", f"ts {describe(s)} is not "
                      "YYYY-MM-DDTHH:MM[:SS[.fff]] with Z or a +HH:MM offset")
    y, mo, d, hh, mi = (int(g) for g in m.group(1, 2, 3, 4, 5))
    ss = int(m.group(6) or 0)
    frac = m.group(7)
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    ok = 1 <= mo <= 12 and hh <= 23 and mi <= 59 and ss <= 59
    ok = ok and 1 <= d <= _MONTH_DAYS[mo - 1] + (mo == 2 and leap)
    off = 0
    if m.group(8):
        oh, om = int(m.group(9)), int(m.group(10))
        ok = ok and oh <= 23 and om <= 59
        off = (oh * 3600 + om * 60) * (-1 if m.group(8) == "-" else 1)
    if not ok:
        raise Invalid("bad_timestamp", f"ts {describe(s)} is not a valid date and time")
    t = days_from_civil(y, mo, d) * 86400 + hh * 3600 + mi * 60 + ss - off
    if not MIN_TS <= t < MAX_TS:
        raise Invalid("bad_timestamp",
                      f"ts {describe(s)} is outside the supported range {SUPPORTED_RANGE}")
    if t % 1800 or (frac and int(frac)):
        raise Invalid("not_half_hour", f"ts {describe(s)} is not the start of a half-hour")
    return t, off


def check_reading(obj: object, *, now_s: float | None = None,
                  max_future_s: float = 86_400.0) -> ValidReading:
    """The reading in ``obj`` (a decoded JSON value), or ``Invalid`` with the first rule it
    breaks. ``now_s`` (epoch seconds) enables the future check."""
    if isinstance(obj, DuplicateKeys):
        raise Invalid("bad_shape", f"duplicate key {obj.duplicate!r} in an object")
    if type(obj) is not dict:
        raise Invalid("bad_shape", f"{describe(obj)} is not a JSON object")
    if not obj:
        raise Invalid("bad_shape", "empty JSON object")
    get = obj.get
    if "household_id" not in obj and "ts" not in obj and "kwh" not in obj:
        raise Invalid("missing_field", _not_a_reading(obj))
    try:
        hid = check_household(get("household_id"))
        kwh = check_kwh(get("kwh"))
        text = get("ts")
        ts, off = check_ts(text)
    except Invalid as exc:
        absent = [f for f in FIELDS if f not in obj]
        if exc.reason != "missing_field" or not absent:
            raise
        raise Invalid("missing_field", f"{exc.detail} (the object has {_members(obj)})"
                      ) from None
    if now_s is not None and ts > now_s + max_future_s:
        raise Invalid("future_timestamp", f"ts {describe(text)} is in the future")
    return ValidReading(hid, ts, kwh, off)


def _members(obj: dict) -> str:
    """The first members' names of an object, for a detail."""
    names = ", ".join(describe(k) for k in list(obj)[:_SHOWN_MEMBERS])
    more = len(obj) - _SHOWN_MEMBERS
    return names + (f" and {more} more" if more > 0 else "")


_SHOWN_MEMBERS = 6


def _not_a_reading(obj: dict) -> str:
    """Why an object with none of the reading's fields is not a reading, and the way out
    where its shape says what it is (a change-data-capture event)."""
    if "op" in obj and ("after" in obj or "before" in obj):
        return (f"household_id, ts and kwh are missing: a Debezium change event (op "
                f"{describe(obj['op'])}); unwrap it to its row with Debezium's transform "
                "io.debezium.transforms.ExtractNewRecordState")
    return (f"household_id, ts and kwh are missing (the object has {_members(obj)}); "
            "a reading is {\"household_id\": ..., \"ts\": ..., \"kwh\": ...}")


# JSON decoding ----------------------------------------------------------------------------
class DuplicateKeys(dict):
    """A decoded object that gave one of the reading's fields twice (a rejected reading)."""

    duplicate = ""


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen and k in FIELDS:
            d = DuplicateKeys(pairs)
            d.duplicate = k
            return d
        seen.add(k)
    return dict(pairs)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_int(s: str) -> object:
    return int(s) if len(s) <= 300 else float(s)  # no int-from-str digit limit


QUOTED_FIELDS = tuple(f'"{f}"'.encode() for f in FIELDS)


def may_repeat_fields(value: bytes, doc: object) -> bool:
    """False when ``value`` certainly gives no reading field twice in one object: no escape
    (a key could be spelled with one) and each quoted field name occurs no more often than
    there are reading objects holding it (orjson keeps the last of duplicate keys), and, in
    Kafka Connect envelopes, schema fields naming it (``"field": "ts"``)."""
    if b"\\" in value:
        return True
    if type(doc) is dict:
        objs: list[dict] = [doc]
    elif type(doc) is list:
        objs = [d for d in doc if type(d) is dict]
    else:
        return False
    named: list[str] = []
    if b'"payload"' in value and any(map(is_envelope, objs)):
        objs, named = _envelope_holders(objs)
    for name, quoted in zip(FIELDS, QUOTED_FIELDS, strict=True):
        n = value.count(quoted)
        if n and n > sum(map(dict.__contains__, objs, repeat(name))) + named.count(name):
            return True
    return False


# Kafka Connect's JSON envelope -------------------------------------------------------------
#: Kafka Connect's JsonConverter with ``schemas.enable=true`` (its default) writes each value
#: as ``{"schema": ..., "payload": ...}``; a struct's logical types are named in the schema.
CONNECT_TIMESTAMP = "org.apache.kafka.connect.data.Timestamp"  # int64 epoch milliseconds
CONNECT_DECIMAL = "org.apache.kafka.connect.data.Decimal"  # base64 two's complement, "scale"
#: Debezium's NUMERIC without a declared scale: {"scale": int, "value": base64 as above}
DEBEZIUM_VARIABLE_DECIMAL = "io.debezium.data.VariableScaleDecimal"
#: The epoch timestamps a schema may give ``ts``, as their units per second: Connect's, and
#: Debezium's (its default for a database ``TIMESTAMP`` column is microseconds).
EPOCH_TIMESTAMPS = {CONNECT_TIMESTAMP: 1_000, "io.debezium.time.Timestamp": 1_000,
                    "io.debezium.time.MicroTimestamp": 1_000_000,
                    "io.debezium.time.NanoTimestamp": 1_000_000_000}
_MAX_DECIMAL_BYTES = 32


def is_envelope(doc: object) -> TypeGuard[dict]:
    """Whether a decoded value is a Kafka Connect envelope: an object of exactly ``schema``
    (an object) and ``payload``."""
    return type(doc) is dict and len(doc) == 2 and "payload" in doc \
        and type(doc.get("schema")) is dict


def _struct_fields(schema: object) -> list[dict]:
    fields = schema.get("fields") if type(schema) is dict else None
    return [f for f in fields if type(f) is dict] if type(fields) is list else []


def _envelope_holders(objs: list[dict]) -> tuple[list[dict], list[str]]:
    """The reading objects of ``objs`` (envelopes opened, unconverted) and the field names
    their envelopes' schemas give (``may_repeat_fields``)."""
    out: list[dict] = []
    named: list[str] = []
    for d in objs:
        if not is_envelope(d):
            out.append(d)
            continue
        payload, schema = d["payload"], d["schema"]
        items = payload if type(payload) is list else [payload]
        out.extend(p for p in items if type(p) is dict)
        if schema.get("type") == "array":
            schema = schema.get("items")
        named.extend(str(f.get("field")) for f in _struct_fields(schema))
    return out, named


def open_envelope(doc: dict) -> object:
    """The payload of a Kafka Connect envelope (``is_envelope``), with the reading fields its
    schema types as Connect logical types read as the reading's JSON types: a ``Timestamp``
    ``ts`` (epoch milliseconds; Debezium's milli-, micro- and nanosecond ones too,
    ``EPOCH_TIMESTAMPS``) as an ISO 8601 string in UTC, a ``Decimal`` ``kwh`` (base64; or
    Debezium's ``VariableScaleDecimal``) as a number. A value that does not convert is left
    as it is (and fails its rule). A struct, or an array of structs (an ``array`` schema of
    them).

    >>> open_envelope({"schema": {"type": "struct", "fields": [
    ...     {"field": "ts", "type": "int64", "name": CONNECT_TIMESTAMP},
    ...     {"field": "kwh", "type": "bytes", "name": CONNECT_DECIMAL,
    ...      "parameters": {"scale": "3"}}]},
    ...     "payload": {"household_id": "H1", "ts": 1357000200000, "kwh": "APo="}})
    {'household_id': 'H1', 'ts': '2013-01-01T00:30:00.000Z', 'kwh': 0.25}
    """
    payload, schema = doc["payload"], doc["schema"]
    if type(payload) is list:
        items = schema.get("items") if schema.get("type") == "array" else None
        return [_logical(p, items) for p in payload]
    return _logical(payload, schema)


def _logical(value: object, schema: object) -> object:
    if type(value) is not dict:  # not a struct (a DuplicateKeys one is rejected as it is)
        return value
    out: dict | None = None
    for f in _struct_fields(schema):
        name = f.get("field")
        if name not in ("ts", "kwh") or name not in value:
            continue
        v, logical = value[name], f.get("name")
        new: object = None
        if name == "ts" and type(v) is int and logical in EPOCH_TIMESTAMPS:
            new = _iso_from_epoch(v, EPOCH_TIMESTAMPS[logical])
        elif name == "kwh" and logical == CONNECT_DECIMAL and type(v) is str:
            parameters = f.get("parameters")
            new = _from_decimal(v, parameters.get("scale", "0") if type(parameters) is dict
                                else "0")
        elif name == "kwh" and logical == DEBEZIUM_VARIABLE_DECIMAL and type(v) is dict \
                and type(v.get("scale")) is int and type(v.get("value")) is str:
            new = _from_decimal(v["value"], v["scale"])
        if new is not None:
            out = out if out is not None else dict(value)
            out[name] = new
    return value if out is None else out


def _iso_from_epoch(v: int, per_second: int) -> str | None:
    """An epoch timestamp in units of 1/``per_second`` s (a power of ten) as
    ``YYYY-MM-DDTHH:MM:SS.fffZ``, with as many fraction digits as the unit has, for years
    1-9999 (an instant past the supported range then fails the timestamp rule saying so);
    None past those years.

    >>> _iso_from_epoch(1357000200000, 1000), _iso_from_epoch(1357000200000001, 10**6)
    ('2013-01-01T00:30:00.000Z', '2013-01-01T00:30:00.000001Z')
    """
    secs, frac = divmod(v, per_second)
    day, r = divmod(secs, 86_400)
    if not _FIRST_DAY <= day <= _LAST_DAY:
        return None
    h, r = divmod(r, 3_600)
    m, s = divmod(r, 60)
    return f"{_date_text(day)}T{h:02d}:{m:02d}:{s:02d}.{frac:0{len(str(per_second)) - 1}d}Z"


_FIRST_DAY, _LAST_DAY = (d.toordinal() - date(1970, 1, 1).toordinal() for d in (date.min, date.max))


@lru_cache(maxsize=1024)
def _date_text(day: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=day)).isoformat()


def _from_decimal(text: str, scale: object) -> float | None:
    """A Connect ``Decimal`` (base64 of the unscaled value, big-endian two's complement) of
    ``scale`` decimal places (its schema's parameter, a string; Debezium's, an int) as a
    float, or None."""
    scale = str(scale)
    if not (_BASE64.fullmatch(text) and scale.isascii() and scale.isdigit()) \
            or int(scale) > 18:
        return None
    raw = binascii.a2b_base64(text)
    if not raw or len(raw) > _MAX_DECIMAL_BYTES:
        return None
    return int.from_bytes(raw, "big", signed=True) / 10 ** int(scale)


_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def strict_loads(value: bytes) -> object:
    """Python's own decoder, for what orjson cannot represent (numbers beyond a double,
    which then fail the kWh rule rather than "not JSON") and to see duplicate keys."""
    return json.loads(value.decode("utf-8"), object_pairs_hook=_pairs,
                      parse_constant=_no_constant, parse_int=_parse_int)


#: Confluent Schema Registry's wire format: a zero byte, the schema id (4 bytes, big-endian),
#: then the payload (JSON for the JSON Schema serializer). No JSON text starts with a zero
#: byte, so a record that does is read as framed.
REGISTRY_HEADER = 5


def is_framed(value: bytes) -> bool:
    """Whether a record value is in the Schema Registry wire format (``REGISTRY_HEADER``)."""
    return value[:1] == b"\x00" and len(value) >= REGISTRY_HEADER


def unframe(value: bytes) -> tuple[bytes, int | None]:
    """A record value without Schema Registry framing, and the schema id (None: unframed).

    >>> unframe(bytes([0, 0, 0, 1, 2]) + b'{"kwh":1}')
    (b'{"kwh":1}', 258)
    >>> unframe(b'{"kwh":1}')
    (b'{"kwh":1}', None)
    """
    if not is_framed(value):
        return value, None
    return value[REGISTRY_HEADER:], int.from_bytes(value[1:REGISTRY_HEADER], "big")


def framed_detail(schema_id: int, detail: str) -> str:
    """The ``not_json`` detail of a Schema Registry-framed record whose payload is not JSON."""
    return (f"Schema Registry framing (schema id {schema_id}) around a payload that is not "
            f"JSON (Avro or Protobuf? meterwatch reads JSON): {detail[:120]}")


def loads(value: bytes, framing: bool = True) -> object:
    """Decode one record value (JSON, framed by a Schema Registry serializer or not; with
    ``framing`` False, a value known to be a payload), or ``Invalid("not_json")``."""
    schema_id = None
    if framing:
        value, schema_id = unframe(value)
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            doc = strict_loads(value)
        except (ValueError, RecursionError):
            detail = str(exc)[:200]
            raise Invalid("not_json", detail if schema_id is None
                          else framed_detail(schema_id, detail)) from None
    else:
        if may_repeat_fields(value, doc):
            try:
                doc = strict_loads(value)
            except RecursionError:  # deeper than Python's decoder goes: cannot tell
                raise Invalid("bad_shape", "nested too deeply to check for duplicate keys") \
                    from None
            except ValueError:  # numbers orjson read as floats, or surrogate escapes: its
                pass  # result
    return open_envelope(doc) if is_envelope(doc) else doc
