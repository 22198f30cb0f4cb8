"""Wire formats: what goes into and comes out of meterwatch (JSON via orjson).

The pydantic models are the documented schema (and the README's examples); the hot path
(`stream.parse`) validates readings batch-wise without building one model object per
reading, and both answer to ``stream.validation``. ``tests/test_parse.py`` checks they agree.
"""

from __future__ import annotations

import datetime as _dt
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


_OUTPUT = ConfigDict(extra="forbid", populate_by_name=True)


class Slot(BaseModel):
    """A half-hour that drove an alert."""

    model_config = _OUTPUT

    slot: int = Field(ge=0, le=47, description="model slot: local wall-clock half-hour index")
    start: datetime
    observed_kwh: float | None = Field(description="null where the reading was imputed")
    expected_kwh: float
    error: float = Field(description="this slot's share of the day's anomaly score")


class Span(BaseModel):
    """Where one signal fired: consecutive half-hours of the day, from-to (local time)."""

    model_config = _OUTPUT

    signal: Literal["model", "zero_run", "flat_run", "impossible"]
    from_: str = Field(alias="from", pattern=r"^\d\d:\d\d$",
                       description="local wall-clock start, HH:MM")
    to: str = Field(pattern=r"^\d\d:\d\d$", description="local wall-clock end, HH:MM "
                    "(24:00 for the end of the day)")
    start: datetime = Field(description="start of the first half-hour, with UTC offset")
    end: datetime = Field(description="end of the last half-hour, with UTC offset")
    slots: list[int] = Field(description="model slots of the span")


class Alert(BaseModel):
    """A household-day whose score passed the threshold (the alerts topic)."""

    model_config = _OUTPUT

    schema_version: int = SCHEMA_VERSION
    household_id: str
    date: date
    score: float = Field(description="anomaly score (4 decimals)")
    threshold: float = Field(description="the threshold the day was scored against: the "
                             "checkpoint's, or --target-far's (4 decimals)")
    severity: Literal["low", "medium", "high"] = Field(
        description="how rare the score is among normal household-days against the alert "
                    "budget (the checkpoint's calibration curve): high at most a tenth of the "
                    "budget's false-alarm rate, medium at most a third, else low; data-quality "
                    "rule alerts high; checkpoints without a curve: score / threshold below 2 "
                    "low, below 5 medium, else high (stream.alerts.severity)")
    created_at: datetime = Field(description="when the alert was built (UTC)")
    model_version: str
    signals: list[Literal["model", "zero_run", "flat_run", "impossible", "missing"]] = Field(
        description="which detectors fired: model, zero_run, flat_run, impossible")
    unusual: list[Literal["total", "half_hour", "hours", "shape"]] = Field(
        default_factory=list,
        description="when the model fired: what about the day is unusual for this household, "
                    "each of its statistics that passes the threshold on its own: the day's "
                    "total use, one half-hour, the hours its use fell in, the shape of the "
                    "day; empty when only a data-quality rule fired")
    where: list[Span] = Field(description="the half-hours each signal fired on, from-to")
    imputed_slots: list[int] = Field(default_factory=list)
    observed_kwh_total: float
    expected_kwh_total: float
    top_slots: list[Slot]
    summary: str = Field(description="one sentence a person can act on")


