"""Batch-wise parsing and validation of input records.

A fetch of Kafka records becomes a few flat numpy columns (household id, epoch seconds, kWh,
source record) plus a list of rejected records with their reasons. There are no per-reading
model objects: orjson decodes each record once, field extraction is a list comprehension,
and timestamps in the canonical ISO 8601 forms are parsed as one ``uint32`` matrix of code
points (see ``parse_iso_timestamps``); only unusual forms fall back to ``datetime``.

The rules are those of ``stream.events.Reading``; ``tests/test_parse.py`` checks they agree.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import orjson
from numpy.lib.stride_tricks import sliding_window_view

from meterwatch.stream.events import MAX_HOUSEHOLD_ID_LEN, MAX_KWH

#: Readings per record (a JSON array) above which the record is rejected outright.
MAX_READINGS_PER_RECORD = 10_000
#: Records larger than this are rejected before decoding.
MAX_RECORD_BYTES = 4 * 1024 * 1024

_NUMBER_TYPES = {int, float}
_FIELDS = operator.itemgetter("household_id", "ts", "kwh")


@dataclass
class Rejection:
    """One record (or readings of it) that failed validation."""

    index: int  # position of the record in the batch
    reason: str  # a label value of meterwatch_invalid_readings_total
    detail: str


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
                  max_future_s: float = 86_400.0) -> ParsedBatch:
    """Decode and validate a batch of record values.

    Each value is one reading object or a JSON array of them. Readings of a partly bad
    array are kept; the record is still reported (with the index of each bad reading).

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
    compact = _parse_compact(values, now_s, max_future_s)
    if compact is None:
        return _parse_general(values, now_s, max_future_s)
    fast, rest = compact
    if len(rest) == 0:
        return fast
    general = _parse_general([values[i] for i in rest], now_s, max_future_s)
    for r in general.rejections:
        r.index = int(rest[r.index])
    general.record = rest[general.record].astype(np.int32)
    return _merge(fast, general)


def _merge(a: ParsedBatch, b: ParsedBatch) -> ParsedBatch:
    """Readings of both, in record order (stable), with their rejections."""
    record = np.concatenate([a.record, b.record])
    order = np.argsort(record, kind="stable")
    ids = a.ids + b.ids
    id_index = np.concatenate([a.id_index, b.id_index + len(a.ids)]).astype(np.int32)
    rejections = sorted(a.rejections + b.rejections, key=lambda x: x.index)
    return ParsedBatch(ids, id_index[order], np.concatenate([a.ts, b.ts])[order],
                       np.concatenate([a.kwh, b.kwh])[order], record[order], rejections)


