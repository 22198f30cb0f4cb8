"""Helpers of the CLI suites: run the INSTALLED ``meterwatch`` console script as a user does,
and write generated readings in every layout ``model.loaders`` reads."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import io
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from meterwatch.model import SyntheticData
from meterwatch.stream.testing import clean_env, cli_env, ready

#: The console script ``pip install`` put beside the interpreter running the tests.
METERWATCH = Path(sys.executable).parent / "meterwatch"
SECRET = "s3cr3tpw"
#: a ``meterwatch run`` of a test's own on a broker (``stream.testing.cli_env``)
service_env = cli_env

#: The start of a script for a fresh interpreter in which a GPU is "present" (so ``--device
#: auto`` would pick it) and every way into a CUDA context fails loudly and is recorded in
#: ``touched``: what follows checks that the service process never creates one.
FORBID_CUDA = """
import sys, types
import torch

touched = []

def forbid(name):
    def f(*a, **kw):
        touched.append(name)
        raise AssertionError(f"torch.cuda.{name} called in the service process")
    return f

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
for name in ("_lazy_init", "init", "mem_get_info", "utilization", "memory_allocated",
             "get_device_properties", "set_device", "synchronize"):
    setattr(torch.cuda, name, forbid(name))
"""


@contextlib.contextmanager
def cli_service(env: dict[str, str], log_path: Path, port: int | None = None,
                ready_s: float = 180) -> Iterator[subprocess.Popen[bytes]]:
    """``meterwatch run`` (the installed script) with ``env``, its output in ``log_path``,
    for the ``with`` block: ready (``/readyz`` on ``port``) when ``port`` is given. Then
    SIGTERM, and an ``AssertionError`` with the log's tail unless it exits 0 (an error of
    the block itself goes on as it was)."""
    with open(log_path, "wb") as log:
        service = subprocess.Popen([str(METERWATCH), "run"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_s
        while port is not None and not ready(port):
            assert service.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        yield service
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            code = service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
            raise
    assert code == 0, log_path.read_text()[-3000:]


def settings_of(env: dict[str, str]) -> Any:
    """The ``Settings`` a service started with ``env`` holds."""
    from meterwatch.stream.config import Settings

    return Settings.load(**{k.removeprefix("METERWATCH_").lower(): v for k, v in env.items()
                            if k.startswith("METERWATCH_")})


def meterwatch(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``meterwatch ARGS`` (the installed script) and return what it did."""
    assert METERWATCH.exists(), f"{METERWATCH} is missing: install the package (make install)"
    return subprocess.run([str(METERWATCH), *args], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else clean_env(),
                          cwd=cwd, check=False)


def stderr_until(args: list[str], marker: str, env: dict[str, str] | None = None,
                 timeout_s: float = 60) -> str:
    """Start ``meterwatch ARGS`` (the installed script), read its stderr until a line holds
    ``marker``, then kill it; the stderr read so far (for a service that would run on)."""
    proc = subprocess.Popen([str(METERWATCH), *args], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL,
                            env=env if env is not None else clean_env())
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if marker in line:
                break
    finally:
        proc.kill()
        proc.wait(30)
    text = "".join(lines)
    assert marker in text, text
    return text


