"""A benchmark run's result entry written as it grows, so a run that is stopped (a time
limit, an out-of-memory kill) still leaves what it had measured.

``save_result`` in ``benchmarks.common`` appends one finished run; ``PartialResult`` appends
the entry at the first ``update`` and rewrites that same entry (found by its ``run_id``) at
every later one, with ``complete`` false until ``finish``. The file is replaced atomically,
so a kill in the middle of a write leaves the previous version.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common


class PartialResult:
    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.path = common.RESULTS_DIR / f"{name}.json"
        self.entry: dict[str, Any] = {
            "benchmark": name, "run_id": uuid.uuid4().hex[:12],
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": common.command(), "machine": common.machine(),
            "code": common.code_version(), "complete": False, "params": params}

    def update(self, **fields: Any) -> Path:
        self.entry.update(fields)
        self.entry["written"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.entry["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        runs: list[Any] = []
        if self.path.exists():
            with contextlib.suppress(json.JSONDecodeError):
                runs = json.loads(self.path.read_text())
        runs = [r for r in runs if not (isinstance(r, dict)
                                        and r.get("run_id") == self.entry["run_id"])]
        runs.append(self.entry)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(runs, indent=1, default=common._plain) + "\n")
        os.replace(tmp, self.path)
        return self.path

    def finish(self, **fields: Any) -> Path:
        path = self.update(complete=True, **fields)
        shown = path.relative_to(common.ROOT) if path.is_relative_to(common.ROOT) else path
        print(f"\nresults written to {shown}", flush=True)
        return path
