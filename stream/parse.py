"""Batch-wise parsing and validation of input records.

A fetch of Kafka records becomes a few flat numpy columns (household id, epoch seconds, kWh,
source record) plus a list of rejected records with their reasons. There are no per-reading
model objects: orjson decodes each record once, field extraction is a list comprehension,
and timestamps in the canonical ISO 8601 forms are parsed as one ``uint32`` matrix of code
points (see ``parse_iso_timestamps``); only unusual forms fall back to ``datetime``.

The rules are ``stream.validation``'s, which ``stream.events.Reading`` calls too: the column
checks here only decide quickly that a reading passes; every reading they do not pass is
handed to ``stream.validation.check_reading``, whose reason and detail are reported, so
there is one specification. ``tests/test_parse.py`` property-tests that all paths agree.

No exception raised while parsing one record escapes ``parse_records``: if a batch fails
for a reason nobody foresaw, its records are parsed one by one, and a record that still
fails is rejected with reason ``internal_error`` and the exception's class.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count, repeat

import numpy as np
import orjson
from numpy.lib.stride_tricks import sliding_window_view

from meterwatch.stream.validation import (
    BAD_ID_CHARS,
    MAX_HOUSEHOLD_ID_LEN,
    MAX_KWH,
    MAX_TS,
    MIN_TS,
    REGISTRY_HEADER,
    Invalid,
    check_reading,
    check_ts,
    describe,
    framed_detail,
    is_envelope,
    is_framed,
    kwh_float,
    loads,
    may_repeat_fields,
    numeric_id,
    open_envelope,
    unframe,
)

log = logging.getLogger(__name__)

#: Readings per record (a JSON array) above which the record is rejected outright.
MAX_READINGS_PER_RECORD = 10_000
#: Records larger than this are rejected before decoding.
MAX_RECORD_BYTES = 4 * 1024 * 1024
#: Longest detail of one rejection (an array lists its first 10 bad readings).
MAX_DETAIL_CHARS = 2000

_FIELDS = operator.itemgetter("household_id", "ts", "kwh")


@dataclass
class Rejection:
    """One record (or readings of it) that failed validation."""

    index: int  # position of the record in the batch
    reason: str  # the record's dead-letter reason: that of its first bad reading
    detail: str
    #: rejected readings of the record by reason (meterwatch_invalid_readings_total); a
    #: record that could not be read as readings counts as one
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.detail) > MAX_DETAIL_CHARS:
            self.detail = self.detail[:MAX_DETAIL_CHARS - 4] + " ..."
        if not self.counts:
            self.counts = {self.reason: 1}


@dataclass
class ParsedBatch:
    """The valid readings of a batch of records, as columns, and what was rejected.

    Household ids are stored once each: ``ids`` holds the distinct ids and ``id_index``
    says which one each reading belongs to.
    """

    ids: list[str]
    id_index: np.ndarray  # int32, per reading: index into ids
    ts: np.ndarray  # int64 epoch seconds, start of the half-hour
    kwh: np.ndarray  # float32
    record: np.ndarray  # int32: index of the source record in the batch
    rejections: list[Rejection] = field(default_factory=list)

    @classmethod
    def of(cls, household: list[str], ts: np.ndarray, kwh: np.ndarray, record: np.ndarray,
           rejections: list[Rejection] | None = None) -> ParsedBatch:
        """A batch from one household id per reading."""
        return cls(household, np.arange(len(household), dtype=np.int32), ts, kwh, record,
                   rejections or [])

    @property
    def household(self) -> list[str]:
        """The household id of each reading."""
        ids = self.ids
        return [ids[i] for i in self.id_index.tolist()]

    def __len__(self) -> int:
        return len(self.ts)


def parse_records(values: Sequence[bytes | None], *, now_s: float,
                  max_future_s: float = 86_400.0,
                  keys: Sequence[bytes | None] | None = None) -> ParsedBatch:
    """Decode and validate a batch of record values (and, given ``keys``, their keys).

    Each value is one reading object or a JSON array of them. Readings of a partly bad
    array are kept; the record is still reported (with the index of each bad reading).
    With ``keys`` (the service always passes them), a reading whose household id is not
    its record's key, UTF-8 encoded, is rejected with ``key_mismatch``: a household's
    readings all travel under its own key, so it is never split across partitions.

    Records in the compact form that JSON encoders write for one reading
    (``{"household_id":"…","ts":"…","kwh":…}``, optionally with a space after ``:`` and
    ``,``; ASCII, no escapes, plain decimal kWh) are read by ``_parse_compact`` straight
    from the bytes, with numpy, for the whole batch at once. The others go through orjson
    (``_parse_general``). Both apply the same rules; ``tests/test_parse.py`` checks they
    give the same result for the same records.

    >>> b = parse_records([b'{"household_id":"H1","ts":"2013-01-01T00:30:00Z","kwh":0.2}',
    ...                    b'not json'], now_s=2e9)
    >>> b.household, b.ts.tolist(), [r.reason for r in b.rejections]
    (['H1'], [1357000200], ['not_json'])
    """
    try:
        return _parse(values, keys, now_s, max_future_s)
    except Exception as exc:  # a bug, or an input nobody foresaw: contain it to its record
        log.warning("parsing a batch of %d records failed (%s: %.200s); parsing them one by "
                    "one", len(values), type(exc).__name__, exc)
        return _parse_each(values, keys, now_s, max_future_s)


def _parse(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
           now_s: float, max_future_s: float, framing: bool = True) -> ParsedBatch:
    # A producer frames every record or none: a framed first record skips the compact path,
    # which reads no framed record (the general path parses their payloads, compact or not).
    first = values[0] if values else None
    compact = None if framing and first is not None and is_framed(first) else \
        _parse_compact(values, keys, now_s, max_future_s)
    if compact is None:
        return _parse_general(values, keys, now_s, max_future_s, framing)
    fast, rest = compact
    if len(rest) == 0:
        return fast
    return _merge(fast, _parse_subset(values, keys, rest, lambda v, k: _parse_general(
        v, k, now_s, max_future_s, framing)))


def _parse_subset(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                  idx: np.ndarray, parse: Callable[[list[bytes | None],
                                                    list[bytes | None] | None], ParsedBatch],
                  ) -> ParsedBatch:
    """``parse`` of the records at ``idx`` (ascending), indexed as records of the batch."""
    idx_list = idx.tolist()
    b = parse([values[i] for i in idx_list],
              None if keys is None else [keys[i] for i in idx_list])
    for r in b.rejections:
        r.index = idx_list[r.index]
    b.record = idx[b.record].astype(np.int32)
    return b


def _parse_framed(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                  now_s: float, max_future_s: float) -> ParsedBatch:
    """Records framed by a Schema Registry serializer (``stream.validation.unframe``): their
    payloads, parsed like unframed records (the compact path included; framed once only)."""
    b = _parse([v[REGISTRY_HEADER:] for v in values],  # type: ignore[index]
               keys, now_s, max_future_s, framing=False)
    for r in b.rejections:
        if r.reason == "not_json":
            _, schema_id = unframe(values[r.index])  # type: ignore[arg-type]
            assert schema_id is not None
            r.detail = framed_detail(schema_id, r.detail)
    return b


def _parse_each(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                now_s: float, max_future_s: float) -> ParsedBatch:
    """Record by record; a record whose parsing raises is rejected as ``internal_error``."""
    ids: list[str] = []
    id_pos: dict[str, int] = {}
    cols: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    rejections: list[Rejection] = []
    failed = 0
    for i, value in enumerate(values):
        try:
            b = _parse([value], None if keys is None else [keys[i]], now_s, max_future_s)
        except Exception as exc:
            if not failed:  # one traceback per batch, however many records fail
                log.exception("record %d of a batch could not be parsed", i)
            failed += 1
            rejections.append(Rejection(i, "internal_error",
                                        f"{type(exc).__name__} while validating the record"))
            continue
        for r in b.rejections:
            r.index = i
        rejections.extend(b.rejections)
        if len(b):
            remap = np.array([id_pos.setdefault(h, len(id_pos)) for h in b.ids], dtype=np.int32)
            cols.append((remap[b.id_index], b.ts, b.kwh, np.full(len(b), i, dtype=np.int32)))
    if failed:
        log.warning("%d of %d records rejected as internal_error", failed, len(values))
    ids = list(id_pos)
    if not cols:
        return _empty(rejections)
    id_index, ts, kwh, record = (np.concatenate(c) for c in zip(*cols, strict=True))
    return ParsedBatch(ids, id_index.astype(np.int32), ts.astype(np.int64),
                       kwh.astype(np.float32), record, rejections)


def _empty(rejections: list[Rejection]) -> ParsedBatch:
    return ParsedBatch([], np.empty(0, np.int32), np.empty(0, np.int64),
                       np.empty(0, np.float32), np.empty(0, np.int32), rejections)


def _merge(a: ParsedBatch, b: ParsedBatch) -> ParsedBatch:
    """Readings of both, in record order (stable), with their rejections."""
    record = np.concatenate([a.record, b.record])
    order = np.argsort(record, kind="stable")
    ids = a.ids + b.ids
    id_index = np.concatenate([a.id_index, b.id_index + len(a.ids)]).astype(np.int32)
    rejections = sorted(a.rejections + b.rejections, key=lambda x: x.index)
    return ParsedBatch(ids, id_index[order], np.concatenate([a.ts, b.ts])[order],
                       np.concatenate([a.kwh, b.kwh])[order], record[order], rejections)


def _parse_general(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                   now_s: float, max_future_s: float, framing: bool = True) -> ParsedBatch:
    """Any records: orjson decodes each, then the fields are checked as columns. With
    ``framing``, records framed by a Schema Registry serializer are read as their payloads."""
    if framing:
        framed = np.array([v is not None and is_framed(v) for v in values], dtype=bool)
        if framed.any():
            payloads = _parse_subset(values, keys, np.flatnonzero(framed), lambda v, k:
                                     _parse_framed(v, k, now_s, max_future_s))
            if framed.all():
                return payloads
            return _merge(payloads, _parse_subset(
                values, keys, np.flatnonzero(~framed), lambda v, k: _parse_general(
                    v, k, now_s, max_future_s, framing=False)))
    rejections: list[Rejection] = []
    flat: list[object]
    flat_record: list[int] | np.ndarray
    docs = _decode_fast(values)
    if docs is not None:  # every record is one reading object
        flat, flat_record = docs, np.arange(len(docs), dtype=np.int32)
    else:
        flat, flat_record = _decode_slow(values, rejections, framing)
    n = len(flat)
    if n == 0:
        return _empty(rejections)

    # Columns. Elements that are not plain objects yield None in every field (and are
    # suspects: check_reading says why).
    suspect = np.zeros(n, dtype=bool)
    decoded = flat
    if docs is None:
        for j, d in enumerate(flat):
            if type(d) is not dict or not d:
                suspect[j] = True
    objs: list[dict[str, object]] = [
        d if type(d) is dict else {} for d in flat]
    hh: list[object]
    ts_raw: list[object]
    kwh_raw: list[object]
    try:  # every field present (the common case): one C-level pass, then transpose
        hh, ts_raw, kwh_raw = map(list, zip(*map(_FIELDS, objs), strict=True))
    except KeyError:
        hh = [d.get("household_id") for d in objs]
        ts_raw = [d.get("ts") for d in objs]
        kwh_raw = [d.get("kwh") for d in objs]
    rec = np.asarray(flat_record, dtype=np.int32)

    # household_id: 1..MAX_HOUSEHOLD_ID_LEN characters, no control/invisible character.
    strs = [h if type(h) is str else numeric_id(h) or "" for h in hh]
    lens = np.fromiter(map(len, strs), dtype=np.int64, count=n)
    suspect |= (lens == 0) | (lens > MAX_HOUSEHOLD_ID_LEN)  # "" also for a non-string
    joined = "".join(strs)
    if not (joined.isascii() and joined.isprintable()):
        suspect |= np.fromiter((BAD_ID_CHARS.search(h) is not None for h in strs),
                               dtype=bool, count=n)

    # kwh: a number (not a boolean); range checked in _finish.
    if set(map(type, kwh_raw)) <= _NUMBER_TYPES:
        try:
            kwh = np.array(kwh_raw, dtype=np.float64)
        except OverflowError:  # an integer beyond a double
            kwh = np.array([kwh_float(k) for k in kwh_raw], dtype=np.float64)
    else:
        kwh = np.array([kwh_float(k) if type(k) in _NUMBER_TYPES else np.nan
                        for k in kwh_raw], dtype=np.float64)
    ts, ts_reason = parse_iso_timestamps(ts_raw)
    # each reading's id as the position of its first occurrence (ids stored once each)
    first: dict[str, int] = {}
    id_index = np.fromiter(map(first.setdefault, strs, count()), dtype=np.int32, count=n)
    return _finish(strs, id_index, ts, ts_reason, kwh, rec, suspect, decoded.__getitem__,
                   keys, rejections, now_s, max_future_s)


def _finish(ids: list[str], id_index: np.ndarray, ts: np.ndarray, ts_reason: np.ndarray,
            kwh: np.ndarray, rec: np.ndarray, suspect: np.ndarray,
            reading: Callable[[int], object], keys: Sequence[bytes | None] | None,
            rejections: list[Rejection], now_s: float, max_future_s: float,
            distinct_ids: bool = False) -> ParsedBatch:
    """The checks shared by both decoders (kWh range, timestamp, future, key), then the
    rejections of each record and the columns of the good readings.

    ``suspect`` marks readings that failed a check of the caller; ``reading(j)`` is
    reading j as a decoded JSON value, for ``check_reading`` to say why it is invalid.
    """
    bad = suspect | ~((kwh >= 0.0) & (kwh <= MAX_KWH)) | (ts_reason != 0) \
        | (ts > now_s + max_future_s)
    reasons: dict[int, tuple[str, str]] = {}
    for j in np.flatnonzero(bad).tolist():
        try:
            check_reading(reading(j), now_s=now_s, max_future_s=max_future_s)
        except Invalid as exc:
            reasons[j] = (exc.reason, exc.detail)
        else:  # cannot happen while the column checks are those of check_reading
            reasons[j] = ("internal_error", "validators disagree about this reading")
    if keys is not None:
        _check_keys(ids, id_index, rec, bad, keys, reasons, distinct_ids)

    if not bad.any():
        return ParsedBatch(ids, id_index, ts, kwh.astype(np.float32), rec, rejections)
    per_record: dict[int, list[int]] = {}
    counts = np.bincount(rec)
    first_of = np.searchsorted(rec, np.arange(len(counts)))  # rec is sorted
    for j in np.flatnonzero(bad).tolist():
        per_record.setdefault(int(rec[j]), []).append(j)
    for r, idx in per_record.items():
        reason = reasons[idx[0]][0]
        if counts[r] > 1:  # an array: say which readings were bad
            start = int(first_of[r])
            detail = "; ".join(f"reading[{j - start}]: {reasons[j][1]}" for j in idx[:10])
            if len(idx) > 10:
                detail += f"; ... {len(idx) - 10} more"
        else:
            detail = reasons[idx[0]][1]
        rejections.append(Rejection(r, reason, detail,
                                    dict(Counter(reasons[j][0] for j in idx))))
    rejections.sort(key=lambda x: x.index)
    keep = np.flatnonzero(~bad)
    used, kept_index = np.unique(id_index[keep], return_inverse=True)  # drop rejected ids
    return ParsedBatch([ids[i] for i in used.tolist()], kept_index.astype(np.int32).ravel(),
                       ts[keep], kwh[keep].astype(np.float32), rec[keep], rejections)


def _check_keys(ids: list[str], id_index: np.ndarray, rec: np.ndarray, bad: np.ndarray,
                keys: Sequence[bytes | None], reasons: dict[int, tuple[str, str]],
                distinct: bool) -> None:
    """Mark the otherwise valid readings whose household id is not their record's key.

    The ids are numbered by their UTF-8 bytes (``distinct``: ``ids`` has no repeats, their
    positions are the numbers) and each record key gets the number of the id it spells
    (-1: none), one dict lookup per record.
    """
    ok = np.flatnonzero(~bad)
    if not len(ok):
        return
    number: dict[bytes, int] = {}
    if distinct:
        number = {h.encode("utf-8", "surrogatepass"): i for i, h in enumerate(ids)}
        reading_number = id_index[ok]
    else:
        used = np.unique(id_index[ok])
        canon = np.fromiter((number.setdefault(ids[i].encode("utf-8", "surrogatepass"), n)
                             for n, i in enumerate(used.tolist())), dtype=np.int64,
                            count=len(used))
        reading_number = canon[np.searchsorted(used, id_index[ok])]
    plain = list(number.items()) if _KEY_WRAPPERS else []
    for head, tail in tuple(_KEY_WRAPPERS):  # keys written as before: one lookup
        for text, n in plain:
            with contextlib.suppress(UnicodeDecodeError, orjson.JSONEncodeError):
                number[head + orjson.dumps(text.decode()) + tail] = n
    key_number = np.fromiter(map(number.get, keys, repeat(-1)), dtype=np.int64,  # type: ignore[arg-type]
                             count=len(keys))
    wrong = ok[key_number[rec[ok]] != reading_number]
    if len(wrong):  # keys that hold the id as JSON (a serializer's or a converter's)
        seen: dict[bytes, object] = {}
        wrong = wrong[[_key_text(keys[int(rec[j])], seen) != ids[int(id_index[j])]
                       for j in wrong.tolist()]]
    for j in wrong.tolist():
        bad[j] = True
        key = keys[int(rec[j])]
        reasons[j] = ("key_mismatch", f"household_id {describe(ids[int(id_index[j])])} but "
                      f"the record key is {describe_key(key)}" + _key_fix(key))


#: How to key records from Kafka Connect (a JDBC source, Debezium).
_CONNECT_KEY = "from Kafka Connect, with the ValueToKey and ExtractField$Key transforms"
#: What to do about a null key (a producer or a connector that does not key its records).
_NULL_KEY_FIX = f" (key each record by its household id; {_CONNECT_KEY})"


def _key_fix(key: bytes | None) -> str:
    """The fix a mismatched key's detail ends with, where the key says what went wrong."""
    if key is None:
        return _NULL_KEY_FIX
    doc = _key_json(key)
    if type(doc) is dict and len(doc) > 1 and "household_id" in doc:  # a table's key of
        # several columns (Debezium's key is the primary key)
        members = ", ".join(describe(k) for k in list(doc)[:6])
        return (f" (a key of more than the household, {members}: one household's readings "
                "would go to several partitions; key each record by its household id "
                f"alone; {_CONNECT_KEY})")
    return ""

