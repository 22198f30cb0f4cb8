"""Readers for the Low Carbon London smart-meter layouts and their side tables.

Every reader takes a path (plain or ``.gz``; readings also from a ``.tar.gz`` of CSVs) and
returns numpy arrays; nothing is copied anywhere. Quirks handled: padded values
(`` 0.219 ``), CRLF line endings (also a ``\\r`` inside a quoted field), ``Null`` readings,
duplicate rows (the last one wins; a ``Null`` never replaces a reading; half-hours read
twice with different readings are counted in a warning, and refused when they are more
than a tenth of those read: two series under one household id; in every layout), missing
half-hours (NaN).
Input that cannot be used raises ``LoadError`` naming the file and line.

Readings layouts (all give ``Readings(household_ids, day, kwh)``, one row per
household-day, ``kwh`` float32 (M, 48) with NaN where a half-hour is missing):

* London Datastore: ``LCLid,stdorToU,DateTime,KWH/hh (per half hour) `` (trailing space),
  ``DateTime`` like ``2012-10-12 00:30:00.0000000``, missing values written ``Null``;
* Kaggle half-hourly: ``LCLid,tstp,energy(kWh/hh)``, one CSV or a ``.tar.gz`` of many;
* Kaggle hhblock: ``LCLid,day,hh_0,...,hh_47``;
* a utility's own, with the stream's field names: ``household_id,ts,kwh`` (one row per
  half-hour; ``ts`` ISO 8601, with an offset or ``Z``, or without one: wall-clock time in
  the ``timezone`` given), or ``household_id,date,hh_0,...,hh_47``. Columns may come in any
  order, with others beside them; ``household``/``timestamp``/``interval_start`` and
  ``day`` are taken too. Quoted fields are read as CSV; a header separated by semicolons
  (or tabs) means semicolons (tabs) throughout, and decimal commas (``0,219``) are taken.

Readings are kWh per half-hour; a readings column named for watt-hours (``wh``,
``energy_wh``) is divided by 1000. Readings whose median is no household's in kWh
(``check_units``: watt-hours under a kWh name, or in ``hh_*`` columns) are refused.

Days are local calendar days in ``timezone`` (IANA name, default UTC), cut as the service
cuts them (``meterwatch run --timezone``): a timestamp with an offset is converted, and the
second pass through the hour the clocks go back is averaged with the first (without
offsets, the second reading of a household's day at that time is the second pass). A
timestamp that is not on the hour or half-hour is refused: the readings must be
half-hourly; so is a time without offset that the zone skips (the file is not in its
wall-clock time).

Side tables: ``read_household_info`` (``LCLid,stdorToU,Acorn,Acorn_grouped,file``, or
``household_id,tariff,group``), ``read_daily_weather`` (``time,temperatureMax,
temperatureMin,...``, or ``date,temp_max,temp_min`` in °C) and ``read_bank_holidays``
(``Bank holidays,Type``, or ``date``).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import itertools
import logging
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)

N_SLOTS = 48
_EPOCH = dt.date(1970, 1, 1)


class LoadError(ValueError):
    """An input file that cannot be used; the message names the file and line."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, why: str) -> None:
        where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {why}")
        self.path, self.line, self.why = os.fspath(path), line, why


# ---------------------------------------------------------------------------- helpers


def _open_text(path: str | os.PathLike[str]) -> IO[str]:
    """Open a plain or gzipped text file for ``csv`` (universal newlines off)."""
    p = Path(path)
    if not p.exists():
        raise LoadError(p, None, "no such file")
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8-sig", newline="")
    return open(p, encoding="utf-8-sig", newline="")


def _clean(row: list[str]) -> list[str]:
    return [f.strip().strip("\r\n").strip() for f in row]


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "")


def _header_index(header: list[str], path: str | os.PathLike[str],
                  *columns: tuple[str, ...] | str) -> list[int]:
    """Column positions (case-insensitive, spaces ignored); each column is a name or a
    tuple of the names it goes by (the first is the one an error names)."""
    norm = [_norm(h) for h in header]
    out = []
    for names in columns:
        names = (names,) if isinstance(names, str) else names
        at = next((norm.index(_norm(n)) for n in names if _norm(n) in norm), None)
        if at is None:
            also = "".join(f" or {n!r}" for n in names[1:])
            raise LoadError(path, 1, f"missing column {names[0]!r}{also}; header is {header!r}")
        out.append(at)
    return out


#: Column names of the readings and side tables: the Low Carbon London name first, then
#: those a utility's own export goes by (the stream's own record fields among them).
HOUSEHOLD_COLUMN = ("LCLid", "household_id", "household")
TIME_COLUMN = ("tstp", "DateTime", "ts", "timestamp", "interval_start")
DAY_COLUMN = ("day", "date")