def _parse_general(values: Sequence[bytes | None], now_s: float,
                   max_future_s: float) -> ParsedBatch:
    """Any records: orjson decodes each, then the fields are checked as columns."""
    rejections: list[Rejection] = []
    flat: list[object]
    flat_record: list[int] | np.ndarray
    docs = _decode_fast(values)
    if docs is not None:  # every record is one reading object
        flat, flat_record = docs, np.arange(len(docs), dtype=np.int32)
    else:
        flat, flat_record = _decode_slow(values, rejections)
    n = len(flat)
    if n == 0:
        return ParsedBatch([], np.empty(0, np.int32), np.empty(0, np.int64),
                           np.empty(0, np.float32), np.empty(0, np.int32), rejections)

    # Columns. Non-dict elements of an array yield None in every field.
    if docs is None:
        flat = [d if type(d) is dict else {} for d in flat]
    try:  # every field present (the common case): one C-level pass, then transpose
        hh, ts_raw, kwh_raw = map(list, zip(*map(_FIELDS, flat), strict=True))
    except KeyError:
        hh = [d.get("household_id") for d in flat]  # type: ignore[attr-defined]
        ts_raw = [d.get("ts") for d in flat]  # type: ignore[attr-defined]
        kwh_raw = [d.get("kwh") for d in flat]  # type: ignore[attr-defined]
    rec = np.asarray(flat_record, dtype=np.int32)

    bad = np.zeros(n, dtype=np.uint8)  # 0 = ok, else index into _REASONS
    details: dict[int, str] = {}

    # household_id: a non-empty string of at most MAX_HOUSEHOLD_ID_LEN characters.
    hh_ok = set(map(type, hh)) == {str} and 0 < min(map(len, hh)) \
        and max(map(len, hh)) <= MAX_HOUSEHOLD_ID_LEN  # type: ignore[arg-type]
    for j, h in ([] if hh_ok else enumerate(hh)):
        if type(h) is not str or not 0 < len(h) <= MAX_HOUSEHOLD_ID_LEN:
            if not flat[j]:
                _mark(bad, details, j, "bad_shape", "array element is not an object or empty")
            elif h is None:
                _mark(bad, details, j, "missing_field", "household_id is missing")
            else:
                _mark(bad, details, j, "bad_household", f"household_id {h!r:.80}")

    # kwh: a finite number in [0, MAX_KWH] (booleans are not numbers here).
    if set(map(type, kwh_raw)) <= _NUMBER_TYPES:
        kwh = np.array(kwh_raw, dtype=np.float64)
        kwh_raw = []
    else:
        kwh = np.zeros(n, dtype=np.float64)
    for j, k in enumerate(kwh_raw):
        if type(k) in _NUMBER_TYPES:
            kwh[j] = k
        elif not bad[j]:
            if k is None:
                _mark(bad, details, j, "missing_field", "kwh is missing")
            else:
                _mark(bad, details, j, "bad_kwh", f"kwh {k!r:.80} is not a number")
    ts, ts_reason = parse_iso_timestamps(ts_raw)
    return _finish(hh, np.arange(n, dtype=np.int32), ts, ts_reason, ts_raw.__getitem__, kwh,
                   rec, bad, details, rejections, now_s, max_future_s)


def _finish(ids: list[str], id_index: np.ndarray, ts: np.ndarray, ts_reason: np.ndarray,
            ts_text: Callable[[int], object], kwh: np.ndarray, rec: np.ndarray,
            bad: np.ndarray, details: dict[int, str], rejections: list[Rejection],
            now_s: float, max_future_s: float) -> ParsedBatch:
    """The checks shared by both decoders (kWh range, timestamp form and time), then the
    rejections of each record and the columns of the good readings."""
    out_of_range = ~np.isfinite(kwh) | (kwh < 0.0) | (kwh > MAX_KWH)
    for j in np.flatnonzero(out_of_range & (bad == 0)):
        _mark(bad, details, int(j), "bad_kwh", f"kwh {kwh[j]!r} outside [0, {MAX_KWH}]")

    # ts: ISO 8601 with an offset, on a half-hour boundary, not far in the future.
    for j in np.flatnonzero((ts_reason != 0) & (bad == 0)):
        reason = _TS_REASONS[ts_reason[j]]
        _mark(bad, details, int(j), reason, f"ts {ts_text(int(j))!r:.80}")
    future = ts > now_s + max_future_s
    for j in np.flatnonzero(future & (bad == 0)):
        _mark(bad, details, int(j), "future_timestamp",
              f"ts {ts_text(int(j))!r:.80} is in the future")

    ok = bad == 0
    if ok.all():
        return ParsedBatch(ids, id_index, ts, kwh.astype(np.float32), rec, rejections)
    per_record: dict[int, list[int]] = {}
    counts = np.bincount(rec)
    first_of = np.searchsorted(rec, np.arange(len(counts)))  # rec is sorted
    for j in np.flatnonzero(~ok):
        per_record.setdefault(int(rec[j]), []).append(int(j))
    for r, idx in per_record.items():
        first = idx[0]
        reason = _REASONS[bad[first]]
        if counts[r] > 1:  # an array: say which readings were bad
            start = int(first_of[r])
            detail = "; ".join(f"reading[{j - start}]: {details[j]}" for j in idx[:10])
            if len(idx) > 10:
                detail += f"; ... {len(idx) - 10} more"
        else:
            detail = details[first]
        rejections.append(Rejection(r, reason, detail))
    rejections.sort(key=lambda x: x.index)
    keep = np.flatnonzero(ok)
    used, kept_index = np.unique(id_index[keep], return_inverse=True)  # drop rejected ids
    return ParsedBatch([ids[i] for i in used.tolist()], kept_index.astype(np.int32).ravel(),
                       ts[keep], kwh[keep].astype(np.float32), rec[keep], rejections)