#: How the keys seen hold their id as JSON: (bytes before, bytes after) the id's JSON string;
#: a few (a schema id or a converter changes rarely), so that later batches match such keys
#: as cheaply as plain ones (``_check_keys``); speed only.
_KEY_WRAPPERS: set[tuple[bytes, bytes]] = set()
_MAX_KEY_WRAPPERS = 4
_MAX_WRAPPER_BYTES = 256


def _key_text(key: bytes | None, seen: dict[bytes, object]) -> object:
    """The id a key holds as JSON, else None (``seen`` caches it by key): the JSON string of a
    key in Schema Registry's wire format (a JSON Schema key serializer's), a JSON string (Kafka
    Connect's JsonConverter without schemas), or the string payload of a Connect envelope
    (with schemas, its default); in the last two, a non-negative integer too, as its digits
    (``validation.numeric_id``; a bare JSON number is its digits already)."""
    if key is None:
        return None
    if key not in seen:
        text = _decode_key(key)
        if type(text) is str:
            seen[key] = text
            if len(_KEY_WRAPPERS) < _MAX_KEY_WRAPPERS:
                _remember_wrapper(key, text)
        else:  # an id written as a number (an int64 key's envelope), or None
            seen[key] = numeric_id(text)
    return seen[key]


def _decode_key(key: bytes) -> object:
    """What a key holds as JSON (see ``_key_text``); an object of the one member
    ``household_id`` (a table keyed by the household: Debezium's key, a connector's struct)
    holds that member."""
    doc = _key_json(key)
    if type(doc) is dict and len(doc) == 1 and "household_id" in doc:
        return doc["household_id"]
    return doc


