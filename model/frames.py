"""Score a pandas DataFrame of readings with a trained detector (the notebook path).

>>> from meterwatch.model import Detector, score_frame
>>> det = Detector.load("model.pt")                                   # doctest: +SKIP
>>> out = score_frame(det, readings)                                  # doctest: +SKIP
>>> out[out.is_alert]                                                 # doctest: +SKIP

``readings`` is either

* **long**: one row per half-hour, columns ``household_id``, ``ts`` (the start of the
  half-hour: timezone-aware datetimes, or naive ones taken as ``timezone``) and ``kwh``;
  days are local days in ``timezone`` (the detector's training zone by default), the hour
  the clocks go back averaged as the service averages it (naive times of that hour: a
  household's first row of each is the first pass, its second the repeat, as the file
  loaders read them); or
* **wide**: one row per household-day, columns ``household_id``, ``date`` (``datetime.date``,
  ``YYYY-MM-DD`` strings or datetime64 at midnight) and the 48 half-hours ``hh_0`` ..
  ``hh_47`` (or ``0`` .. ``47``), NaN where missing.

Every household is new to the detector (its state starts empty) unless ``state`` gives its
stored state; a household's days are scored in date order, each with the state its previous
day left, exactly as the service does. Input that cannot be used raises ``ValueError`` with
the column, row or household at fault (never an ``assert``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from meterwatch.model.detector import SIGNAL_NAMES, Detector, HouseholdState
from meterwatch.model.features import ContextTables

if TYPE_CHECKING:
    import pandas as pd

N_SLOTS = 48
_EPOCH = dt.date(1970, 1, 1)


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("score_frame needs pandas: pip install 'meterwatch[api]'") from None
    return pandas


def _days_from_dates(values: Any, column: str) -> np.ndarray:
    """int32 days since 1970-01-01 from dates, date strings or datetime64 at midnight."""
    pd = _pandas()
    s = pd.Series(values)
    if pd.api.types.is_integer_dtype(s) or pd.api.types.is_float_dtype(s):
        raise ValueError(f"column {column!r} holds numbers; give dates (datetime.date, "
                         "'YYYY-MM-DD' or datetime64), not day counts")
    try:
        ts = pd.to_datetime(s, format="ISO8601") if s.dtype == object else pd.to_datetime(s)
    except (ValueError, TypeError) as e:
        raise ValueError(f"column {column!r}: not a date ({e})") from None
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_localize(None)
    if (ts != ts.dt.normalize()).any():
        bad = int(np.flatnonzero((ts != ts.dt.normalize()).to_numpy())[0])
        raise ValueError(f"column {column!r} row {bad}: {s.iloc[bad]!r} is not a calendar "
                         "date (it has a time of day); use the long layout for timestamps")
    days = (ts.dt.normalize() - pd.Timestamp("1970-01-01")).dt.days.to_numpy()
    return days.astype(np.int32)


def _wide(frame: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = [f"hh_{i}" for i in range(N_SLOTS)]
    if not all(n in frame.columns for n in names):
        alt = [i for i in range(N_SLOTS)]
        if all(i in frame.columns for i in alt) or all(str(i) in frame.columns for i in alt):
            names = [i if i in frame.columns else str(i) for i in alt]  # type: ignore[misc]
        else:
            raise ValueError("a wide frame needs the 48 columns hh_0 .. hh_47 (or 0 .. 47)")
    day = _days_from_dates(frame["date"], "date")
    try:
        kwh = frame[names].to_numpy(dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise ValueError(f"half-hour columns: not numbers ({e})") from None
    return [str(h) for h in frame["household_id"]], day, kwh


def _localize(ts: pd.Series, households: pd.Series, timezone: str) -> pd.Series:
    """Wall-clock times in ``timezone`` as instants. A time of the hour the clocks go back
    is read as the loaders read it: a household's first reading of it (in row order) is the
    first pass (summer time), its second the repeat; a time the clocks skip is NaT."""
    pd = _pandas()
    summer = ts.dt.tz_localize(timezone, ambiguous=True, nonexistent="NaT")
    winter = ts.dt.tz_localize(timezone, ambiguous=False, nonexistent="NaT")
    repeated = (summer != winter).to_numpy() & summer.notna().to_numpy()
    if not repeated.any():
        return summer
    nth = pd.DataFrame({"h": households.astype(str).to_numpy(), "t": ts.to_numpy()}) \
        .groupby(["h", "t"]).cumcount().to_numpy()
    first = repeated & (nth == 0)
    out = winter.copy()
    out[first] = summer[first]
    return out


def _long(frame: pd.DataFrame, timezone: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    pd = _pandas()
    ts = frame["ts"]
    if pd.api.types.is_numeric_dtype(ts):
        raise ValueError("column 'ts' holds numbers; give datetimes (or ISO 8601 strings)")
    try:
        if ts.dtype == object or pd.api.types.is_string_dtype(ts):
            # strings: with offsets (a local export has two, summer's and winter's) they are
            # instants, read as UTC; without, wall-clock times in ``timezone``; never a mix
            aware = ts.astype(str).str.strip().str.contains(r"(?:Z|[+-]\d\d:?\d\d)$")
            if aware.any() and not aware.all():
                bad = int(np.flatnonzero((aware != aware.iloc[0]).to_numpy())[0])
                raise ValueError(f"row {bad}: {ts.iloc[bad]!r} and {ts.iloc[0]!r}: some "
                                 "timestamps have a UTC offset and some not; give all or none")
            ts = pd.to_datetime(ts, format="ISO8601", utc=bool(aware.all()))
        else:
            ts = pd.to_datetime(ts)
    except (ValueError, TypeError) as e:
        raise ValueError(f"column 'ts': not a timestamp ({e})") from None
    if getattr(ts.dt, "tz", None) is None:
        ts = _localize(ts, frame["household_id"], timezone)
    local = ts.dt.tz_convert(timezone)
    if local.isna().any():
        bad = int(np.flatnonzero(local.isna().to_numpy())[0])
        raise ValueError(f"column 'ts' row {bad}: missing, or a time the clocks skip in "
                         f"{timezone}; give timezone-aware timestamps")
    minutes = local.dt.hour.to_numpy() * 60 + local.dt.minute.to_numpy()
    if (minutes % 30).any() or local.dt.second.to_numpy().any():
        bad = int(np.flatnonzero((minutes % 30) | local.dt.second.to_numpy())[0])
        raise ValueError(f"column 'ts' row {bad}: {ts.iloc[bad]} is not the start of a "
                         "half-hour")
    day = _days_from_dates(local.dt.tz_localize(None).dt.normalize(), "ts")
    slot = minutes // 30
    kwh_col = pd.to_numeric(frame["kwh"], errors="coerce").to_numpy(dtype=np.float32)
    hid = frame["household_id"].astype(str).to_numpy()
    twice = pd.DataFrame({"h": hid, "t": local.dt.tz_convert("UTC").to_numpy()}).duplicated()
    if twice.any():
        bad = int(np.flatnonzero(twice.to_numpy())[0])
        raise ValueError(f"row {bad}: a second reading for household "
                         f"{frame['household_id'].iloc[bad]!r} at {ts.iloc[bad]}")
    keys = pd.DataFrame({"h": hid, "d": day})
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(keys))
    # a local half-hour read twice is the hour the clocks go back: the mean of its two
    # readings, as the service scores it (each instant once: checked above)
    total = np.zeros((len(uniques), N_SLOTS), dtype=np.float64)
    count = np.zeros((len(uniques), N_SLOTS), dtype=np.int64)
    have = ~np.isnan(kwh_col)
    np.add.at(total, (codes[have], slot[have]), kwh_col[have])
    np.add.at(count, (codes[have], slot[have]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        kwh = np.where(count > 0, total / count, np.nan).astype(np.float32)
    ids = [str(h) for h, _ in uniques]
    days = np.array([d for _, d in uniques], dtype=np.int32)
    return ids, days, kwh


def score_frame(
    detector: Detector,
    readings: pd.DataFrame,
    *,
    tables: ContextTables | None = None,
    state: Mapping[str, Mapping[str, float]] | None = None,
    timezone: str | None = None,
) -> pd.DataFrame:
    """Score every household-day of ``readings`` (long or wide, see the module docstring).

    Parameters
    ----------
    detector
        A trained detector (``Detector.load``).
    readings
        Long (``household_id``, ``ts``, ``kwh``) or wide (``household_id``, ``date``,
        ``hh_0`` .. ``hh_47``) readings.
    tables
        Household info, weather and holidays (``ContextTables.from_files``); optional.
    state
        Stored state per household id (``HouseholdState.row``); others start empty.
    timezone
        Day boundaries of the long layout, and the zone of naive timestamps (IANA name).
        Default: the zone the detector was trained in (``meterwatch train --timezone``), or
        UTC. Another zone than the detector's is refused, as ``meterwatch run`` refuses it.

    Returns
    -------
    pandas.DataFrame
        One row per household-day, sorted by household and date: ``household_id``, ``date``,
        ``score``, ``threshold``, ``is_alert``, ``signals`` (list of names), ``readings``
        (half-hours present).

    Raises
    ------
    ValueError
        Missing columns, wrong date/time types, a household-day given twice, a zone other
        than the detector's.
    """
    pd = _pandas()
    if not isinstance(readings, pd.DataFrame):
        raise ValueError(f"readings must be a pandas DataFrame, not {type(readings).__name__}")
    cols = set(readings.columns)
    if "household_id" not in cols:
        raise ValueError("readings need a 'household_id' column")
    from meterwatch.model.loaders import check_units, zone_key

    trained = detector.info.get("timezone")
    if timezone is None:
        timezone = str(trained or "UTC")
    elif trained is not None and zone_key(str(trained)) != zone_key(timezone):
        raise ValueError(f"timezone {timezone!r}: the detector was trained on days in "
                         f"{trained}; leave timezone out, or give {trained!r}")
    if {"ts", "kwh"} <= cols:
        ids, day, kwh = _long(readings, timezone)
    elif "date" in cols:
        ids, day, kwh = _wide(readings)
    else:
        raise ValueError("readings need columns ts and kwh (long) or date and hh_0 .. hh_47 "
                         f"(wide); got {sorted(map(str, cols))}")
    if len(ids) == 0:
        raise ValueError("readings are empty")
    check_units(kwh, "readings", fix="divide them by 1000")
    order = np.lexsort((day, np.array(ids, dtype=object).astype(str)))
    ids = [ids[i] for i in order]
    day, kwh = day[order], kwh[order]
    same = np.array([ids[i] == ids[i - 1] and day[i] == day[i - 1]
                     for i in range(1, len(ids))], dtype=bool)
    if same.any():
        i = int(np.flatnonzero(same)[0]) + 1
        raise ValueError(f"household {ids[i]!r} has {_EPOCH + dt.timedelta(days=int(day[i]))} "
                         "more than once; give each household-day once")
    # rank of each day within its household: day k of every household is scored together,
    # with the state day k-1 left (a household appears at most once per detector call)
    rank = np.zeros(len(ids), dtype=np.int64)
    for i in range(1, len(ids)):
        rank[i] = rank[i - 1] + 1 if ids[i] == ids[i - 1] else 0
    stored = state or {}
    current: dict[str, dict[str, float]] = {h: dict(stored[h]) for h in set(ids) if h in stored}
    score = np.empty(len(ids), dtype=np.float32)
    alert = np.empty(len(ids), dtype=bool)
    signals: list[list[str]] = [[] for _ in ids]
    for k in range(int(rank.max()) + 1):
        idx = np.flatnonzero(rank == k)
        hh = [ids[i] for i in idx]
        st = HouseholdState.from_rows([current.get(h) for h in hh])
        out = detector.score(kwh[idx], day[idx], hh, st, tables)
        score[idx], alert[idx] = out.score, out.is_alert
        for j, i in enumerate(idx.tolist()):
            signals[i] = [n for b, n in enumerate(SIGNAL_NAMES) if int(out.signals[j]) >> b & 1]
            current[hh[j]] = out.state.row(j)
    return pd.DataFrame({
        "household_id": ids,
        "date": [_EPOCH + dt.timedelta(days=int(d)) for d in day],
        "score": score, "threshold": np.float32(detector.threshold), "is_alert": alert,
        "signals": signals, "readings": (~np.isnan(kwh)).sum(axis=1)})
