"""Wire formats: what goes into and comes out of meterwatch (JSON via orjson).

The pydantic models are the documented schema (and the README's examples); the hot path
(`stream.parse`) validates readings batch-wise without building one model object per
reading, and both answer to ``stream.validation``. ``tests/test_parse.py`` checks they agree.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meterwatch.stream.validation import (
    MAX_HOUSEHOLD_ID_LEN,
    MAX_KWH,
    Invalid,
    check_reading,
    loads,
)

SCHEMA_VERSION = 1


class Reading(BaseModel):
    """One half-hourly reading: the input record (or one element of an input JSON array).

    Validation is ``stream.validation.check_reading``, the function whose reasons the batch
    parser reports too (the rules: docs/ingest.md). A rejected reading raises pydantic's
    ``ValidationError``; its error's ``ctx["error"]`` is the ``Invalid`` with the
    dead-letter ``reason``. ``model_validate_json`` decodes as the service does (duplicate
    reading fields are rejected, numbers beyond a double are numbers).

    >>> Reading.model_validate_json(
    ...     b'{"household_id": "MAC000002", "ts": "2013-01-01T00:30:00Z", "kwh": 0.219}').kwh
    0.219
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    household_id: str = Field(min_length=1, max_length=MAX_HOUSEHOLD_ID_LEN)
    ts: datetime = Field(description="start of the half-hour, ISO 8601 with a UTC offset")
    kwh: float = Field(ge=0.0, le=MAX_KWH, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _one_specification(cls, data: Any) -> Any:
        if isinstance(data, Invalid):  # from model_validate_json: not JSON
            raise data
        r = check_reading(data)
        tz = timezone(timedelta(seconds=r.offset_s))
        return {"household_id": r.household_id, "kwh": r.kwh,
                "ts": datetime.fromtimestamp(r.ts, tz)}

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, *,
                            strict: bool | None = None, **kwargs: Any) -> Reading:
        """Decode with the service's decoder, then validate (see the class docstring)."""
        raw = json_data.encode() if isinstance(json_data, str) else bytes(json_data)
        try:
            doc: object = loads(raw)
        except Invalid as exc:
            doc = exc
        return cls.model_validate(doc, strict=strict, **kwargs)


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