# Compact records, read from the bytes ------------------------------------------------------
#: Longest plain decimal read by the compact path (digits and point); longer goes to orjson.
_MAX_NUMBER_CHARS = 16
_QUOTE, _COLON, _COMMA, _SPACE, _DOT, _BACKSLASH = (ord(c) for c in '":, .\\')
_KEYS = ((0, b"household_id"), (4, b"ts"), (8, b"kwh"))  # (opening quote, key)
_POW10 = 10.0 ** np.arange(_MAX_NUMBER_CHARS + 1)  # exact in float64 up to 1e22
_POW10_INT = 10 ** np.arange(19, dtype=np.int64)
_PAD = 64  # >= the widest window read (MAX_HOUSEHOLD_ID_LEN)


def _parse_compact(values: Sequence[bytes | None], now_s: float,
                   max_future_s: float) -> tuple[ParsedBatch, np.ndarray] | None:
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

    ts, ts_reason = _parse_codes(_gather(buf, ts_start, ts_len, 25), ts_len,
                                 np.zeros(m, dtype=np.uint8), ts_text)
    compact = np.zeros(n, dtype=bool)
    compact[idx] = True
    rest = np.flatnonzero(~compact).astype(np.int32)
    batch = _finish(ids, id_index, ts, ts_reason, ts_text, kwh, idx.astype(np.int32),
                    np.zeros(m, dtype=np.uint8), {}, [], now_s, max_future_s)
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


_REASONS = ("ok", "bad_shape", "missing_field", "bad_household", "bad_kwh", "bad_timestamp",
            "not_half_hour", "future_timestamp")
_REASON_CODE = {r: i for i, r in enumerate(_REASONS)}
_TS_REASONS = ("ok", "missing_field", "bad_timestamp", "not_half_hour")


def _decode_fast(values: Sequence[bytes | None]) -> list[object] | None:
    """All records decoded when each is a small JSON object, else None."""
    try:
        if max(map(len, values)) > MAX_RECORD_BYTES:  # type: ignore[arg-type]
            return None
        docs = [orjson.loads(v) for v in values]  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    return docs if set(map(type, docs)) == {dict} else None


def _decode_slow(values: Sequence[bytes | None],
                 rejections: list[Rejection]) -> tuple[list[object], list[int]]:
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
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            rejections.append(Rejection(i, "not_json", str(exc)[:200]))
            continue
        if type(doc) is dict:
            flat.append(doc)
            flat_record.append(i)
        elif type(doc) is list:
            if len(doc) > MAX_READINGS_PER_RECORD:
                rejections.append(Rejection(
                    i, "too_many_readings", f"{len(doc)} > {MAX_READINGS_PER_RECORD}"))
                continue
            if not doc:
                rejections.append(Rejection(i, "bad_shape", "empty array"))
                continue
            flat.extend(doc)
            flat_record.extend([i] * len(doc))
        else:
            rejections.append(Rejection(i, "bad_shape", f"JSON {type(doc).__name__}, "
                                        "expected an object or an array of objects"))
    return flat, flat_record


def _mark(bad: np.ndarray, details: dict[int, str], j: int, reason: str, detail: str) -> None:
    if not bad[j]:
        bad[j] = _REASON_CODE[reason]
        details[j] = detail