class SustainedChange(BaseModel):
    """A household whose use fell, or whose meter started reading zero at night, and stayed
    so (the alerts topic, told apart from day alerts by ``type``): ``model.sustained``'s
    CUSUMs over its recent days (``stream.sustained``). ``date`` is the day it was detected
    on. At most one a household per 28 days."""

    model_config = _OUTPUT

    schema_version: int = SCHEMA_VERSION
    type: Literal["sustained_change"]
    household_id: str
    date: date  # the day the change was detected on
    start_date: _dt.date = Field(description="estimated first day of the change")
    days: int = Field(ge=1, description="days from start_date to date, both included")
    signature: Literal["evening_cut", "zeros_at_night", "scaled_down", "vacant"] = Field(
        description="what the change looks like: evening_cut (the evening share fell), "
                    "zeros_at_night (readings of exactly 0 at night), scaled_down (the daily "
                    "total and the night base fell by about the same factor), vacant (only "
                    "the base load is left: vacant, or away)")
    statistic: Literal["total", "evening", "night_min", "zero_night"] = Field(
        description="the statistic the signature is measured by: total (daily use), "
                    "evening (share of the day's use in 16:00-22:00), night_min (lowest "
                    "reading 00:00-06:00), zero_night "
                    "(share of zero readings 00:00-06:00)")
    direction: Literal["up", "down"] = Field(description="down, or up for zero_night")
    what: str = Field(description="the change in words")
    shift: float = Field(description="estimated size, in the statistic's units (a log "
                                     "ratio except for zero_night, a share)")
    shift_sd: float = Field(description="the same in the household's standard deviations")
    factor: float | None = Field(description="exp(shift): the new level over the old, for "
                                             "the log statistics; null for zero_night")
    changed: list[Literal["total", "evening", "night_min", "zero_night"]] = Field(
        description="every statistic whose CUSUM was past half its threshold that day")
    created_at: datetime = Field(description="when the record was built (UTC)")
    model_version: str = Field(description="the day model the service ran beside it")
    summary: str = Field(description="one sentence a person can act on")


class DayScore(BaseModel):
    """Exactly one per closed household-day (the scores topic); also the recovery ledger."""

    model_config = _OUTPUT

    schema_version: int = SCHEMA_VERSION
    household_id: str
    date: date
    status: Literal["scored", "imputed", "incomplete", "failed"] = Field(
        description="failed: the day's documents could not be built (see error; a "
                    "scoring_failed data-quality record says so too)")
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
    error: str | None = Field(None, description="why the day failed (status failed only)")
    sustained_change: SustainedChange | None = Field(
        None, description="the sustained_change record this day raised (on the alerts "
                          "topic too)")


class DataQuality(BaseModel):
    """A household-day closed without being scored as a complete day (data-quality topic):
    too few readings, imputed slots, or a failure while building its documents."""

    model_config = _OUTPUT

    schema_version: int = SCHEMA_VERSION
    household_id: str
    date: date
    kind: Literal["incomplete_day", "imputed_day", "scoring_failed"]
    readings: int
    expected_readings: int
    missing_slots: list[int]
    reason: str | None = Field(None, description="the error (scoring_failed only)")


class DeadLetter(BaseModel):
    """A record that failed validation: the original bytes and why (dead-letter topic)."""

    model_config = _OUTPUT

    schema_version: int = SCHEMA_VERSION
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: str | None = Field(description="the record key, base64 when not UTF-8")
    value: str = Field(description="the original record value, base64 (cut when "
                                   "value_truncated)")
    timestamp_ms: int | None = None
    value_truncated: bool | None = Field(
        None, description="true when the value was cut so the record fits the size limit")
    value_size: int | None = Field(None, description="size of the original value in bytes, "
                                                     "when it was cut")
    key_truncated: bool | None = Field(
        None, description="true when the key was too long to keep (the record has no key)")
    key_size: int | None = Field(None, description="size of the original key in bytes, "
                                                   "when it was cut")


#: Output record classes by schema name (``stream/schemas/<name>.schema.json``).
OUTPUT_RECORDS: dict[str, type[BaseModel]] = {
    "alert": Alert, "day_score": DayScore, "data_quality": DataQuality,
    "dead_letter": DeadLetter, "sustained_change": SustainedChange}


def json_schema(name: str) -> dict[str, object]:
    """The JSON Schema (draft 2020-12) of an output record, generated from its class; the
    shipped ``stream/schemas/<name>.schema.json`` files are this, written by
    ``python -m meterwatch.stream.events``."""
    schema = OUTPUT_RECORDS[name].model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://meterwatch.invalid/schemas/{name}.schema.json", **schema}


if __name__ == "__main__":
    import json
    from pathlib import Path

    folder = Path(__file__).parent / "schemas"
    for record in OUTPUT_RECORDS:
        path = folder / f"{record}.schema.json"
        path.write_text(json.dumps(json_schema(record), indent=2) + "\n", encoding="utf-8")
        print(path)
