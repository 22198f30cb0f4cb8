"""Wire formats: what goes into and comes out of meterwatch (JSON via orjson).

The pydantic models are the documented schema (and the README's examples); the hot path
(`stream.parse`) validates readings batch-wise with the same rules, without building one
model object per reading. ``tests/test_parse.py`` checks that both agree.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
#: Household ids are 1..64 characters.
MAX_HOUSEHOLD_ID_LEN = 64
#: Readings above this many kWh in one half-hour (100 kW average) are impossible for a home.
MAX_KWH = 50.0


class Reading(BaseModel):
    """One half-hourly reading: the input record (or one element of an input JSON array).

    >>> Reading.model_validate_json(
    ...     b'{"household_id": "MAC000002", "ts": "2013-01-01T00:30:00Z", "kwh": 0.219}').kwh
    0.219
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    household_id: str = Field(min_length=1, max_length=MAX_HOUSEHOLD_ID_LEN)
    ts: datetime = Field(description="start of the half-hour, ISO 8601 with a UTC offset")
    kwh: float = Field(ge=0.0, le=MAX_KWH, allow_inf_nan=False)

    @field_validator("ts", mode="before")
    @classmethod
    def _iso_string(cls, v: object) -> object:
        if not isinstance(v, str):
            raise ValueError("ts must be an ISO 8601 string")
        return v

    @field_validator("ts")
    @classmethod
    def _aware_half_hour(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("timestamp has no UTC offset")
        if v.minute % 30 or v.second or v.microsecond:
            raise ValueError("timestamp is not the start of a half-hour")
        return v

    @field_validator("kwh", mode="before")
    @classmethod
    def _number(cls, v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("kwh must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("kwh must be finite")
        return v


class Slot(BaseModel):
    """A half-hour that drove an alert."""

    slot: int = Field(ge=0, le=47, description="model slot: local wall-clock half-hour index")
    start: datetime
    observed_kwh: float | None = Field(description="null where the reading was imputed")
    expected_kwh: float
    error: float = Field(description="this slot's share of the day's anomaly score")


class Alert(BaseModel):
    """A household-day whose score passed the threshold (the alerts topic)."""

    schema_version: int = SCHEMA_VERSION
    household_id: str
    date: date
    score: float
    threshold: float
    model_version: str
    signals: list[str] = Field(description="which detectors fired: model, zero_run, ...")
    imputed_slots: list[int] = Field(default_factory=list)
    observed_kwh_total: float
    expected_kwh_total: float
    top_slots: list[Slot]
    summary: str = Field(description="one sentence a person can act on")


class DayScore(BaseModel):
    """Exactly one per closed household-day (the scores topic); also the recovery ledger."""

    schema_version: int = SCHEMA_VERSION
    household_id: str
    date: date
    status: Literal["scored", "imputed", "incomplete"]
    score: float | None
    threshold: float
    is_alert: bool
    model_version: str
    readings: int
    expected_readings: int = Field(description="46, 48 or 50 (daylight-saving days)")
    missing_slots: list[int]
    seq: int = Field(description="per-household count of closed days, orders state updates")
    state: dict[str, float | list[float | None] | None] = Field(
        description="household state after this day")
    alert: Alert | None = None


class DataQuality(BaseModel):
    """A household-day closed by the watermark without enough readings (data-quality topic)."""

    schema_version: int = SCHEMA_VERSION
    household_id: str
    date: date
    kind: Literal["incomplete_day", "imputed_day"]
    readings: int
    expected_readings: int
    missing_slots: list[int]


class DeadLetter(BaseModel):
    """A record that failed validation: the original bytes and why (dead-letter topic)."""

    schema_version: int = SCHEMA_VERSION
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: str | None = Field(description="the record key, base64 when not UTF-8")
    value: str = Field(description="the original record value, base64")
    timestamp_ms: int | None = None
