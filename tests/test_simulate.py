"""``meterwatch simulate --data``: recorded readings produced day by day with bounded memory.

``stream.simulate.recorded`` used to build a households x days x 48 float32 grid of the
whole window (2 GB for the 5,567 households of the Low Carbon London set, 0.77 GB for 2,000
households spread over 2,000 days) and to copy every row twice more for the injection. It
now keeps the loader's rows and an index by day. What it sends must not change: the
oracle below is the grid it used to build, and the records of each day are compared byte
for byte.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from meterwatch.model import ContextTables
from meterwatch.model.inject import inject, random_labels
from meterwatch.model.loaders import Readings
from meterwatch.stream.broker import Broker
from meterwatch.stream.simulate import RecordedDays, day_records, recorded
from tests.cli_helpers import METERWATCH, clean_env, meterwatch, one_line_error


def _dense(readings: Readings, *, start: int | None = None, days: int | None = None,
           households: int | None = None, anomaly_rate: float = 0.0, seed: int = 0,
           tables: ContextTables | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The grid ``recorded`` built before (households, days, 48) and its labels: the
    oracle."""
    ids = np.asarray(readings.household_ids, dtype=str)
    order = list(dict.fromkeys(ids.tolist()))[:households]
    first = int(readings.day.min()) if start is None else start
    n_days = int(readings.day.max()) - first + 1 if days is None else days
    code = {h: i for i, h in enumerate(order)}
    keep = np.flatnonzero(np.isin(ids, order) & (readings.day >= first)
                          & (readings.day < first + n_days))
    kwh = np.full((len(order), n_days, 48), np.nan, np.float32)
    labels = np.zeros((len(order), n_days), np.int8)
    rows = np.array([code[h] for h in ids[keep]], dtype=np.int64)
    cols = readings.day[keep].astype(np.int64) - first
    day_kwh = readings.kwh[keep]
    if anomaly_rate > 0:
        rng = np.random.default_rng(seed)
        day_labels = random_labels(len(keep), anomaly_rate, rng, day=readings.day[keep])
        temp = None if tables is None else tables.max_temperature(readings.day[keep])
        hit = inject(day_kwh, day_labels, rng, day=readings.day[keep], temp_max=temp)
        changed = (np.abs(np.nan_to_num(hit) - np.nan_to_num(day_kwh)) > 1e-6).any(axis=1)
        labels[rows, cols] = np.where(changed, day_labels, 0)
        day_kwh = hit
    kwh[rows, cols] = day_kwh
    return order, kwh, labels


def _readings(seed: int = 0) -> tuple[Readings, ContextTables]:
    """Households with different date ranges, gaps of whole days and missing readings, in
    the loader's order (household, then day); a weather table over part of the range."""
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    day: list[int] = []
    for h in range(23):
        first = 15700 + int(rng.integers(0, 40))
        n = int(rng.integers(1, 60))
        days = sorted(set((first + rng.integers(0, 80, size=n)).tolist()))
        ids += [f"H{h:03d}"] * len(days)
        day += days
    kwh = rng.gamma(2.0, 0.15, size=(len(day), 48)).astype(np.float32)
    kwh[rng.random(kwh.shape) < 0.02] = np.nan
    tables = ContextTables(weather_day=np.arange(15690, 15760, dtype=np.int32),
                           temp_max=rng.normal(12, 6, size=70).astype(np.float32),
                           temp_min=rng.normal(4, 3, size=70).astype(np.float32))
    return Readings(ids, np.array(day, np.int32), kwh), tables