# ISO 8601 fast path -----------------------------------------------------------------------
# "YYYY-MM-DDTHH:MM:SSZ" (20 chars) and "YYYY-MM-DDTHH:MM:SS+HH:MM" (25 chars).
_DIGITS_20 = np.array([0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
_SEPARATORS = {4: ord("-"), 7: ord("-"), 13: ord(":"), 16: ord(":")}
_CUM_DAYS = np.array([0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334], dtype=np.int64)
_MONTH_DAYS = np.array([31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


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
    """Epoch seconds of ISO 8601 timestamps with an offset, and a reason code per item.

    Reason codes index ``_TS_REASONS``: 0 ok, 1 missing, 2 unparseable or no offset,
    3 not the start of a half-hour.

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
    codes, lengths = _code_points(strs)  # (n, 25) code points, 0-padded
    return _parse_codes(codes, lengths, why, strs.__getitem__)


def _parse_codes(codes: np.ndarray, lengths: np.ndarray, why: np.ndarray,
                 text: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """``parse_iso_timestamps`` on (n, 25) code points; ``text(j)`` gives item j as a
    string for the general parser; ``why`` holds the reasons found so far."""
    n = len(codes)
    ts = np.zeros(n, dtype=np.int64)
    z_form = (lengths == 20) & (codes[:, 19] == ord("Z"))
    off_form = (lengths == 25) & ((codes[:, 19] == ord("+")) | (codes[:, 19] == ord("-"))) \
        & (codes[:, 22] == ord(":"))
    fast = (z_form | off_form) & (why == 0)
    fast &= (codes[:, 10] == ord("T")) | (codes[:, 10] == ord(" "))
    for pos, ch in _SEPARATORS.items():
        fast &= codes[:, pos] == ch
    digits = codes[:, _DIGITS_20].astype(np.int64) - ord("0")  # (n, 14)
    fast &= ((digits >= 0) & (digits <= 9)).all(axis=1)
    off_digits = codes[:, [20, 21, 23, 24]].astype(np.int64) - ord("0")
    fast &= ~off_form | ((off_digits >= 0) & (off_digits <= 9)).all(axis=1)

    y = digits[:, 0] * 1000 + digits[:, 1] * 100 + digits[:, 2] * 10 + digits[:, 3]
    mo = digits[:, 4] * 10 + digits[:, 5]
    d = digits[:, 6] * 10 + digits[:, 7]
    hh = digits[:, 8] * 10 + digits[:, 9]
    mi = digits[:, 10] * 10 + digits[:, 11]
    ss = digits[:, 12] * 10 + digits[:, 13]
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    valid = (mo >= 1) & (mo <= 12) & (y >= 1)
    mo_c = np.clip(mo, 1, 12)
    month_len = _MONTH_DAYS[mo_c - 1] - ((mo_c == 2) & ~leap)
    valid &= (d >= 1) & (d <= month_len) & (hh <= 23) & (mi <= 59) & (ss <= 59)
    sign = np.where(codes[:, 19] == ord("-"), -1, 1)
    off_h = off_digits[:, 0] * 10 + off_digits[:, 1]
    off_m = off_digits[:, 2] * 10 + off_digits[:, 3]
    offset = np.where(off_form, sign * (off_h * 3600 + off_m * 60), 0)
    valid &= ~off_form | ((off_h <= 23) & (off_m <= 59))
    days = days_from_civil(np.where(valid, y, 1970), np.where(valid, mo_c, 1),
                           np.where(valid, d, 1))
    ts[:] = np.where(fast & valid, days * 86400 + hh * 3600 + mi * 60 + ss - offset, 0)
    why[fast & ~valid] = 2

    for j in np.flatnonzero(~fast & (why == 0)):  # unusual forms: the slow, general path
        ts[j], why[j] = _parse_slow(text(int(j)))
    why[(why == 0) & (ts % 1800 != 0)] = 3
    return ts, why


def _code_points(strs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 25) code points of the strings (0-padded) and their lengths."""
    n = len(strs)
    lens = set(map(len, strs))
    if len(lens) == 1 and (width := lens.pop()) in (20, 25):
        joined = "".join(strs)
        if joined.isascii():  # one byte per character: a (n, width) matrix for free
            mat = np.frombuffer(joined.encode("ascii"), dtype=np.uint8).reshape(n, width)
            codes = np.zeros((n, 25), dtype=np.uint32)
            codes[:, :width] = mat
            return codes, np.full(n, width)
    arr = np.asarray(strs, dtype="U25")
    return arr.view(np.uint32).reshape(n, 25), np.char.str_len(arr)


def _parse_slow(s: str) -> tuple[int, int]:
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return 0, 2
    if dt.tzinfo is None or dt.utcoffset() is None:
        return 0, 2
    t = dt.timestamp()
    if not math.isfinite(t):
        return 0, 2
    if t != math.floor(t):
        return int(t), 3
    return int(t), 0
