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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import orjson

from stream.events import MAX_HOUSEHOLD_ID_LEN, MAX_KWH

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
    """The valid readings of a batch of records, as columns, and what was rejected."""

    household: list[str]
    ts: np.ndarray  # int64 epoch seconds, start of the half-hour
    kwh: np.ndarray  # float32
    record: np.ndarray  # int32: index of the source record in the batch
    rejections: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.household)


def parse_records(values: Sequence[bytes | None], *, now_s: float,
                  max_future_s: float = 86_400.0) -> ParsedBatch:
    """Decode and validate a batch of record values.

    Each value is one reading object or a JSON array of them. Readings of a partly bad
    array are kept; the record is still reported (with the index of each bad reading).

    >>> b = parse_records([b'{"household_id":"H1","ts":"2013-01-01T00:30:00Z","kwh":0.2}',
    ...                    b'not json'], now_s=2e9)
    >>> b.household, b.ts.tolist(), [r.reason for r in b.rejections]
    (['H1'], [1357000200], ['not_json'])
    """
    rejections: list[Rejection] = []
    flat: list[object]
    flat_record: list[int] | np.ndarray
    docs = _decode_fast(values)
    if docs is not None:  # the common case: every record is one reading object
        flat, flat_record = docs, np.arange(len(docs), dtype=np.int32)
    else:
        flat, flat_record = _decode_slow(values, rejections)
    n = len(flat)
    if n == 0:
        return ParsedBatch([], np.empty(0, np.int64), np.empty(0, np.float32),
                           np.empty(0, np.int32), rejections)

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
    out_of_range = ~np.isfinite(kwh) | (kwh < 0.0) | (kwh > MAX_KWH)
    for j in np.flatnonzero(out_of_range & (bad == 0)):
        _mark(bad, details, int(j), "bad_kwh", f"kwh {kwh[j]!r} outside [0, {MAX_KWH}]")

    # ts: ISO 8601 with an offset, on a half-hour boundary, not far in the future.
    ts, ts_reason = parse_iso_timestamps(ts_raw)
    for j in np.flatnonzero((ts_reason != 0) & (bad == 0)):
        reason = _TS_REASONS[ts_reason[j]]
        _mark(bad, details, int(j), reason, f"ts {ts_raw[j]!r:.80}")
    future = ts > now_s + max_future_s
    for j in np.flatnonzero(future & (bad == 0)):
        _mark(bad, details, int(j), "future_timestamp", f"ts {ts_raw[j]!r:.80} is in the future")

    ok = bad == 0
    if not ok.all():
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
    return ParsedBatch(
        household=[hh[j] for j in keep] if len(keep) < n else hh,  # type: ignore[misc]
        ts=ts[keep],
        kwh=kwh[keep].astype(np.float32),
        record=rec[keep],
        rejections=rejections,
    )


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
    ts = np.zeros(n, dtype=np.int64)
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
        ts[j], why[j] = _parse_slow(strs[j])
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