@pytest.mark.parametrize("options", [
    {"anomaly_rate": 0.0},
    {"anomaly_rate": 0.04, "seed": 1},
    {"anomaly_rate": 0.5, "seed": 7},
    {"anomaly_rate": 0.3, "seed": 2, "households": 9, "start": 15730, "days": 25},
])
def test_recorded_sends_what_the_grid_sent(options: dict) -> None:
    readings, tables = _readings()
    ids, grid, labels = _dense(readings, tables=tables, **options)
    got = recorded(readings, tables=tables, **options)
    assert isinstance(got, RecordedDays)
    assert got.household_ids == ids
    assert len(got.days) == grid.shape[1]
    np.testing.assert_array_equal(got.labels, labels)
    if options["anomaly_rate"] >= 0.3:
        assert labels.astype(bool).sum() >= 10  # the injection is exercised
    assert got.kwh_rows is readings.kwh  # the loader's rows, not a copy
    from meterwatch.model import SyntheticData

    dense = SyntheticData(household_ids=ids, days=got.days, kwh=grid, labels=labels,
                          acorn_group=[""] * len(ids), tariff=[""] * len(ids),
                          tables=ContextTables.empty())
    old_rng, new_rng = np.random.default_rng(5), np.random.default_rng(5)
    for d in range(len(got.days)):
        np.testing.assert_array_equal(got.day_kwh(d), grid[:, d])
        assert list(day_records(got, d, new_rng)) == list(day_records(dense, d, old_rng)), d


def _hhblock(folder: Path, households: int) -> None:
    """One household-day per household, each on its own day (a window of ``households``
    days): the grid of the whole window would be households x households x 48."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = ["LCLid,day," + ",".join(f"hh_{i}" for i in range(48))]
    first = dt.date(2005, 1, 1)
    for h in range(households):
        values = ",".join(f"{v:.3f}" for v in rng.gamma(2.0, 0.1, 48))
        lines.append(f"S{h:05d},{(first + dt.timedelta(days=h)).isoformat()},{values}")
    (folder / "block_0.csv").write_text("\n".join(lines) + "\n")


PEAK = ("import resource, subprocess, sys; "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(p.returncode)")


def test_simulate_data_memory_does_not_grow_with_the_window(broker: Broker,
                                                            tmp_path: Path) -> None:
    """``meterwatch simulate --data`` on 2,000 household-days spread over 2,000 days, every
    reading produced: the grid it used to build was 2,000 x 2,000 x 48 float32 = 768 MB,
    and it kept a (household, day) -> time entry for every household and every day produced
    (4 M entries, ~420 MB, that nothing read); peak RSS 1.1 GB with both, 750 MB with the
    entries alone, 330 MB now. The rows themselves are 384 kB.

    Not marked ``integration``: what it measures is the producing process's own memory,
    which no broker changes, so CI's second pass (on Apache Kafka) does not run it again."""
    _hhblock(tmp_path / "data", 2000)
    tag = uuid.uuid4().hex[:8]
    env = clean_env(METERWATCH_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
                    METERWATCH_INPUT_TOPIC=f"sim-mem-{tag}")
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, str(METERWATCH), "simulate", "--data",
         str(tmp_path / "data"), "--labels", str(tmp_path / "l.csv")],
        capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mb = int(proc.stdout.rsplit("PEAK_KB", 1)[1]) / 1024
    assert "produced 96,000 readings in " in proc.stdout, proc.stdout
    assert peak_mb < 600, f"peak RSS {peak_mb:.0f} MB"


@pytest.mark.parametrize(("flag", "value"), [
    ("--rate", "nan"), ("--rate", "inf"), ("--rate", "-5"), ("--duration", "nan"),
    ("--duration", "inf"), ("--duration", "0"), ("--malformed-every", "-1"),
])
def test_simulate_pace_that_cannot_be_kept_is_one_line(flag: str, value: str) -> None:
    """NaN used to pass ``--rate`` (pacing silently off) and ``--duration`` (never ended),
    a negative ``--malformed-every`` sent none; each is refused before any connection (the
    address below has no broker: the old behaviour was a connection error)."""
    proc = meterwatch("simulate", "--households", "1", "--days", "1", flag, value,
                      "--bootstrap-servers", "127.0.0.1:9", env=clean_env(), timeout=120)
    line = one_line_error(proc)
    assert line.startswith(f"meterwatch: error: {flag}: must be"), line


def test_simulate_tls_refusal_names_the_ca_flag(tmp_path: Path) -> None:
    """A server that answers with a certificate our CA did not sign: the line names
    ``--ssl-cafile`` and why (it said "--bootstrap-servers: cannot connect"). The server is
    a real TLS listener (the handshake fails before any Kafka request)."""
    from tests.test_config_tls import _pair, tls_server

    other_ca, _ = _pair(tmp_path, "other-ca")
    with tls_server(tmp_path) as port:
        proc = meterwatch("simulate", "--households", "1", "--days", "1",
                          "--bootstrap-servers", f"127.0.0.1:{port}", "--security-protocol",
                          "SSL", "--ssl-cafile", str(other_ca), env=clean_env(), timeout=120)
    line = one_line_error(proc)
    assert line.startswith(f"meterwatch: error: --ssl-cafile: TLS with 127.0.0.1:{port} "
                           "failed ("), line
    assert "give the CA that signed the broker's certificate" in line, line