def _key_json(key: bytes) -> object:
    """A key decoded as JSON (past a Schema Registry header; a Connect envelope's payload),
    else None."""
    body = key[REGISTRY_HEADER:] if is_framed(key) else key
    if body[:1] not in (b'"', b"{"):
        return None
    try:
        text = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return text["payload"] if is_envelope(text) else text


_PROBE = "\x00meterwatch-probe"


def _remember_wrapper(key: bytes, text: str) -> None:
    """Remember the bytes around ``text``'s JSON string in ``key`` when any id written in
    their place is what such a key holds (a probe id is put there and decoded: the string
    found may be another member's, or the id's own written with escapes)."""
    with contextlib.suppress(orjson.JSONEncodeError):
        enc = orjson.dumps(text)
        at = key.rfind(enc)
        if at < 0:
            return
        head, tail = key[:at], key[at + len(enc):]
        if len(head) + len(tail) <= _MAX_WRAPPER_BYTES and \
                _decode_key(head + orjson.dumps(_PROBE) + tail) == _PROBE:
            _KEY_WRAPPERS.add((head, tail))


def describe_key(key: bytes | None) -> str:
    """A record key for a detail: null, its text (escaped, bounded), or its size."""
    if key is None:
        return "null"
    try:
        return describe(key.decode("utf-8"))
    except UnicodeDecodeError:
        return f"{len(key)} bytes, not UTF-8"