def date_to_day(d: dt.date) -> int:
    """Days since 1970-01-01 of a calendar date."""
    return (d - _EPOCH).days


def day_to_date(day: int) -> dt.date:
    """The calendar date of a day since 1970-01-01 (``date_to_day``'s inverse)."""
    return _EPOCH + dt.timedelta(days=int(day))


def parse_day(text: str) -> int:
    """``YYYY-MM-DD`` (anything after the date is ignored) -> days since 1970-01-01."""
    s = text.strip()
    return date_to_day(dt.date(int(s[0:4]), int(s[5:7]), int(s[8:10])))


# ---------------------------------------------------------------------------- side tables


def _side_reader(f: IO[str]) -> Iterator[list[str]]:
    """``csv.reader`` of a side table, on semicolons where its header is (as ``_Table``)."""
    first = f.readline()
    return csv.reader(itertools.chain([first], f), delimiter=_separator(first))


def _separator(header: str) -> str:
    """The separator a header uses most: ``;`` (a spreadsheet's CSV in much of Europe, with
    decimal commas), a tab (a spreadsheet's or a database client's text export), else
    ``,``."""
    return max(("\t", ";", ","), key=lambda sep: (header.count(sep), sep == ","))


def read_household_info(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``household -> group`` and ``household -> tariff`` from the household file.

    The columns are ``LCLid``, ``stdorToU`` and ``Acorn_grouped`` (Low Carbon London) or
    ``household_id``, ``tariff`` and ``group``. The Low Carbon London values (groups
    ``Affluent``, ``Comfortable``, ``Adversity``; tariffs ``Std``, ``ToU``) are matched in
    any case; other values are kept as they are (a model trained on them learns them:
    ``features.learn_vocabulary``)."""
    from meterwatch.model.features import ACORN_GROUPS, TARIFFS

    known_group = {g.lower(): g for g in ACORN_GROUPS}
    known_tariff = {t.lower(): t for t in TARIFFS}
    groups: dict[str, str] = {}
    tariffs: dict[str, str] = {}
    with _open_text(path) as f:
        reader = _side_reader(f)
        header = _clean(next(reader, []))
        i_id, i_tariff, i_group = _header_index(header, path, HOUSEHOLD_COLUMN,
                                                ("stdorToU", "tariff"),
                                                ("Acorn_grouped", "group"))
        for line, raw in enumerate(reader, start=2):
            row = _clean(raw)
            if not any(row):
                continue
            if len(row) <= max(i_id, i_tariff, i_group):
                raise LoadError(path, line, f"expected {len(header)} fields, got {raw!r}")
            group, tariff = row[i_group], row[i_tariff]
            groups[row[i_id]] = known_group.get(group.lower(), group)
            tariffs[row[i_id]] = known_tariff.get(tariff.lower(), tariff)
    return groups, tariffs


#: The highest air temperature ever recorded (°C): a weather file above it is not in °C.
MAX_CELSIUS = 56.7


def _nearest_day(text: str) -> int:
    """The day of ``YYYY-MM-DD[ HH...]`` whose midnight is nearest: Dark Sky's daily
    ``time`` is the local midnight written in UTC, so a London summer day reads
    ``2013-07-14 23:00:00`` for the 15th. Noon (a daily value stamped mid-day) is its own
    date. Unix seconds (Dark Sky's API, Pirate Weather's) are read as UTC."""
    s = text.strip()
    if s.isdigit() and len(s) >= 9:
        s = dt.datetime.fromtimestamp(int(s), dt.timezone.utc).strftime("%Y-%m-%d %H")
    day = parse_day(s)
    if len(s) >= 13 and s[10] in " T" and int(s[11:13]) > 12:
        day += 1
    return day


def read_daily_weather(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(day int32, daily maximum float32, daily minimum float32), sorted by day; columns
    ``time,temperatureMax,temperatureMin`` (Dark Sky, as packaged with Low Carbon London)
    or ``date,temp_max,temp_min``, in °C (a file above ``MAX_CELSIUS`` is refused: °F or
    kelvin). A time of day in the date column is rounded to the nearest midnight
    (``_nearest_day``)."""
    days: dict[int, tuple[float, float]] = {}
    with _open_text(path) as f:
        reader = _side_reader(f)
        header = _clean(next(reader, []))
        i_time, i_max, i_min = _header_index(
            header, path, ("time", *DAY_COLUMN),
            ("temperatureMax", "temp_max", "temperature_max", "tmax"),
            ("temperatureMin", "temp_min", "temperature_min", "tmin"))
        for line, raw in enumerate(reader, start=2):
            row = _clean(raw)
            if not any(row):
                continue
            try:
                day = _nearest_day(row[i_time])
                tmax = _parse_decimal_comma(row[i_max]) if row[i_max] else float("nan")
                tmin = _parse_decimal_comma(row[i_min]) if row[i_min] else float("nan")
            except (ValueError, IndexError) as e:
                raise LoadError(path, line, f"bad weather row {raw!r}: {e}") from None
            days[day] = (tmax, tmin)
    hottest = max((t for pair in days.values() for t in pair if t == t), default=0.0)
    if hottest > MAX_CELSIUS:
        raise LoadError(path, None, f"a temperature of {hottest:g} is no °C (the highest "
                        f"ever recorded is {MAX_CELSIUS} °C): in °F or kelvin? Give °C: "
                        "(°F - 32) / 1.8, or K - 273.15")
    order = sorted(days)
    return (np.array(order, dtype=np.int32),
            np.array([days[d][0] for d in order], dtype=np.float32),
            np.array([days[d][1] for d in order], dtype=np.float32))


def read_bank_holidays(path: str | os.PathLike[str]) -> np.ndarray:
    """Sorted int32 days of the bank holidays (column ``Bank holidays`` or ``date``)."""
    out = set()
    with _open_text(path) as f:
        reader = _side_reader(f)
        header = _clean(next(reader, []))
        (i_day,) = _header_index(header, path, ("Bank holidays", "date", "holiday"))
        for line, raw in enumerate(reader, start=2):
            row = _clean(raw)
            if not any(row):
                continue
            try:
                out.add(parse_day(row[i_day]))
            except (ValueError, IndexError) as e:
                raise LoadError(path, line, f"bad holiday row {raw!r}: {e}") from None
    return np.array(sorted(out), dtype=np.int32)


# ---------------------------------------------------------------------------- readings


@dataclass
class Readings:
    """M household-days, sorted by household then day."""

    household_ids: list[str]  # (M,)
    day: np.ndarray  # int32 (M,) days since 1970-01-01
    kwh: np.ndarray  # float32 (M, 48), NaN where missing

    def __len__(self) -> int:
        return len(self.day)

    def take(self, idx: np.ndarray) -> Readings:
        return Readings([self.household_ids[i] for i in idx], self.day[idx], self.kwh[idx])


class _Progress:
    """A progress bar with ETA on stderr (tqdm), counting bytes of the input read so far."""

    def __init__(self, name: str, total: int | None, enabled: bool | None) -> None:
        from tqdm import tqdm

        # disable=None: only on a terminal, so logs and CI output stay clean.
        self.bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=None if enabled is None else not enabled, leave=False,
                        dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        self.base = 0  # bytes of the files already finished (a folder of CSVs)
        self.t0 = time.monotonic()

    def update(self, done: int, rows: int, force: bool = False) -> None:
        n = self.base + done
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        self.bar.set_postfix_str(f"{rows:,} household-days", refresh=force)

    def close(self) -> None:
        self.bar.close()


_EMPTY_BLOCK = np.zeros((0, N_SLOTS), np.float32)


class _Accumulator:
    """Collects (household, day, slot, kWh) into (M, 48) blocks; bounded by the output size."""

    BLOCK = 65536

    def __init__(self, households: set[str] | None, start: int | None, end: int | None,
                 timezone: str = "UTC"):
        self.households, self.start, self.end = households, start, end
        self.clock = _Clock(timezone)
        # (household, day, slot) -> kWh of the repeated hour when the clocks go back, and
        # the slots of that hour whose first pass was read from a time without offset
        self.repeats: dict[tuple[str, int, int], float] = {}
        self.first_pass: set[tuple[str, int, int]] = set()
        self.hh_index: dict[str, int] = {}
        self.row_of: dict[int, int] = {}  # hh_index * 2**20 + (day + 2**19) -> row
        self.blocks: list[np.ndarray] = []
        self.keys: list[int] = []
        self.n = 0
        # half-hours read twice with different readings (the last kept), and the first
        self.conflicts = 0
        self.first_conflict: tuple[str, int, int, float, float] | None = None
        self.half_hours_read = 0  # of every row, kept or not (``_check_conflicts``)

    def conflict(self, hh: str, day: int, slot: int, old: float, new: float,
                 count: int = 1) -> None:
        self.conflicts += count
        if self.first_conflict is None:
            self.first_conflict = (hh, day, slot, old, new)

    def wanted(self, hh: str, day: int) -> bool:
        if self.households is not None and hh not in self.households:
            return False
        return not ((self.start is not None and day < self.start)
                    or (self.end is not None and day >= self.end))

    def row(self, hh: str, day: int) -> np.ndarray:
        h = self.hh_index.setdefault(hh, len(self.hh_index))
        key = (h << 20) + day + (1 << 19)
        r = self.row_of.get(key)
        if r is None:
            r = self.row_of[key] = self.n
            self.keys.append(key)
            if r % self.BLOCK == 0:
                self.blocks.append(np.full((self.BLOCK, N_SLOTS), np.nan, dtype=np.float32))
            self.n += 1
        return self.blocks[r // self.BLOCK][r % self.BLOCK]

    def repeat(self, hh: str, day: int, slot: int, value: float, kind: int) -> None:
        """A reading of the hour the clocks go back: its second pass (``REPEAT``), or a
        wall-clock time of it without offset (``REPEATED_HOUR``: the first read of this
        household-day's slot is the first pass, the next one the repeat)."""
        row = self.row(hh, day)  # the day exists even if only its repeat is read
        key = (hh, day, slot)
        if kind == REPEATED_HOUR and key not in self.first_pass:
            self.first_pass.add(key)
            row[slot] = value
        else:
            self.repeats[key] = value

    def _merge_repeats(self) -> None:
        """Each repeated half-hour is the mean of its two readings (one if the other is
        missing), as the service scores it."""
        for (hh, day, slot), value in self.repeats.items():
            row, first = self.row(hh, day), self.row(hh, day)[slot]
            row[slot] = value if np.isnan(first) else first if np.isnan(value) else \
                (first + value) / 2
        self.repeats, self.first_pass = {}, set()

    def result(self) -> Readings:
        """The rows sorted by household and day. Each block is copied straight to its rows'
        sorted places and let go: the readings are held about twice at the peak, not three
        times (the blocks, their concatenation and its sorted copy)."""
        self._merge_repeats()
        keys = np.array(self.keys, dtype=np.int64)
        hh, day = keys >> 20, (keys & ((1 << 20) - 1)) - (1 << 19)
        names = np.array(sorted(self.hh_index, key=self.hh_index.__getitem__), dtype=object)
        order = np.lexsort((day, names[hh].astype(str))) if len(keys) else np.zeros(0, int)
        where = np.empty(len(order), dtype=np.int64)
        where[order] = np.arange(len(order))  # row r of the blocks goes to where[r]
        kwh = np.empty((self.n, N_SLOTS), np.float32)
        for b in range(len(self.blocks)):
            lo, hi = b * self.BLOCK, min((b + 1) * self.BLOCK, self.n)
            kwh[where[lo:hi]] = self.blocks[b][: hi - lo]
            self.blocks[b] = _EMPTY_BLOCK
        self.blocks, self.row_of, self.keys = [], {}, []
        return Readings([str(names[h]) for h in hh[order]], day[order].astype(np.int32), kwh)


def _parse_value(text: str) -> float:
    t = text.strip()
    if not t or t.lower() in ("null", "nan", "na"):
        return float("nan")
    return float(t)


def zone(name: str) -> dt.tzinfo:
    """The time zone of an IANA name (UTC and its aliases: ``datetime.timezone.utc``), as
    ``--timezone`` takes it everywhere; raises ``ValueError`` naming it."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}; use an IANA name such as UTC or "
                         "Europe/London") from None
    return dt.timezone.utc if zone_key(name) == "UTC" else tz


def zone_key(name: str) -> str:
    """``name`` with the aliases of UTC made one (``UTC``), to compare two settings."""
    return "UTC" if name.strip().upper() in ("UTC", "Z", "ETC/UTC", "GMT", "ETC/GMT") \
        else name.strip()


#: ``_Clock`` kinds of a timestamp: an ordinary one; the second pass through the hour the
#: clocks go back (its offset says so); a wall-clock time without offset in that hour (the
#: first one read of a household's day is the first pass, the second the repeat).
ORDINARY, REPEAT, REPEATED_HOUR = 0, 1, 2


class _Clock(dict[str, tuple[int, int, int]]):
    """Timestamp text -> (local day, slot, kind) in a time zone, parsed once per distinct
    text (a file repeats each half-hour once per household). Raises ``ValueError`` for text
    that is not a timestamp on the half-hour, and for a wall-clock time that the zone skips
    (the clocks went forward): such a file is not in the zone's wall-clock time (a meter
    on standard time all year, say) and would be cut an hour off all summer."""

    def __init__(self, tz: str) -> None:
        super().__init__()
        self.tz = zone(tz)

    def __missing__(self, text: str) -> tuple[int, int, int]:
        t = text.strip()
        try:
            stamp = dt.datetime.fromisoformat(t)
        except ValueError:
            raise ValueError(f"not an ISO 8601 timestamp: {t!r}") from None
        kind = ORDINARY
        if stamp.tzinfo is not None:
            stamp = stamp.astimezone(self.tz)
            kind = REPEAT if stamp.fold else ORDINARY
        elif self.tz is not dt.timezone.utc:
            first = stamp.replace(tzinfo=self.tz)
            if first.astimezone(dt.timezone.utc).astimezone(self.tz).replace(
                    tzinfo=None) != stamp:
                raise ValueError(
                    f"{t!r} does not exist in {self.tz} (the clocks went forward): these are "
                    "not its wall-clock times; give the timestamps' UTC offsets, or the "
                    "--timezone they are in (UTC for a meter on standard time all year)")
            if first.utcoffset() != stamp.replace(tzinfo=self.tz, fold=1).utcoffset():
                kind = REPEATED_HOUR
        if stamp.minute % 30 or stamp.second or stamp.microsecond:
            raise ValueError(f"{t!r} is not on the hour or half-hour: the readings must be "
                             "half-hourly (sum each half-hour's quarter-hours first)")
        value = self[text] = (date_to_day(stamp.date()), stamp.hour * 2 + stamp.minute // 30,
                              kind)
        return value


class _Table:
    """A CSV's header and its lines as field lists. Split on commas (the Low Carbon London
    files: fast), with the ``csv`` module for a line with quotes (a database's export, an id
    with a comma in it), and on ``;`` or tabs with decimal commas (``0,219``) taken where the
    header is separated by them (a spreadsheet's export in much of Europe)."""

    def __init__(self, first: str, lines: Iterator[str]) -> None:
        head = first.strip("\ufeff\r\n")
        self.sep = _separator(head)
        self.lines = lines
        self.header = [h.strip() for h in self.split(head)]
        # with a separator other than a comma, a comma in a value is a decimal comma
        self.parse = _parse_value if self.sep == "," else _parse_decimal_comma

    def split(self, line: str) -> list[str]:
        if '"' in line:
            return next(csv.reader([line], delimiter=self.sep), [])
        return line.rstrip("\r\n").split(self.sep)

    def rows(self) -> Iterator[tuple[int, str, list[str]]]:
        """(line number, line, fields) of the lines after the header, blank lines skipped."""
        sep, split = self.sep, self.split
        for line_no, line in enumerate(self.lines, start=2):
            parts = line.rstrip("\r\n").split(sep) if '"' not in line else split(line)
            if len(parts) == 1 and not line.strip():
                continue
            yield line_no, line, parts


def _reading_column(header: list[str], norm: list[str], path: str) -> int:
    """The position of the readings column (-1: none). Several that could be
    (``energy_export``, ``energy_import``) is an error naming them, unless one of them says
    import or consumption, or is a plain ``kwh``."""
    found = [i for i, h in enumerate(norm) if _is_reading_column(h)]
    if len(found) > 1:
        taken = [i for i in found if norm[i] in ("kwh", "wh", "energy", "consumption")
                 or any(w in norm[i] for w in ("import", "consum", "deliver"))]
        if len(taken) != 1:
            raise LoadError(path, 1, f"several readings columns "
                            f"({', '.join(header[i] for i in found)}); keep one: each "
                            "half-hour's energy taken from the grid, in kWh (or in Wh, named wh)")
        found = taken
    return found[0] if found else -1


def _is_reading_column(name: str) -> bool:
    """A normalised header name that holds the readings: ``kwh``, ``energy(kWh/hh)``,
    ``consumption``, ``wh``, ``energy_wh``..."""
    return name.startswith(("energy", "kwh", "consumption")) or _in_watt_hours(name)


def _in_watt_hours(name: str) -> bool:
    """Whether a normalised readings column name says watt-hours (``wh``, ``energy_wh``,
    ``energy(wh/hh)``, ``consumption_wh``): such readings are divided by 1000."""
    return re.search(r"(^|[^a-z])wh($|[^a-z])", name) is not None


#: A household's median half-hour above this many kWh (10 kW all day) is not a household's:
#: readings in watt-hours read as kWh (``check_units``).
PLAUSIBLE_MEDIAN_KWH = 5.0


def check_units(kwh: np.ndarray, where: str | os.PathLike[str],
                fix: str = "name the readings column wh (or energy_wh) and they are divided "
                           "by 1000, or convert them to kWh") -> None:
    """Refuse readings whose median half-hour is no household's (``PLAUSIBLE_MEDIAN_KWH``):
    watt-hours read as kWh, or a meter's register (the total so far) read as each
    half-hour's use, would train a model on days the service never sees (it takes ``kwh`` up
    to 50) and be scored as imputed days. Raises ``LoadError`` naming the fix."""
    rows = kwh[:: max(1, len(kwh) // 20_000)]  # a sample of days is enough for a median
    finite = rows[np.isfinite(rows)]
    if not finite.size:
        return
    median = float(np.median(finite))
    if median <= PLAUSIBLE_MEDIAN_KWH:
        return
    steps = np.diff(rows, axis=1)
    steps = steps[np.isfinite(steps)]
    with np.errstate(invalid="ignore", divide="ignore"):  # days without a reading: NaN
        spread = (np.nanmax(rows, axis=1) - np.nanmin(rows, axis=1)) / np.nanmax(rows, axis=1)
    said = f"the median half-hourly reading is {median:g}, which is no household's in kWh " \
        "(0.05-2)"
    # a register rises through the day by the day's use, a sliver of its total
    if (steps > 0).any() and float((steps >= 0).mean()) > 0.95 and np.nanmedian(spread) < 0.1:
        raise LoadError(where, None, f"{said}, and the readings only rise within a day: they "
                        "look like a meter's register (the total so far), not each "
                        "half-hour's use; give the difference between consecutive readings")
    raise LoadError(where, None, f"{said}; the readings look like watt-hours: {fix}")


#: Above this share of the half-hours read (and a day's), half-hours read twice with different
#: readings are no corrections re-sent but two series under one household id
#: (``_check_conflicts``).
MAX_CONFLICT_SHARE = 0.1


def _check_conflicts(acc: _Accumulator, where: str | os.PathLike[str]) -> None:
    """Half-hours read twice with different readings: a few are corrections (the last read
    is kept, and said); many are two meters or channels under one household id, which
    would train on their mixture: refused."""
    if not acc.conflicts or acc.first_conflict is None:
        return
    hh, day, slot, old, new = acc.first_conflict
    said = (f"{acc.conflicts:,} half-hours came twice with different readings (the first: "
            f"{hh!r} on {day_to_date(day)} at {slot // 2:02d}:{30 * (slot % 2):02d}, {old:g} "
            f"then {new:g})")
    if acc.conflicts > max(N_SLOTS, MAX_CONFLICT_SHARE * acc.half_hours_read):
        raise LoadError(where, None, f"{said}: two meters or channels (import and export?) "
                        "under one household id; give one reading per household and "
                        "half-hour")
    log.warning("%s: %s; the last read is kept (a missing one never replaces a reading)",
                os.fspath(where), said)


def _parse_decimal_comma(text: str) -> float:
    return _parse_value(text.replace(",", "."))


def _read_long(table: _Table, path: str, acc: _Accumulator, progress: _Progress,
               tell: Callable[[], int]) -> int:
    """Rows ``household,[...,]timestamp,kWh`` (in any order). Returns rows."""
    header = table.header
    norm = [_norm(h) for h in header]
    try:
        i_id, i_ts = _header_index(header, path, HOUSEHOLD_COLUMN, TIME_COLUMN)
    except LoadError:
        i_id = i_ts = -1
    i_v = _reading_column(header, norm, path)
    if i_id < 0 or i_v < 0:
        raise LoadError(path, 1, "not a half-hourly readings header: expected a household "
                        f"({', '.join(HOUSEHOLD_COLUMN)}), a time ({', '.join(TIME_COLUMN)}) "
                        f"and a readings column (kwh, energy..., or wh, energy_wh... in "
                        f"watt-hours); got {header!r}")
    width = len(header)
    clock, parse = acc.clock, table.parse
    if _in_watt_hours(norm[i_v]):
        in_wh = parse

        def parse(text: str) -> float:
            return in_wh(text) / 1000.0
    rows = 0
    for line_no, line, parts in table.rows():
        if len(parts) != width:
            raise LoadError(path, line_no, f"expected {width} fields, got {line.strip()!r}")
        hh = parts[i_id].strip()
        try:
            day, slot, kind = clock[parts[i_ts]]
            value = parse(parts[i_v])
        except ValueError as e:
            raise LoadError(path, line_no, f"bad reading {line.strip()!r}: {e}") from None
        if acc.wanted(hh, day):
            if kind == ORDINARY:
                r = acc.row(hh, day)
                old = r[slot]
                # read before (not NaN) with another reading (compared as stored: float32)
                if old == old and old != np.float32(value):
                    acc.conflict(hh, day, slot, float(old), value)
                if value == value or old != old:  # a missing reading does not erase one
                    r[slot] = value
            else:
                acc.repeat(hh, day, slot, value, kind)
        rows += 1
        if rows & 0xFFFF == 0:
            progress.update(tell(), acc.n)
    acc.half_hours_read += rows
    return rows


def _read_hhblock(table: _Table, path: str, acc: _Accumulator, progress: _Progress,
                  tell: Callable[[], int]) -> int:
    header = table.header
    try:
        i_id, i_day, *i_slots = _header_index(header, path, HOUSEHOLD_COLUMN, DAY_COLUMN,
                                              *(f"hh_{k}" for k in range(N_SLOTS)))
    except LoadError as e:
        raise LoadError(path, 1, f"not a household-day header ({e.why})") from None
    parse = table.parse
    rows = 0
    for line_no, line, parts in table.rows():
        if len(parts) != len(header):
            raise LoadError(path, line_no, f"expected {len(header)} fields, got "
                                           f"{line.strip()[:80]!r}")
        try:
            hh, day = parts[i_id].strip(), parse_day(parts[i_day])
            values = [parse(parts[i]) for i in i_slots]
        except (ValueError, IndexError):
            raise LoadError(path, line_no, f"bad row {line.strip()[:80]!r}") from None
        if acc.wanted(hh, day):
            seen = acc.n
            r = acc.row(hh, day)
            if acc.n > seen:  # a household-day not read before
                r[:] = values
            else:  # read again: as in the long layouts, slot by slot
                new = np.array(values, dtype=np.float32)
                differ = np.flatnonzero((r == r) & (new == new) & (r != new))
                if len(differ):
                    k = int(differ[0])
                    acc.conflict(hh, day, k, float(r[k]), float(new[k]), len(differ))
                np.copyto(r, new, where=new == new)  # a missing reading does not erase one
        rows += 1
        if rows & 0x3FFF == 0:
            progress.update(tell(), acc.n)
    acc.half_hours_read += rows * N_SLOTS
    return rows


def _dispatch(lines: Iterator[str], path: str, acc: _Accumulator, progress: _Progress,
              tell: Callable[[], int]) -> int:
    first = next(lines, "")
    if not first.strip():
        raise LoadError(path, 1, "empty file; expected a readings header")
    table = _Table(first, lines)
    if "hh_0" in (_norm(h) for h in table.header):
        return _read_hhblock(table, path, acc, progress, tell)
    return _read_long(table, path, acc, progress, tell)


def _read_source(p: Path, acc: _Accumulator, prog: _Progress) -> int:
    """Rows of one file: ``.csv``, ``.csv.gz``, ``.tar``/``.tar.gz``/``.tgz`` or ``.zip``."""
    rows = 0
    name = p.name.lower()
    try:
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            with open(p, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
                for member in tar:
                    if not member.isfile() or not _is_csv_name(member.name):
                        continue
                    f = tar.extractfile(member)
                    if f is None:
                        continue
                    rows += _read_stream(f, member.name, f"{p}:{member.name}", acc, prog,
                                         raw.tell)
        elif name.endswith(".zip"):
            import zipfile

            with zipfile.ZipFile(p) as z:
                done = 0
                for info in z.infolist():
                    if info.is_dir() or not _is_csv_name(info.filename):
                        continue
                    with z.open(info) as f:
                        base = done
                        rows += _read_stream(f, info.filename, f"{p}:{info.filename}", acc,
                                             prog, lambda b=base: b)  # type: ignore[misc]
                    done += info.compress_size
                    prog.update(done, acc.n)
        else:
            with open(p, "rb") as raw:
                rows += _read_stream(raw, p.name, str(p), acc, prog, raw.tell)
    except (OSError, EOFError, tarfile.TarError) as e:
        # A truncated .gz, a corrupt archive: one line naming the file.
        raise LoadError(p, None, f"cannot read: {e}") from None
    return rows


def _is_csv_name(name: str) -> bool:
    return name.lower().endswith((".csv", ".csv.gz"))


def _read_stream(f: IO[bytes], name: str, where: str, acc: _Accumulator, prog: _Progress,
                 tell: Callable[[], int]) -> int:
    stream: IO[bytes] = f
    if name.lower().endswith(".gz"):
        stream = gzip.GzipFile(fileobj=f)  # type: ignore[assignment]
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        return _dispatch(iter(text), where, acc, prog, tell)
    except UnicodeDecodeError as e:
        raise LoadError(where, None, f"not UTF-8 text ({e.reason} at byte {e.start} of a "
                        "block); is it a CSV?") from None


def read_readings(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    households: Iterable[str] | None = None,
    start_day: int | None = None,
    end_day: int | None = None,
    progress: bool | None = None,
    timezone: str = "UTC",
) -> Readings:
    """Read half-hourly readings in any supported layout (detected from the header).

    Parameters
    ----------
    path
        A ``.csv``, ``.csv.gz``, ``.tar.gz``/``.tgz``/``.zip`` of CSVs (read as a stream), or
        a list of such files (e.g. a folder of per-household CSVs, see ``load_dataset``).
    households
        Keep only these household ids.
    start_day, end_day
        Keep days in ``[start_day, end_day)`` (days since 1970-01-01).
    progress
        Show a progress bar with ETA on stderr (default: when stderr is a terminal).
    timezone
        Time zone (IANA name) of the day boundaries, as ``meterwatch run --timezone``: a
        timestamp with an offset is converted to it, one without is its wall-clock time.

    Returns
    -------
    Readings
        Sorted by household and day; a half-hour without a reading is NaN, duplicates keep
        the last reading (``_check_conflicts``). Memory grows with the output, not the file.

    Raises
    ------
    LoadError
        Input that cannot be used; the message names the file and line.
    """
    paths = ([Path(path)] if isinstance(path, (str, os.PathLike))
             else [Path(x) for x in path])
    if not paths:
        raise LoadError(".", None, "no readings files given")
    for p in paths:
        if not p.is_file():
            raise LoadError(p, None, "no such file")
    acc = _Accumulator(set(households) if households is not None else None, start_day, end_day,
                       timezone)
    label = paths[0].name if len(paths) == 1 else f"{paths[0].parent.name or '.'}/ "\
        f"({len(paths)} files)"
    prog = _Progress(label, sum(p.stat().st_size for p in paths), progress)
    rows = 0
    t0 = time.monotonic()
    try:
        for p in paths:
            rows += _read_source(p, acc, prog)
            prog.base += p.stat().st_size
            prog.update(0, acc.n)
        prog.update(0, acc.n, force=True)
    finally:
        prog.close()
    out = acc.result()
    where = paths[0] if len(paths) == 1 else paths[0].parent
    check_units(out.kwh, where)
    _check_conflicts(acc, where)
    seconds = time.monotonic() - t0
    log.info("read %s: %d rows -> %d household-days of %d households in %.1fs (%.0f rows/s); "
             "days in %s", label, rows, len(out), len(set(out.household_ids)), seconds,
             rows / max(seconds, 1e-9), timezone)
    return out


_SIDE_FILES = {
    "household": ("household_information.csv", "informations_households.csv"),
    "weather": ("weather_daily_darksky.csv",),
    "holidays": ("uk_bank_holidays.csv",),
}
#: Other tables of the Low Carbon London / Kaggle sets that are not half-hourly readings.
_OTHER_TABLES = ("weather_hourly_darksky.csv", "acorn_details.csv")
_READINGS_FILES = ("readings.tar.gz", "halfhourly_dataset.tar.gz", "halfhourly_dataset.zip",
                   "hhblock_dataset.tar.gz", "hhblock_dataset.zip", "readings.csv",
                   "readings.csv.gz", "CC_LCL-FullData.csv", "CC_LCL-FullData.csv.gz")


def find_side_file(directory: Path, kind: str) -> Path | None:
    """The side table ``kind`` (``household``, ``weather``, ``holidays``) in ``directory``."""
    for name in _SIDE_FILES[kind]:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def find_readings(directory: str | os.PathLike[str]) -> list[Path]:
    """The readings files of a folder: a known archive (``readings.tar.gz``,
    ``halfhourly_dataset.zip``, ...) if there is one, else every ``.csv``/``.csv.gz`` below
    it (an extracted archive: one CSV per household or per block) except the side tables."""
    d = Path(directory)
    for n in _READINGS_FILES:
        if (d / n).is_file():
            return [d / n]
    skip = {n.lower() for names in _SIDE_FILES.values() for n in names} | set(_OTHER_TABLES)
    found = sorted(p for p in d.rglob("*")
                   if p.is_file() and _is_csv_name(p.name)
                   and p.name.lower().removesuffix(".gz") not in skip)
    if not found:
        raise LoadError(d, None, "no readings in this folder; expected CSV files of "
                        "half-hourly readings (one per household or per block) or one of "
                        + ", ".join(_READINGS_FILES))
    return found


def load_dataset(
    path: str | os.PathLike[str],
    *,
    household_info: str | os.PathLike[str] | None = None,
    weather: str | os.PathLike[str] | None = None,
    holidays: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[Readings, dict[str, Path | None]]:
    """Readings from a file or a folder, and the side tables that go with them.

    ``path`` is any file ``read_readings`` takes, or a folder: the readings found by
    ``find_readings`` and the side tables found there (``household_information.csv[.gz]``,
    ``weather_daily_darksky.csv[.gz]``, ``uk_bank_holidays.csv[.gz]``). Side tables given as
    arguments win over the folder's. Returns the readings and the side-table paths
    (``household``, ``weather``, ``holidays``; None where absent). Other keyword arguments
    go to ``read_readings``.
    """
    p = Path(path)
    if not p.exists():
        raise LoadError(p, None, "no such file or folder")
    sides: dict[str, Path | None] = {k: None for k in _SIDE_FILES}
    if p.is_dir():
        sides = {k: find_side_file(p, k) for k in _SIDE_FILES}
        files: list[Path] = find_readings(p)
    else:
        files = [p]
    for kind, given in (("household", household_info), ("weather", weather),
                        ("holidays", holidays)):
        if given is not None:
            if not Path(given).is_file():
                raise LoadError(given, None, "no such file")
            sides[kind] = Path(given)
    return read_readings(files, **kwargs), sides