@pytest.mark.integration
def test_simulate_duration_is_kept_at_a_slow_rate(broker: Broker, tmp_path: Path) -> None:
    """``--rate 0.25 --duration 2``: the second reading is due at 4 s, after the end; the
    wait used to run on to it (4.0 s for a 2 s run)."""
    env = clean_env(METERWATCH_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
                    METERWATCH_INPUT_TOPIC=f"sim-pace-{uuid.uuid4().hex[:8]}")
    proc = meterwatch("simulate", "--households", "2", "--days", "1", "--rate", "0.25",
                      "--duration", "2", env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("produced 1 readings in 1 records"), line
    seconds = float(line.split(" s to ")[0].rsplit(" in ", 1)[1])
    assert 1.9 <= seconds < 3.0, line


def test_simulate_data_checks_start_before_reading_the_data(tmp_path: Path) -> None:
    """``--start garbage`` is refused before the data set is read (it used to be read whole
    first: minutes on the full Low Carbon London set). The folder does not exist: had it
    been read first, the line would name --data."""
    proc = meterwatch("simulate", "--data", str(tmp_path / "not-there"), "--start", "garbage",
                      "--bootstrap-servers", "127.0.0.1:9", env=clean_env(), timeout=120)
    assert one_line_error(proc) == ("meterwatch: error: --start: 'garbage' is not a date; use "
                                    "YYYY-MM-DD")


def test_simulate_malformed_bootstrap_servers_is_one_line() -> None:
    """The same check as run's (``preflight.check_bootstrap``), before anything is
    generated or a connection tried (it was "cannot connect" after a connection attempt)."""
    proc = meterwatch("simulate", "--households", "1", "--days", "1", "--bootstrap-servers",
                      "localhost:abc", env=clean_env(), timeout=120)
    assert one_line_error(proc) == (
        "meterwatch: error: --bootstrap-servers: 'localhost:abc' is not host:port; give a "
        "comma-separated list like broker-1:9092,broker-2:9092 (an IPv6 address in "
        "brackets: [::1]:9092)")


def test_synthetic_readings_stay_within_what_the_service_accepts() -> None:
    """An injected anomaly on a heavy synthetic household (a level x5) had sent 58.6 kWh in
    a half-hour, which the service dead-letters (``bad_kwh``: at most 50 kWh): found by a
    25-minute soak on Kafka 4.0, the one valid-looking reading of 15 M not accepted.
    Synthetic readings are sent at most at the bound; recorded ones as they are."""
    from meterwatch.model import SyntheticConfig, generate
    from meterwatch.stream.validation import MAX_KWH, Invalid, check_kwh

    data = generate(SyntheticConfig(n_households=3, n_days=2, anomaly_rate=0.0, seed=1))
    data.kwh[1, 0, 7] = 58.633
    data.kwh[2, 0, 9] = np.nan
    sent = {}
    for _, value, _ in day_records(data, 0, np.random.default_rng(0), array_fraction=0.0):
        doc = json.loads(value)
        sent[(doc["household_id"], doc["ts"])] = doc["kwh"]
    h1 = data.household_ids[1]
    assert sent[(h1, "2013-01-01T03:30:00Z")] == MAX_KWH
    assert len(sent) == 3 * 48 - 1  # the missing reading is not sent
    assert max(sent.values()) <= MAX_KWH
    with pytest.raises(Invalid):
        check_kwh(58.633)
    readings, _ = _readings()
    readings.kwh[0, 5] = 58.633
    rec = recorded(readings)
    values = [json.loads(v)["kwh"] for d in range(len(rec.days))
              for _, v, _ in day_records(rec, d, np.random.default_rng(0), array_fraction=0.0)]
    assert 58.633 in values  # recorded: as the field sent it (the service dead-letters it)