# Compact records, read from the bytes ------------------------------------------------------
#: Longest plain decimal read by the compact path (digits and point); longer goes to orjson.
_MAX_NUMBER_CHARS = 16
_QUOTE, _COLON, _COMMA, _SPACE, _DOT, _BACKSLASH = (ord(c) for c in '":, .\\')
_KEYS = ((0, b"household_id"), (4, b"ts"), (8, b"kwh"))  # (opening quote, key)
_POW10 = 10.0 ** np.arange(_MAX_NUMBER_CHARS + 1)  # exact in float64 up to 1e22
_POW10_INT = 10 ** np.arange(19, dtype=np.int64)
_PAD = 64  # >= the widest window read (MAX_HOUSEHOLD_ID_LEN)


def _parse_compact(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                   now_s: float, max_future_s: float) -> tuple[ParsedBatch, np.ndarray] | None:
    """The records in compact one-reading form, parsed from the joined bytes; and the
    indices of the others (``rest``). None when no record qualifies.

    A record qualifies when it is ``{"household_id":"I","ts":"T","kwh":N}`` byte for byte,
    except that one space may follow each ``:`` and ``,``: it has exactly 10 quotes, only
    printable ASCII and no backslash (so the strings have no escapes), I has 1 to
    MAX_HOUSEHOLD_ID_LEN characters, T 20 to 25, and N is a plain decimal (digits with at
    most one inner point, no sign or exponent, no leading zero, at most 15 digits). Such
    an N is read exactly: a mantissa below 2**53 divided by an exact power of ten is the
    correctly rounded double, the same value orjson gives.
    """
    n = len(values)
    try:
        lens = np.fromiter(map(len, values), dtype=np.int64, count=n)  # type: ignore[arg-type]
        joined = b"".join(values)  # type: ignore[arg-type]
    except TypeError:  # a record without a value
        return None
    if n == 0 or lens.max() > MAX_RECORD_BYTES:
        return None
    # zero padding, so that fixed-width windows starting inside the data stay inside
    buf = np.frombuffer(joined + bytes(_PAD), dtype=np.uint8)
    ends = np.cumsum(lens)
    starts = ends - lens
    data = buf[:-_PAD]
    q_all = np.flatnonzero(data == _QUOTE)
    odd_bytes = ((data - np.uint8(0x20)) > 0x5E) | (data == _BACKSLASH)  # not ' '..'~', or '\\'
    q: np.ndarray | None = None
    if len(q_all) == 10 * n and not odd_bytes.any():  # usually: 10 quotes in each record
        q = q_all.reshape(n, 10)
        cand = (q[:, 0] >= starts) & (q[:, 9] < ends) & (lens >= 40)
        if not cand.all():
            q = None
    if q is None:  # count per record
        q_rec = np.searchsorted(ends, q_all, side="right")
        cand = (np.bincount(q_rec, minlength=n) == 10) & (lens >= 40)
        odd = np.flatnonzero(odd_bytes)
        if len(odd):
            cand[np.searchsorted(ends, odd, side="right")] = False
        if not cand.any():
            return None
        q = q_all[cand[q_rec]].reshape(-1, 10)
    idx = np.flatnonzero(cand)
    s, e = starts[idx], ends[idx]

    # The template: '{' then the three keys, each with ':' (+' ') before its value and
    # ',' (+' ') before the next key, the two strings, the number, '}'.
    ok = (q[:, 0] == s + 1) & (buf[s] == ord("{")) & (buf[e - 1] == ord("}"))
    for qi, key in _KEYS:
        ok &= q[:, qi + 1] - q[:, qi] - 1 == len(key)
        ok &= _bytes_at(buf, q[:, qi] + 1, len(key), key)
    for after_key, value_quote in ((1, 2), (5, 6)):  # "key": "value"
        ok &= _separator(buf, q[:, after_key], q[:, value_quote], _COLON)
    for after_value, key_quote in ((3, 4), (7, 8)):  # "value", "key"
        ok &= _separator(buf, q[:, after_value], q[:, key_quote], _COMMA)
    # the number: after "kwh", ':' and an optional space, up to the closing brace
    num_start = q[:, 9] + 2 + (buf[np.minimum(q[:, 9] + 2, len(buf) - 1)] == _SPACE)
    ok &= buf[q[:, 9] + 1] == _COLON
    num_len = e - 1 - num_start
    id_len = q[:, 3] - q[:, 2] - 1
    ts_len = q[:, 7] - q[:, 6] - 1
    ok &= (id_len >= 1) & (id_len <= MAX_HOUSEHOLD_ID_LEN) & (ts_len >= 20) & (ts_len <= 25)
    ok &= (num_len >= 1) & (num_len <= _MAX_NUMBER_CHARS)
    kwh, num_ok = _decimals(buf, np.where(ok, num_start, 0), np.where(ok, num_len, 1))
    ok &= num_ok
    if not ok.all():
        idx, q, kwh = idx[ok], q[ok], kwh[ok]
        id_len, ts_len = id_len[ok], ts_len[ok]
    m = len(idx)
    if m == 0:
        return None

    ids, id_index = _distinct_strings(buf, q[:, 2] + 1, id_len)
    ts_start = q[:, 6] + 1

    def ts_text(j: int) -> str:
        return _text(buf, ts_start[j], ts_len[j])

    def reading(j: int) -> dict[str, object]:
        return {"household_id": ids[int(id_index[j])], "ts": ts_text(j), "kwh": float(kwh[j])}

    ts, ts_reason = _parse_codes(_gather(buf, ts_start, ts_len, 25), ts_len,
                                 np.zeros(m, dtype=np.uint8), ts_text)
    compact = np.zeros(n, dtype=bool)
    compact[idx] = True
    rest = np.flatnonzero(~compact).astype(np.int32)
    # ids are printable ASCII (checked above) of 1..MAX_HOUSEHOLD_ID_LEN characters
    batch = _finish(ids, id_index, ts, ts_reason, kwh, idx.astype(np.int32),
                    np.zeros(m, dtype=bool), reading, keys, [], now_s, max_future_s,
                    distinct_ids=True)
    return batch, rest


