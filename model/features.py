"""Context features and model inputs: the one code path shared by training and the stream.

``context_features`` turns (day, household, recent level) into ``N_CONTEXT`` numbers:

====================  =====================================================================
``dow_sin/dow_cos``   day of week on the unit circle (Monday = 0)
``weekend``           1 on Saturday and Sunday
``holiday``           1 on a bank holiday (``ContextTables.holidays``)
``season_sin/cos``    day of year on the unit circle
``acorn_*``           one-hot ACORN group (Affluent, Comfortable, Adversity); all 0 = unknown
``tariff``            +1 dynamic time-of-use, -1 standard, 0 unknown
                      (a model trained on other group or tariff values gives these columns
                      to its most common ones: ``learn_vocabulary``, ``encode``)
``temp_max/min``      daily temperature, (t - 12 °C) / 8 °C; 0 when unknown
``weather_missing``   1 when the day has no weather
``log_level``         log(level / 0.2 kWh); 0 when unknown
``level_missing``     1 when the household's recent level is unknown (new household)
====================  =====================================================================

``model_inputs`` imputes missing half-hours and maps kWh into the model's space: readings are
divided by the household's recent level (households differ ~10x, shapes much less) and
compressed with ``log1p`` (kettles and showers make heavy upper tails). The encoder may
see the day relative to its own mean instead (``ModelConfig.shape_input``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

N_SLOTS = 48
FEATURE_NAMES: tuple[str, ...] = (
    "dow_sin", "dow_cos", "weekend", "holiday", "season_sin", "season_cos",
    "acorn_affluent", "acorn_comfortable", "acorn_adversity", "tariff",
    "temp_max", "temp_min", "weather_missing", "log_level", "level_missing",
)
N_CONTEXT = len(FEATURE_NAMES)

ACORN_GROUPS = ("Affluent", "Comfortable", "Adversity")
TARIFFS = {"Std": -1.0, "ToU": 1.0}
LEVEL_REF = 0.2  # kWh per half-hour of a typical household; log_level is relative to it
MIN_SCALE = 0.01  # kWh per half-hour; below this a house is empty and shapes mean nothing
TEMP_REF, TEMP_SCALE = 12.0, 8.0  # °C, London's mean and spread of daily temperatures


@dataclass(frozen=True, eq=False)
class ContextTables:
    """Side information for ``context_features``; every part is optional.

    Parameters
    ----------
    acorn_group, tariff
        ``household_id -> "Affluent" | "Comfortable" | "Adversity"`` and ``-> "Std" | "ToU"``;
        anything else or absent means unknown.
    weather_day, temp_max, temp_min
        Daily weather, ``weather_day`` sorted int32 days since 1970-01-01, temperatures °C.
    holidays
        Sorted int32 days that are bank holidays.
    """

    acorn_group: Mapping[str, str] = field(default_factory=dict)
    tariff: Mapping[str, str] = field(default_factory=dict)
    weather_day: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    temp_max: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    temp_min: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    holidays: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    #: The group and tariff values are already a model's encoding names (``encode``): a
    #: detector does not translate them again.
    encoded: bool = False

    def __post_init__(self) -> None:
        n = len(self.weather_day)
        assert len(self.temp_max) == n and len(self.temp_min) == n, (
            n, len(self.temp_max), len(self.temp_min))
        assert n < 2 or bool(np.all(np.diff(self.weather_day) > 0)), "weather_day not sorted"

    @classmethod
    def empty(cls) -> ContextTables:
        """No side information: every household and day is 'unknown'."""
        return cls()

    def max_temperature(self, day: np.ndarray) -> np.ndarray:
        """float32 (N,): the maximum temperature (°C) of each day (days since 1970-01-01);
        NaN where the weather table has no such day."""
        day = np.asarray(day)
        out = np.full(len(day), np.nan, np.float32)
        if len(self.weather_day):
            i = np.minimum(np.searchsorted(self.weather_day, day), len(self.weather_day) - 1)
            hit = self.weather_day[i] == day
            out[hit] = self.temp_max[i[hit]]
        return out

    def changed(self, other: ContextTables) -> dict[str, Any]:
        """The fields of ``other`` whose values differ from this one's, for ``updated``:
        ``acorn_group`` and ``tariff`` together (the household information), the weather's
        ``weather_day``, ``temp_max`` and ``temp_min`` together, and ``holidays``."""
        out: dict[str, Any] = {}
        if other.acorn_group != self.acorn_group or other.tariff != self.tariff:
            out.update(acorn_group=other.acorn_group, tariff=other.tariff)
        if not (np.array_equal(other.weather_day, self.weather_day)
                and np.array_equal(other.temp_max, self.temp_max, equal_nan=True)
                and np.array_equal(other.temp_min, self.temp_min, equal_nan=True)):
            out.update(weather_day=other.weather_day, temp_max=other.temp_max,
                       temp_min=other.temp_min)
        if not np.array_equal(other.holidays, self.holidays):
            out["holidays"] = other.holidays
        return out

    def updated(self, parts: Mapping[str, Any]) -> ContextTables:
        """These tables with ``parts`` (``changed``'s fields) replaced. Where the household
        information is not among them, the new tables share this one's household index
        (``household_codes``; building it for a million households takes seconds)."""
        new = dataclasses.replace(self, **parts)
        if "acorn_group" not in parts and "tariff" not in parts:
            lookup = _LOOKUPS.get(self)
            if lookup is not None:
                _LOOKUPS[new] = lookup
            # and the encodings of these tables for models with their own vocabulary
            _ENCODED[new] = {key: enc.updated(parts)
                             for key, enc in _ENCODED.get(self, {}).items()}
        return new

    @classmethod
    def from_files(
        cls,
        household_csv: str | os.PathLike[str] | None = None,
        weather_csv: str | os.PathLike[str] | None = None,
        holidays_csv: str | os.PathLike[str] | None = None,
    ) -> ContextTables:
        """Read the Low Carbon London side tables (plain or ``.gz``); any may be None."""
        from meterwatch.model import loaders

        kw: dict[str, object] = {}
        if household_csv is not None:
            kw["acorn_group"], kw["tariff"] = loaders.read_household_info(household_csv)
        if weather_csv is not None:
            kw["weather_day"], kw["temp_max"], kw["temp_min"] = loaders.read_daily_weather(
                weather_csv)
        if holidays_csv is not None:
            kw["holidays"] = loaders.read_bank_holidays(holidays_csv)
        return cls(**kw)  # type: ignore[arg-type]


class _HouseholdLookup:
    """``ContextTables.acorn_group``/``tariff`` as sorted id arrays: a batch of ids is looked
    up with one ``np.searchsorted`` instead of a dict lookup per row."""

    def __init__(self, tables: ContextTables) -> None:
        groups = {g: i for i, g in enumerate(ACORN_GROUPS)}
        ids = sorted(set(tables.acorn_group) | set(tables.tariff))
        self.ids = np.asarray(ids, dtype=str) if ids else np.zeros(0, dtype="<U1")
        self.acorn = np.array([groups.get(tables.acorn_group.get(h, ""), -1) for h in ids],
                              dtype=np.int64)
        self.tariff = np.array([TARIFFS.get(tables.tariff.get(h, ""), 0.0) for h in ids],
                               dtype=np.float32)

    def __call__(self, household_ids: Sequence[str] | np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(household_ids, dtype=str)
        n = len(q)
        if not len(self.ids) or not n:
            return np.full(n, -1, np.int64), np.zeros(n, np.float32)
        i = np.minimum(np.searchsorted(self.ids, q), len(self.ids) - 1)
        hit = self.ids[i] == q
        return (np.where(hit, self.acorn[i], -1),
                np.where(hit, self.tariff[i], 0.0).astype(np.float32))


_LOOKUPS: weakref.WeakKeyDictionary[ContextTables, _HouseholdLookup] = (
    weakref.WeakKeyDictionary())


def household_codes(tables: ContextTables, household_ids: Sequence[str] | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(N,) ACORN group index (``ACORN_GROUPS``; -1 unknown) and tariff encoding (+1 ToU,
    -1 Std, 0 unknown) of N households; the tables' sorted index is built once per tables
    object (the tables are immutable)."""
    lookup = _LOOKUPS.get(tables)
    if lookup is None:
        lookup = _LOOKUPS[tables] = _HouseholdLookup(tables)
    return lookup(household_ids)


#: A model's vocabulary of household values: ``{"group": {value: ACORN_GROUPS name},
#: "tariff": {value: TARIFFS name}}``; None is the Low Carbon London one (each name itself).
Vocabulary = dict[str, dict[str, str]]
#: Household values that mean "not known" (never learnt as a group or tariff).
UNKNOWN_VALUES = frozenset({"", "acorn-u", "acorn-", "unknown", "n/a", "na", "none", "null"})


def _household_parts(tables: ContextTables
                     ) -> tuple[tuple[str, Mapping[str, str], tuple[str, ...]], ...]:
    """(part, household -> value, the encoding names) of the group and the tariff."""
    return (("group", tables.acorn_group, ACORN_GROUPS),
            ("tariff", tables.tariff, tuple(TARIFFS)))


def _known_counts(values: Iterable[str]) -> dict[str, int]:
    """How many households have each value, values that mean "not known" left out."""
    counts: dict[str, int] = {}
    for v in values:
        if v.strip().lower() not in UNKNOWN_VALUES:
            counts[v] = counts.get(v, 0) + 1
    return counts


def learn_vocabulary(tables: ContextTables | None, household_ids: Sequence[str]
                     ) -> Vocabulary | None:
    """The vocabulary of a model trained on these households: None (the Low Carbon London
    names) when their groups and tariffs are all among ``ACORN_GROUPS`` and ``TARIFFS``;
    otherwise the most common values, by number of households, take the three group
    columns and the two tariff signs (the most common tariff -1, the next +1), and any
    other value is unknown. A utility's own segments and tariffs are context then too."""
    if tables is None:
        return None
    ids = set(household_ids)
    out: Vocabulary = {}
    for part, values, names in _household_parts(tables):
        counts = _known_counts(v for h, v in values.items() if h in ids)
        if set(counts) <= set(names):
            continue
        common = sorted(counts, key=lambda v: (-counts[v], v))[: len(names)]
        out[part] = dict(zip(common, names, strict=False))
    return out or None


def unknown_values(tables: ContextTables | None, vocabulary: Vocabulary | None
                   ) -> dict[str, dict[str, int]]:
    """Per part (``group``, ``tariff``): the values of ``tables`` that a model with
    ``vocabulary`` does not know, with how many households have each (values that mean
    "not known" left out): those households are scored as of an unknown group or tariff."""
    out: dict[str, dict[str, int]] = {}
    if tables is None or tables.encoded:
        return out
    for part, values, names in _household_parts(tables):
        known = set((vocabulary or {}).get(part, {v: v for v in names}))
        counts = {v: n for v, n in _known_counts(values.values()).items() if v not in known}
        if counts:
            out[part] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def describe_unknown(unknown: dict[str, dict[str, int]]) -> str:
    """``unknown_values`` in words for a log line ('' when there are none)."""
    def households(n: int) -> str:
        return f"{n:,} household{'s' if n != 1 else ''}"

    return "; ".join(
        f"{households(sum(counts.values()))} with a {part} the model does not know ("
        + ", ".join(f"{v!r} {n:,}" for v, n in list(counts.items())[:3])
        + (", ..." if len(counts) > 3 else "") + ")"
        for part, counts in unknown.items())


def check_coverage(tables: ContextTables, household_ids: Sequence[str], day: np.ndarray,
                   files: Mapping[str, str | os.PathLike[str] | None]) -> list[str]:
    """How much of the readings (``household_ids``, ``day``) the side tables read from
    ``files`` (``household``, ``weather``, ``holidays``: paths or None) cover.

    A table given that covers none of them is a mistake the model would never show (ids
    written another way, another year's weather): ``ValueError`` naming its flag and what
    does not match. Partial cover is returned as warnings, one line each (the households and
    days left out are scored as unknown: the model's encoding for them)."""
    from meterwatch.model.loaders import day_to_date

    def span(days: np.ndarray) -> str:
        return f"{day_to_date(int(days.min()))}..{day_to_date(int(days.max()))}"

    def some(values: Iterable[str]) -> str:
        return ", ".join(repr(v) for v in sorted(values)[:3])

    warnings = []
    ids = set(household_ids)
    days = np.unique(np.asarray(day))
    name = {k: os.path.basename(os.fspath(v)) for k, v in files.items() if v is not None}
    if "household" in name and ids:
        listed = set(tables.acorn_group) | set(tables.tariff)
        missing = ids - listed
        if missing == ids:
            raise ValueError(
                f"--household-info: {name['household']} has none of the readings' {len(ids):,} "
                f"households (its ids: {some(listed) or 'none'}; the readings': "
                f"{some(ids)}); the household ids must be written the same")
        if missing:
            warnings.append(
                f"{name['household']} has {len(ids) - len(missing):,} of the readings' "
                f"{len(ids):,} households; "
                + (f"{some(missing)} gets" if len(missing) == 1 else
                   f"the other {len(missing):,} ({some(missing)}{', ...' * (len(missing) > 3)})"
                   " get") + " an unknown group and tariff")
    if "weather" in name and len(days):
        have = np.isin(days, tables.weather_day)
        runs = span(tables.weather_day) if len(tables.weather_day) else "no day"
        if not have.any():
            raise ValueError(f"--weather: {name['weather']} has none of the readings' days "
                             f"({span(days)}); it has {runs}")
        if not have.all():
            left = days[~have]
            dates = ", ".join(str(day_to_date(int(d))) for d in left[:3])
            warnings.append(f"{name['weather']} has {int(have.sum()):,} of the readings' "
                            f"{len(days):,} days ({runs}); "
                            + (f"{dates} is a day" if len(left) == 1 else
                               f"the other {len(left):,} ({dates}{', ...' * (len(left) > 3)}) "
                               "are days") + " without weather")
    if "holidays" in name and len(days):
        inside = (tables.holidays >= days.min()) & (tables.holidays <= days.max())
        if not inside.any() and days.max() - days.min() >= 180:  # half a year without one
            runs = span(tables.holidays) if len(tables.holidays) else "no date"
            warnings.append(f"{name['holidays']} has no holiday in the readings' "
                            f"{span(days)} ({runs}); every day is an ordinary one")
    return warnings


def load_with_context(data: str | os.PathLike[str], *, timezone: str = "UTC",
                      household_info: str | os.PathLike[str] | None = None,
                      weather: str | os.PathLike[str] | None = None,
                      holidays: str | os.PathLike[str] | None = None,
                      end_day: int | None = None) -> tuple[Any, dict[str, Any], ContextTables]:
    """``train``'s and ``evaluate``'s input: the readings (``loaders.load_dataset``), the
    side tables' paths (given, or found beside the readings) and the tables read from them,
    checked against the readings (``check_coverage``: none covered raises ``ValueError``
    naming the flag; part covered is logged as warnings)."""
    from meterwatch.model.loaders import load_dataset

    readings, sides = load_dataset(data, household_info=household_info, weather=weather,
                                   holidays=holidays, end_day=end_day, timezone=timezone)
    tables = ContextTables.from_files(household_csv=sides["household"],
                                      weather_csv=sides["weather"],
                                      holidays_csv=sides["holidays"])
    for line in check_coverage(tables, readings.household_ids, readings.day, sides):
        log.warning("%s", line)
    return readings, sides, tables


def encode(tables: ContextTables | None, vocabulary: Vocabulary | None
           ) -> ContextTables | None:
    """``tables`` with its group and tariff values in the encoding names of a model with
    ``vocabulary`` (values outside it unknown); the same object where there is nothing to
    translate. Built once per tables object and vocabulary (the household index with it)."""
    if tables is None or vocabulary is None or tables.encoded:
        return tables
    key = repr(sorted((k, sorted(v.items())) for k, v in vocabulary.items()))
    cache = _ENCODED.setdefault(tables, {})
    enc = cache.get(key)
    if enc is None:
        def mapped(values: Mapping[str, str], part: str) -> Mapping[str, str]:
            if part not in vocabulary:
                return values
            names = vocabulary[part]
            return {h: names.get(v, "") for h, v in values.items()}

        enc = cache[key] = dataclasses.replace(
            tables, acorn_group=mapped(tables.acorn_group, "group"),
            tariff=mapped(tables.tariff, "tariff"), encoded=True)
    return enc


_ENCODED: weakref.WeakKeyDictionary[ContextTables, dict[str, ContextTables]] = (
    weakref.WeakKeyDictionary())


def context_features(
    day: np.ndarray,
    household_ids: Sequence[str],
    level: np.ndarray,
    tables: ContextTables | None = None,
) -> np.ndarray:
    """Context vectors of N household-days.

    Parameters
    ----------
    day
        (N,) int days since 1970-01-01 (local calendar date).
    household_ids
        N household ids.
    level
        (N,) float recent mean kWh per half-hour of the household; NaN = unknown.
    tables
        Side information; None means ``ContextTables.empty()``.

    Returns
    -------
    np.ndarray
        float32 (N, N_CONTEXT), columns named by ``FEATURE_NAMES``.

    Examples
    --------
    >>> f = context_features(np.array([19723]), ["MAC000002"], np.array([np.nan]))
    >>> f.shape, dict(zip(FEATURE_NAMES, f[0].round(2)))["level_missing"]
    ((1, 15), np.float32(1.0))
    """
    tables = tables if tables is not None else ContextTables.empty()
    day = np.asarray(day).astype(np.int64, copy=False)
    level = np.asarray(level, dtype=np.float32)
    n = len(day)
    assert day.shape == (n,) and level.shape == (n,) and len(household_ids) == n, (
        day.shape, level.shape, len(household_ids))
    out = np.zeros((n, N_CONTEXT), dtype=np.float32)

    dow = (day + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    out[:, 0] = np.sin(2 * np.pi * dow / 7)
    out[:, 1] = np.cos(2 * np.pi * dow / 7)
    out[:, 2] = dow >= 5
    out[:, 3] = np.isin(day, tables.holidays)
    dates = day.astype("datetime64[D]")
    doy = (dates - dates.astype("datetime64[Y]")).astype(np.int64)
    out[:, 4] = np.sin(2 * np.pi * doy / 365.25)
    out[:, 5] = np.cos(2 * np.pi * doy / 365.25)

    if tables.acorn_group or tables.tariff:
        g, tariff = household_codes(tables, household_ids)
        known = g >= 0
        out[np.flatnonzero(known), 6 + g[known]] = 1.0
        out[:, 9] = tariff

    if len(tables.weather_day):
        i = np.clip(np.searchsorted(tables.weather_day, day), 0, len(tables.weather_day) - 1)
        tmax, tmin = tables.temp_max[i], tables.temp_min[i]
        ok = (tables.weather_day[i] == day) & np.isfinite(tmax) & np.isfinite(tmin)
        out[:, 10] = np.where(ok, (tmax - TEMP_REF) / TEMP_SCALE, 0.0)
        out[:, 11] = np.where(ok, (tmin - TEMP_REF) / TEMP_SCALE, 0.0)
        out[:, 12] = ~ok
    else:
        out[:, 12] = 1.0

    known = np.isfinite(level) & (level > 0)
    safe = np.where(known, np.maximum(level, MIN_SCALE), LEVEL_REF)
    out[:, 13] = np.where(known, np.log(safe / LEVEL_REF), 0.0)
    out[:, 14] = ~known
    return out


#: Context columns that come from ``ContextTables.acorn_group``/``tariff`` (household info)
#: and from the weather table; ``mask_context`` sets them to their "unknown" encoding.
HOUSEHOLD_COLUMNS = tuple(FEATURE_NAMES.index(n) for n in (
    "acorn_affluent", "acorn_comfortable", "acorn_adversity", "tariff"))
WEATHER_COLUMNS = (FEATURE_NAMES.index("temp_max"), FEATURE_NAMES.index("temp_min"))
WEATHER_MISSING = FEATURE_NAMES.index("weather_missing")


def mask_context(context: np.ndarray, household: np.ndarray | None = None,
                 weather: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``context`` (N, N_CONTEXT) whose household info (rows ``household``) and
    weather (rows ``weather``; bool (N,) masks) read "unknown", exactly as
    ``context_features`` encodes a household absent from the tables or a day without
    weather (``tables=None`` is both). Training uses it so that the unknown encoding is
    in-distribution (context dropout).

    >>> c = context_features(np.array([19723]), ["X"], np.array([0.2]))
    >>> bool((mask_context(c, np.array([True]), np.array([True])) == c).all())
    True
    """
    out = np.array(context, dtype=np.float32, copy=True)
    if household is not None:
        out[np.ix_(np.flatnonzero(household), np.array(HOUSEHOLD_COLUMNS))] = 0.0
    if weather is not None:
        w = np.flatnonzero(weather)
        out[np.ix_(w, np.array(WEATHER_COLUMNS))] = 0.0
        out[w, WEATHER_MISSING] = 1.0
    return out


# ---------------------------------------------------------------------------- model space


def to_model_space(kwh: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """kWh (N, 48) and per-row scale (N,) -> model inputs ``log1p(kwh / scale)``."""
    return np.log1p(np.maximum(kwh, 0.0) / scale[:, None]).astype(np.float32)


def from_model_space(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of ``to_model_space`` (negative outputs clipped to 0 kWh)."""
    return (np.expm1(np.maximum(x, 0.0)) * scale[:, None]).astype(np.float32)


def impute(kwh: np.ndarray, observed: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Fill unobserved slots by linear interpolation between the nearest observed slots of the
    same day (the nearest one at the day's edges); days with nothing observed get
    ``fallback`` (N,) everywhere. Returns a new float32 (N, 48) array."""
    n, s = kwh.shape
    idx = np.broadcast_to(np.arange(s), (n, s))
    prev = np.maximum.accumulate(np.where(observed, idx, -1), axis=1)  # last observed <= i
    nxt = np.minimum.accumulate(np.where(observed, idx, s)[:, ::-1], axis=1)[:, ::-1]
    has_prev, has_next = prev >= 0, nxt < s
    rows = np.arange(n)[:, None]
    v_prev = kwh[rows, np.clip(prev, 0, s - 1)]
    v_next = kwh[rows, np.clip(nxt, 0, s - 1)]
    span = np.maximum(nxt - prev, 1)
    w = (idx - prev) / span
    interp = np.where(has_prev & has_next, v_prev + w * (v_next - v_prev),
                      np.where(has_prev, v_prev, v_next))
    filled = np.where(observed, kwh, interp)
    filled = np.where(observed.any(axis=1, keepdims=True), filled, fallback[:, None])
    return filled.astype(np.float32)


@dataclass
class ModelInputs:
    """What the network sees for N household-days, and what is needed to read its output."""

    x: np.ndarray  # float32 (N, 48) readings in model space (relative to scale): the target
    x_shape: np.ndarray  # float32 (N, 48) readings relative to the day's own mean
    context: np.ndarray  # float32 (N, N_CONTEXT)
    scale: np.ndarray  # float32 (N,) kWh per half-hour that x is relative to
    observed: np.ndarray  # bool (N, 48) slot had a usable reading
    filled: np.ndarray  # float32 (N, 48) kWh, unusable slots imputed
    day_mean: np.ndarray  # float32 (N,) mean of the usable readings; NaN when none


#: ``model_inputs`` builds at most this many rows at a time: its temporaries (float64
#: imputation and normalisation) take about 3.4 KB a row against 0.7 KB for what it returns,
#: and at once they were the peak of a training on 3.5 M household-days (8.6 GB, 2026-11-26)
INPUT_CHUNK_ROWS = 131072


def model_inputs(
    kwh: np.ndarray,
    day: np.ndarray,
    household_ids: Sequence[str],
    level: np.ndarray,
    tables: ContextTables | None,
    max_kwh: float,
) -> ModelInputs:
    """Impute, normalise by level and build context: the only way readings reach the network.

    A slot is usable when it is finite and within ``[0, max_kwh]``. The scale is the
    household's recent ``level`` when known, else the day's own mean (a new household: its
    shape can still be judged, its level cannot), floored at ``MIN_SCALE``. Every row is
    built on its own (``INPUT_CHUNK_ROWS`` at a time).
    """
    kwh = np.asarray(kwh, dtype=np.float32)
    n = len(kwh)
    assert kwh.shape == (n, N_SLOTS), f"kwh must be (N, {N_SLOTS}), got {kwh.shape}"
    if n <= INPUT_CHUNK_ROWS:
        return _model_inputs(kwh, day, household_ids, level, tables, max_kwh)
    day, level = np.asarray(day), np.asarray(level)
    out: dict[str, np.ndarray] = {}
    for lo in range(0, n, INPUT_CHUNK_ROWS):
        hi = min(lo + INPUT_CHUNK_ROWS, n)
        part = _model_inputs(kwh[lo:hi], day[lo:hi], household_ids[lo:hi], level[lo:hi],
                             tables, max_kwh)
        gather_rows(out, {f.name: getattr(part, f.name) for f in fields(ModelInputs)},
                    slice(lo, hi), n)
    return ModelInputs(**out)


def gather_rows(whole: dict[str, np.ndarray], part: Mapping[str, np.ndarray],
                rows: slice | np.ndarray, n: int) -> None:
    """Write each of ``part``'s arrays into ``whole``'s (n, ...) array of the same name at
    ``rows`` (a slice or row indices), allocating it on first sight: how work done in
    chunks lands in one set of row-aligned arrays."""
    for name, v in part.items():
        if name not in whole:
            whole[name] = np.empty((n, *v.shape[1:]), v.dtype)
        whole[name][rows] = v


def _model_inputs(kwh: np.ndarray, day: np.ndarray, household_ids: Sequence[str],
                  level: np.ndarray, tables: ContextTables | None, max_kwh: float
                  ) -> ModelInputs:
    with np.errstate(invalid="ignore"):
        observed = np.isfinite(kwh) & (kwh >= 0) & (kwh <= max_kwh)
    n_obs = observed.sum(axis=1)
    total = np.where(observed, kwh, 0.0).sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        day_mean = np.where(n_obs > 0, total / np.maximum(n_obs, 1), np.nan).astype(np.float32)
    level = np.asarray(level, dtype=np.float32)
    known = np.isfinite(level) & (level > 0)
    scale = np.where(known, level, np.where(np.isfinite(day_mean), day_mean, LEVEL_REF))
    scale = np.maximum(scale, MIN_SCALE).astype(np.float32)
    filled = impute(np.where(observed, kwh, 0.0), observed, scale)
    own = np.maximum(filled.mean(axis=1), MIN_SCALE).astype(np.float32)
    return ModelInputs(
        x=to_model_space(filled, scale),
        x_shape=to_model_space(filled, own),
        context=context_features(day, household_ids, np.where(known, level, np.nan), tables),
        scale=scale,
        observed=observed,
        filled=filled,
        day_mean=day_mean,
    )
