"""Where a reading lands: local calendar day and model slot, in a configurable time zone.

Model slot ``s`` (0..47) is the local wall-clock half-hour starting at ``s * 30`` minutes
after local midnight. Daylight-saving days are mapped onto those 48 slots like this:

* **Spring (46 half-hours, e.g. Europe/London, last Sunday of March):** the wall-clock hour
  that is skipped (01:00–02:00) never has readings; the day is complete when its 46
  half-hours have arrived, and the two empty slots are imputed by the model (the alert lists
  them in ``imputed_slots``).
* **Autumn (50 half-hours, last Sunday of October):** the wall-clock hour 01:00–02:00 occurs
  twice. The second occurrence is a *repeat*: it is kept beside the first, the day is
  complete when all 50 half-hours have arrived, and each repeated slot scores the mean of
  its two readings (kWh per half-hour stays comparable with other days).

In UTC (the default) every day has 48 half-hours and nothing of the above applies.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np

SLOTS = 48
HALF_HOUR_S = 1800
DAY_S = 86400


class TimeGrid:
    """Maps epoch seconds to (local day, slot, repeat) and knows each day's length.

    >>> g = TimeGrid("Europe/London")
    >>> import numpy as np
    >>> day, slot, rep = g.locate(np.array([1382833800, 1382837400]))  # 2013-10-27 00:30/01:30Z
    >>> slot.tolist(), rep.tolist(), g.expected_readings(int(day[0]))
    ([3, 3], [False, True], 50)
    """

    def __init__(self, tz: str = "UTC") -> None:
        self.tz_name = tz
        self.is_utc = tz.upper() in ("UTC", "Z", "ETC/UTC", "GMT")
        self._tz = timezone.utc if self.is_utc else ZoneInfo(tz)
        self._offsets: dict[int, int] = {}  # half-hour index -> UTC offset in seconds
        self._day_bounds: dict[int, tuple[int, int]] = {}

    def _offset(self, half_hour: int) -> int:
        off = self._offsets.get(half_hour)
        if off is None:
            if len(self._offsets) > 200_000:
                self._offsets.clear()
            dt = datetime.fromtimestamp(half_hour * HALF_HOUR_S, tz=timezone.utc)
            delta = dt.astimezone(self._tz).utcoffset() or timedelta(0)
            off = self._offsets[half_hour] = int(delta.total_seconds())
        return off

    def _offsets_of(self, ts: np.ndarray) -> np.ndarray:
        hh = ts // HALF_HOUR_S
        uniq, inv = np.unique(hh, return_inverse=True)
        offs = np.fromiter((self._offset(int(u)) for u in uniq), dtype=np.int64, count=len(uniq))
        return offs[inv]

    def locate(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local day (days since 1970-01-01, int32), slot (int8) and repeat flag per reading."""
        if self.is_utc:
            return ((ts // DAY_S).astype(np.int32), ((ts % DAY_S) // HALF_HOUR_S).astype(np.int8),
                    np.zeros(len(ts), dtype=bool))
        off = self._offsets_of(ts)
        local = ts + off
        # A repeat is the second pass through a wall-clock hour after the clocks went back.
        repeat = off < self._offsets_of(ts - 3600)
        return ((local // DAY_S).astype(np.int32),
                ((local % DAY_S) // HALF_HOUR_S).astype(np.int8), repeat)

    def bounds(self, day: int) -> tuple[int, int]:
        """UTC epoch seconds of the local day's start and end (exclusive)."""
        b = self._day_bounds.get(day)
        if b is None:
            if self.is_utc:
                b = (day * DAY_S, (day + 1) * DAY_S)
            else:
                def midnight(d: int) -> int:
                    local = datetime(1970, 1, 1) + timedelta(days=d)
                    return int(local.replace(tzinfo=self._tz).timestamp())
                b = (midnight(day), midnight(day + 1))
            self._day_bounds[day] = b
        return b

    def expected_readings(self, day: int) -> int:
        """Half-hours in the local day: 48, or 46/50 on daylight-saving changes."""
        start, end = self.bounds(day)
        return (end - start) // HALF_HOUR_S

    def day_ends(self, days: np.ndarray) -> np.ndarray:
        """UTC end (exclusive) of each local day, vectorised over unique days."""
        if self.is_utc:
            return (days.astype(np.int64) + 1) * DAY_S
        uniq, inv = np.unique(days, return_inverse=True)
        ends = np.fromiter((self.bounds(int(d))[1] for d in uniq), dtype=np.int64,
                           count=len(uniq))
        return ends[inv]

    def slot_start(self, day: int, slot: int) -> datetime:
        """Aware local datetime of a model slot's start (first occurrence on DST days)."""
        local = datetime(1970, 1, 1) + timedelta(days=day, minutes=30 * slot)
        return local.replace(tzinfo=self._tz)