def _windows(buf: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """(m, width) copy of the bytes from each start (the buffer is padded past the end)."""
    return sliding_window_view(buf, width)[start]


def _gather(buf: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """(m, width) bytes from each start, zero past each length."""
    out = _windows(buf, start, width)
    if (length < width).any():
        out[np.arange(width) >= length[:, None]] = 0
    return out


def _bytes_at(buf: np.ndarray, start: np.ndarray, width: int, expected: bytes) -> np.ndarray:
    return (_windows(buf, start, width) == np.frombuffer(expected, dtype=np.uint8)).all(axis=1)


def _separator(buf: np.ndarray, before: np.ndarray, after: np.ndarray, sep: int) -> np.ndarray:
    """Between two quotes: ``sep`` alone, or ``sep`` and one space."""
    gap = after - before - 1
    return (buf[before + 1] == sep) & ((gap == 1) | ((gap == 2) & (buf[before + 2] == _SPACE)))


def _decimals(buf: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """Values of plain decimals (``0``, ``12``, ``0.219``, ``3.5``) and which ones were."""
    width = int(length.max())
    mat = _gather(buf, start, length, width)
    inside = np.arange(width) < length[:, None]
    digit = (mat >= ord("0")) & (mat <= ord("9"))  # padding is 0: never a digit
    dot = mat == _DOT
    n_dot = dot.sum(axis=1)
    ok = ((digit | dot) == inside).all(axis=1) & (n_dot <= 1)
    ok &= ~dot[:, 0] & ~dot[np.arange(len(length)), length - 1]  # no ".5" or "5."
    if width > 1:
        ok &= ~((mat[:, 0] == ord("0")) & (length > 1) & ~dot[:, 1])  # no leading zero
    n_digits = digit.sum(axis=1)
    ok &= n_digits <= 15  # the mantissa stays below 2**53
    # each digit's power of ten is the number of digits to its right
    right = n_digits[:, None] - np.cumsum(digit, axis=1)
    weights = np.where(digit, _POW10_INT[np.minimum(right, 18)], 0)
    mantissa = (np.where(digit, mat - ord("0"), 0).astype(np.int64) * weights).sum(axis=1)
    after_dot = np.cumsum(dot, axis=1) > 0
    frac = (digit & after_dot).sum(axis=1)
    return mantissa.astype(np.float64) / _POW10[np.minimum(frac, _MAX_NUMBER_CHARS)], ok


def _distinct_strings(buf: np.ndarray, start: np.ndarray,
                      length: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct ASCII strings at (start, length), and each one's index among them."""
    width = int(length.max())
    mat = np.ascontiguousarray(_gather(buf, start, length, width))
    keys = mat.view(f"S{width}").ravel()
    uniq, inverse = np.unique(keys, return_inverse=True)
    return [k.decode("ascii") for k in uniq.tolist()], inverse.astype(np.int32).ravel()


def _text(buf: np.ndarray, start: int, length: int) -> str:
    return buf[int(start):int(start) + int(length)].tobytes().decode("ascii")


_NUMBER_TYPES = {int, float}
_TS_CODES = {"missing_field": 1, "bad_timestamp": 2, "not_half_hour": 3}


def _decode_fast(values: Sequence[bytes | None]) -> list[object] | None:
    """All records decoded when each is a small JSON object that certainly gives no field
    twice, else None."""
    try:
        if max(map(len, values)) > MAX_RECORD_BYTES:  # type: ignore[arg-type]
            return None
        docs = [orjson.loads(v) for v in values]  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if set(map(type, docs)) != {dict}:
        return None
    # duplicate fields (orjson keeps the last): the check of one record, over the batch
    joined = b"".join(values)  # type: ignore[arg-type]
    if may_repeat_fields(joined, docs):
        return None
    if b'"payload"' in joined and any(map(is_envelope, docs)):  # Kafka Connect's envelopes
        docs = [open_envelope(d) if is_envelope(d) else d for d in docs]
        if set(map(type, docs)) != {dict}:
            return None
    return docs


def _decode_slow(values: Sequence[bytes | None], rejections: list[Rejection],
                 framing: bool) -> tuple[list[object], list[int]]:
    """Record by record: arrays are flattened, bad records rejected."""
    flat: list[object] = []
    flat_record: list[int] = []
    for i, value in enumerate(values):
        if value is None:
            rejections.append(Rejection(i, "not_json", "record has no value"))
            continue
        if len(value) > MAX_RECORD_BYTES:
            rejections.append(Rejection(i, "too_large", f"{len(value)} bytes"))
            continue
        try:
            doc = loads(value, framing)
        except Invalid as exc:
            rejections.append(Rejection(i, exc.reason, exc.detail))
            continue
        if isinstance(doc, dict):
            flat.append(doc)
            flat_record.append(i)
        elif type(doc) is list:
            if len(doc) > MAX_READINGS_PER_RECORD:
                rejections.append(Rejection(
                    i, "too_many_readings", f"{len(doc)} > {MAX_READINGS_PER_RECORD}",
                    {"too_many_readings": len(doc)}))
                continue
            if not doc:
                rejections.append(Rejection(i, "bad_shape", "empty array"))
                continue
            flat.extend(doc)
            flat_record.extend([i] * len(doc))
        else:
            rejections.append(Rejection(i, "bad_shape", f"{describe(doc)}: expected an "
                                        "object or an array of objects"))
    return flat, flat_record


# ISO 8601 fast path -----------------------------------------------------------------------
# The three commonest forms of the grammar (stream.validation), read as a matrix of code
# points: "YYYY-MM-DDTHH:MM:SSZ" (20 characters), "YYYY-MM-DDTHH:MM:SS.fffZ" (24,
# JavaScript's toISOString) and "YYYY-MM-DDTHH:MM:SS+HH:MM" (25). Every position is checked;
# anything else goes to ``stream.validation.check_ts``.
_DIGITS_19 = np.array([0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
_SEPARATORS = {4: ord("-"), 7: ord("-"), 13: ord(":"), 16: ord(":")}
_CUM_DAYS = np.array([0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334], dtype=np.int64)
_MONTH_DAYS = np.array([31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)
_FAST_LENGTHS = (20, 24, 25)


def days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (vectorised).

    >>> int(days_from_civil(np.array([2013]), np.array([1]), np.array([1]))[0])
    15706
    """
    y = y.astype(np.int64)
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    yy = y - 1
    days_before_year = 365 * (yy - 1969) + (yy // 4 - 1969 // 4) - (yy // 100 - 1969 // 100) \
        + (yy // 400 - 1969 // 400)
    return days_before_year + _CUM_DAYS[m - 1] + ((m > 2) & leap) + d - 1


def parse_iso_timestamps(raw: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """Epoch seconds of timestamps (``stream.validation`` grammar), and a code per item.

    Reason codes: 0 ok, 1 missing, 2 ``bad_timestamp`` (not the grammar, not a real date,
    outside the supported range), 3 not the start of a half-hour.

    >>> ts, why = parse_iso_timestamps(["2013-01-01T00:30:00Z", "2013-01-01T01:00:00+01:00",
    ...                                 "2013-01-01T00:10:00Z", "yesterday", None])
    >>> ts[:2].tolist(), why.tolist()
    ([1357000200, 1356998400], [0, 0, 3, 2, 1])
    """
    n = len(raw)
    why = np.zeros(n, dtype=np.uint8)
    if set(map(type, raw)) == {str}:
        strs: list[str] = raw  # type: ignore[assignment]
    else:
        strs = [s if type(s) is str else "" for s in raw]
        for j, s in enumerate(raw):
            if s is None:
                why[j] = 1
            elif type(s) is not str:
                why[j] = 2
    codes, lengths = _code_points(strs)
    return _parse_codes(codes, lengths, why, strs.__getitem__)


def _parse_codes(codes: np.ndarray, lengths: np.ndarray, why: np.ndarray,
                 text: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """``parse_iso_timestamps`` on (n, 25) code points (0 past each length) and the true
    lengths; ``text(j)`` gives item j for ``check_ts``; ``why`` holds the reasons so far."""
    n = len(codes)
    ts = np.zeros(n, dtype=np.int64)
    c19 = codes[:, 19]
    z20 = (lengths == 20) & (c19 == ord("Z"))
    z24 = off25 = frac = np.zeros(n, dtype=bool)
    if (lengths == 24).any():
        tail = codes[:, 20:23].astype(np.int64) - ord("0")
        z24 = (lengths == 24) & (c19 == ord(".")) & (codes[:, 23] == ord("Z")) \
            & ((tail >= 0) & (tail <= 9)).all(axis=1)
        frac = z24 & (tail != 0).any(axis=1)
    off_digits = codes[:, [20, 21, 23, 24]].astype(np.int64) - ord("0")
    if (lengths == 25).any():
        off25 = (lengths == 25) & ((c19 == ord("+")) | (c19 == ord("-"))) \
            & (codes[:, 22] == ord(":")) & ((off_digits >= 0) & (off_digits <= 9)).all(axis=1)
    fast = (z20 | z24 | off25) & (why == 0)
    fast &= (codes[:, 10] == ord("T")) | (codes[:, 10] == ord(" "))
    for pos, ch in _SEPARATORS.items():
        fast &= codes[:, pos] == ch
    digits = codes[:, _DIGITS_19].astype(np.int64) - ord("0")  # (n, 14)
    fast &= ((digits >= 0) & (digits <= 9)).all(axis=1)

    y = digits[:, 0] * 1000 + digits[:, 1] * 100 + digits[:, 2] * 10 + digits[:, 3]
    mo = digits[:, 4] * 10 + digits[:, 5]
    d = digits[:, 6] * 10 + digits[:, 7]
    hh = digits[:, 8] * 10 + digits[:, 9]
    mi = digits[:, 10] * 10 + digits[:, 11]
    ss = digits[:, 12] * 10 + digits[:, 13]
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    valid = (mo >= 1) & (mo <= 12)
    mo_c = np.clip(mo, 1, 12)
    month_len = _MONTH_DAYS[mo_c - 1] - ((mo_c == 2) & ~leap)
    valid &= (d >= 1) & (d <= month_len) & (hh <= 23) & (mi <= 59) & (ss <= 59)
    off_h = off_digits[:, 0] * 10 + off_digits[:, 1]
    off_m = off_digits[:, 2] * 10 + off_digits[:, 3]
    sign = np.where(c19 == ord("-"), -1, 1)
    offset = np.where(off25, sign * (off_h * 3600 + off_m * 60), 0)
    valid &= ~off25 | ((off_h <= 23) & (off_m <= 59))
    days = days_from_civil(np.where(valid, y, 1970), np.where(valid, mo_c, 1),
                           np.where(valid, d, 1))
    t = days * 86400 + hh * 3600 + mi * 60 + ss - offset
    valid &= (t >= MIN_TS) & (t < MAX_TS)
    ts[:] = np.where(fast & valid, t, 0)
    why[fast & ~valid] = 2
    why[fast & valid & ((ts % 1800 != 0) | frac)] = 3

    for j in np.flatnonzero(~fast & (why == 0)).tolist():  # other forms: the scalar parser
        try:
            ts[j] = check_ts(text(j))[0]
        except Invalid as exc:
            why[j] = _TS_CODES[exc.reason]
    return ts, why


def _code_points(strs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 25) code points of the strings of a fast-path length (0-padded; other strings
    are all 0) and the length of every string."""
    n = len(strs)
    lengths = np.fromiter(map(len, strs), dtype=np.int64, count=n)
    codes = np.zeros((n, 25), dtype=np.uint32)
    if n == 0:
        return codes, lengths
    width = int(lengths[0])
    if width in _FAST_LENGTHS and (lengths == width).all():
        joined = "".join(strs)
        if joined.isascii():  # one byte per character: a (n, width) matrix for free
            mat = np.frombuffer(joined.encode("ascii"), dtype=np.uint8).reshape(n, width)
            codes[:, :width] = mat
            return codes, lengths
    sel = np.flatnonzero(np.isin(lengths, _FAST_LENGTHS))
    if len(sel):  # at most 25 characters each: "U25" holds them whole (trailing NULs
        # become 0, which no checked position accepts)
        arr = np.array([strs[j] for j in sel.tolist()], dtype="U25")
        codes[sel] = arr.view(np.uint32).reshape(len(sel), 25)
    return codes, lengths
