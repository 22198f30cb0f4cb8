"""JSON Schemas (draft 2020-12) of meterwatch's output records, shipped as package data.

Importing this module does not import torch, pydantic or anything of the service::

    from meterwatch.stream.schemas import load_schema
    schema = load_schema("alert")        # also "day_score", "data_quality", "dead_letter",
                                         # "sustained_change"

The files are ``alert.schema.json`` etc. beside this module; ``SCHEMA_NAMES`` lists them.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

SCHEMA_NAMES = ("alert", "day_score", "data_quality", "dead_letter", "sustained_change")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one output record (``alert``, ``day_score``, ``data_quality``,
    ``dead_letter``, ``sustained_change``), as a dict."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; choose from {', '.join(SCHEMA_NAMES)}")
    text = files(__name__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