def tiny_checkpoint(out: Path) -> Path:
    """``meterwatch train --synthetic`` at its smallest quick size (8 households x 10 days,
    2 epochs) to ``out``."""
    proc = meterwatch("train", "--synthetic", "--households", "8", "--days", "10",
                      "--max-epochs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"to {out}" in proc.stdout
    return out


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed command (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("meterwatch: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _date(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).isoformat()


def _ts(day: int, slot: int, sep: str = " ") -> str:
    return f"{_date(day)}{sep}{slot // 2:02d}:{30 * (slot % 2):02d}:00"


def long_rows(data: SyntheticData, h: int, days: slice, *, datastore: bool = False) -> list[str]:
    rows = []
    for d in range(len(data.days))[days]:
        for s in range(48):
            v = float(data.kwh[h, d, s])
            text = "Null" if np.isnan(v) else f" {v:.3f} "
            hid = data.household_ids[h]
            if datastore:
                rows.append(f"{hid},{data.tariff[h]},{_ts(data.days[d], s)}.0000000,{text}")
            else:
                rows.append(f"{hid},{_ts(data.days[d], s)},{text}")
    return rows


KAGGLE_HEADER = "LCLid,tstp,energy(kWh/hh)"
DATASTORE_HEADER = "LCLid,stdorToU,DateTime,KWH/hh (per half hour) "


def write_side_tables(data: SyntheticData, folder: Path) -> None:
    """household_information.csv (CRLF) and weather_daily_darksky.csv as the LCL set has."""
    lines = ["LCLid,stdorToU,Acorn,Acorn_grouped,file"] + [
        f"{hid},{data.tariff[h]},ACORN-A,{data.acorn_group[h]},block_0"
        for h, hid in enumerate(data.household_ids)]
    (folder / "household_information.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    rng = np.random.default_rng(0)
    weather = ["time,temperatureMax,temperatureMin"] + [
        f"{_date(d)} 00:00:00,{10 + rng.normal():.2f},{3 + rng.normal():.2f}"
        for d in range(int(data.days[0]) - 1, int(data.days[-1]) + 2)]
    (folder / "weather_daily_darksky.csv").write_text("\n".join(weather) + "\n")


def write_layout(data: SyntheticData, layout: str, root: Path, days: slice = slice(None)) -> Path:
    """Write ``data`` (the ``days`` given) in one layout under ``root``; returns what to pass
    to ``--data``. Layouts: folder (one CSV per household, side tables beside them, the
    extracted readings.tar.gz), csv, csv.gz, tar.gz, datastore, hhblock, and a utility's
    own: own (``household_id,ts,kwh``, the stream's fields, UTC timestamps with ``Z``, in
    another column order with an extra column) and own-wide (``household_id,date,hh_0..``
    with an extra column)."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(data.household_ids)
    if layout == "folder":
        for h in range(n):
            body = "\n".join([KAGGLE_HEADER, *long_rows(data, h, days)]) + "\n"
            (root / f"{data.household_ids[h]}.csv").write_text(body)
        write_side_tables(data, root)
        return root
    everyone = [row for h in range(n) for row in long_rows(data, h, days,
                                                            datastore=layout == "datastore")]
    if layout == "datastore":
        path = root / "CC_LCL-FullData.csv"
        path.write_bytes(("\r\n".join([DATASTORE_HEADER, *everyone]) + "\r\n").encode())
        return path
    body = "\n".join([KAGGLE_HEADER, *everyone]) + "\n"
    if layout == "csv":
        path = root / "block_0.csv"
        path.write_text(body)
        return path
    if layout == "csv.gz":
        path = root / "block_0.csv.gz"
        path.write_bytes(gzip.compress(body.encode()))
        return path
    if layout == "tar.gz":
        path = root / "readings.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for h in range(n):
                blob = ("\n".join([KAGGLE_HEADER, *long_rows(data, h, days)]) + "\n").encode()
                info = tarfile.TarInfo(f"{data.household_ids[h]}.csv")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return path
    if layout == "own":
        path = root / "export.csv"
        rows = ["meter_serial,kwh,household_id,ts"]
        for h, hid in enumerate(data.household_ids):
            for d in range(len(data.days))[days]:
                for s in range(48):
                    v = float(data.kwh[h, d, s])
                    if not np.isnan(v):
                        rows.append(f"S{h},{v:.3f},{hid},{_ts(data.days[d], s, 'T')}Z")
        path.write_text("\n".join(rows) + "\n")
        return path
    if layout in ("hhblock", "own-wide"):
        path = root / "block_0.csv"
        header = ("LCLid,day," if layout == "hhblock" else "household_id,date,") + \
            ",".join(f"hh_{i}" for i in range(48))
        if layout == "own-wide":
            header += ",note"
        rows = [header]
        for h in range(n):
            for d in range(len(data.days))[days]:
                vals = ["" if np.isnan(v) else f"{v:.3f}" for v in data.kwh[h, d].tolist()]
                rows.append(f"{data.household_ids[h]},{_date(data.days[d])}," + ",".join(vals)
                            + ("," if layout == "own-wide" else ""))
        path.write_text("\n".join(rows) + "\n")
        return path
    raise ValueError(layout)
