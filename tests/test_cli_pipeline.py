"""What a user does first, through the installed ``meterwatch`` script, with default
settings, against the session's real broker:

train on a folder of per-household CSVs (the extracted readings.tar.gz layout, side
tables beside them) -> ``meterwatch run`` with that model -> ``meterwatch simulate``
(settings from METERWATCH_* variables, a labels file) -> read alerts, day scores,
data-quality and dead-letter records back and check each against its shipped JSON Schema
-> SIGTERM (exit 0); ``meterwatch evaluate`` on the same layout is
``tests/test_train_inputs.py``'s (no broker), as is ``train --data`` on every other layout
the loaders read. Also: ``simulate --rate --duration`` and ``simulate --data``.

Only the topic names, the group and the broker address differ from the defaults (the
broker is shared by the whole test session); the metrics port is picked free.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import Broker, create_topics, free_port
from meterwatch.stream.config import Settings
from meterwatch.stream.schemas import load_schema
from tests.cli_helpers import (
    cli_service,
    meterwatch,
    service_env,
    settings_of,
    write_layout,
)
from tests.conftest import read_topic

pytestmark = pytest.mark.integration

HOUSEHOLDS = 40
HISTORY = 28
START = dt.date(2013, 3, 1)


def _validate(docs: list[dict], schema_name: str) -> None:
    schema = load_schema(schema_name)
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for doc in docs:
        validator.validate({k: v for k, v in doc.items() if not k.startswith("_")})


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Households with a history to train on and days to stream after it."""
    data = generate(SyntheticConfig(n_households=HOUSEHOLDS, n_days=HISTORY,
                                    start_day=START - dt.timedelta(days=HISTORY),
                                    anomaly_rate=0.0, seed=5))
    folder = write_layout(data, "folder", tmp_path_factory.mktemp("lcl") / "readings")
    return data, folder


def test_train_folder_run_simulate_alerts(history, broker: Broker,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    data, folder = history
    model = tmp_path / "model.pt"
    proc = meterwatch("train", "--data", str(folder), "--out", str(model))
    assert proc.returncode == 0, proc.stderr
    assert "household_information.csv" in proc.stderr  # side tables found in the folder
    assert model.exists() and "saved meterwatch-ae-" in proc.stdout

    tag = uuid.uuid4().hex[:8]
    port = free_port()
    env = service_env(broker, tag, METERWATCH_MODEL_PATH=str(model),
                      METERWATCH_METRICS_PORT=str(port))
    settings = settings_of(env)
    # the platform owns the input topic; the service creates its outputs
    asyncio.run(create_topics(settings.bootstrap_servers, {settings.input_topic: 8}))
    log_path = tmp_path / "run.log"
    with cli_service(env, log_path, port):
        text = log_path.read_text()
        assert "starting: bootstrap_servers=" in text and f"model_path={model}" in text

        # one household sends half a day, then the stream moves on: an incomplete day
        asyncio.run(_produce_partial_day(settings, data.household_ids[0]))
        labels = tmp_path / "labels.csv"
        proc = meterwatch("simulate", "--households", str(HOUSEHOLDS), "--days", "4",
                          "--start", START.isoformat(), "--anomaly-rate", "0.25",
                          "--malformed-every", "300", "--seed", "5", "--labels", str(labels),
                          env=env)  # bootstrap servers and topic from METERWATCH_* only
        assert proc.returncode == 0, proc.stderr
        assert f"to {settings.input_topic}" in proc.stdout
        injected = list(csv.DictReader(labels.open()))
        assert injected and set(injected[0]) == {"household_id", "date", "anomaly"}

        closed_days = HOUSEHOLDS * 3  # the 4th day stays open: no later reading closes it
        scores = asyncio.run(read_topic(settings, settings.scores_topic,
                                        min_records=closed_days, timeout_s=120))
        alerts = asyncio.run(read_topic(settings, settings.alerts_topic, min_records=1))
        quality = asyncio.run(read_topic(settings, settings.data_quality_topic, min_records=1))
        dead = asyncio.run(read_topic(settings, settings.dead_letter_topic, min_records=1))
        # prometheus-client's standard process metrics, for the service and its scorer
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        for name in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                     "meterwatch_scorer_process_resident_memory_bytes",
                     "meterwatch_scorer_process_cpu_seconds_total"):
            assert any(line.startswith(name + " ") for line in metrics.splitlines()), name

    assert len([s for s in scores if s["household_id"].startswith("SYN")]) >= closed_days
    _validate(scores, "day_score")
    _validate(alerts, "alert")
    _validate(quality, "data_quality")
    _validate(dead, "dead_letter")
    assert alerts, "no alerts"
    truth = {(r["household_id"], r["date"]) for r in injected}
    hits = [a for a in alerts if (a["household_id"], a["date"]) in truth]
    assert hits, (alerts, truth)
    for a in alerts:
        assert a["severity"] in ("low", "medium", "high") and a["where"]
        assert a["score"] == round(a["score"], 4) and a["threshold"] == round(a["threshold"], 4)
        assert dt.datetime.fromisoformat(a["created_at"]).tzinfo is not None
        for span in a["where"]:
            assert f"{span['signal']} " in a["summary"] and span["from"] in a["summary"]
    assert any(q["kind"] == "incomplete_day" and q["household_id"] == data.household_ids[0]
               for q in quality), quality



async def _produce_partial_day(settings: Settings, household: str) -> None:
    """12 readings of the day before the simulated ones (then nothing of that day)."""
    producer = AIOKafkaProducer(**settings.kafka_options(), acks="all")
    await producer.start()
    try:
        day = START - dt.timedelta(days=1)
        for slot in range(12):
            ts = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc) + \
                dt.timedelta(minutes=30 * slot)
            value = orjson.dumps({"household_id": household,
                                  "ts": ts.isoformat().replace("+00:00", "Z"), "kwh": 0.3})
            await producer.send_and_wait(settings.input_topic, value, key=household.encode())
    finally:
        await producer.stop()


def test_simulate_rate_and_duration(broker: Broker, tmp_path: Path) -> None:
    env = service_env(broker, uuid.uuid4().hex[:8])
    settings = settings_of(env)
    asyncio.run(create_topics(settings.bootstrap_servers, {settings.input_topic: 2}))
    t0 = time.monotonic()
    proc = meterwatch("simulate", "--households", "50", "--days", "30", "--rate", "1000",
                      "--duration", "3", "--labels", str(tmp_path / "l.csv"), env=env)
    assert proc.returncode == 0, proc.stderr
    produced = int(proc.stdout.split("produced ")[1].split(" readings")[0].replace(",", ""))
    assert 0 < produced <= 1000 * 3 + 50, proc.stdout  # never faster than --rate
    assert time.monotonic() - t0 < 120


def test_simulate_recorded_data(history, broker: Broker,  # type: ignore[no-untyped-def]
                                tmp_path: Path) -> None:
    """`simulate --data` sends the recorded readings of a folder (the days asked for), every
    one exactly once and as recorded, except on the days its labels file lists."""
    data, folder = history
    env = service_env(broker, uuid.uuid4().hex[:8])
    settings = settings_of(env)
    asyncio.run(create_topics(settings.bootstrap_servers, {settings.input_topic: 4}))
    first = START - dt.timedelta(days=HISTORY)
    start = first + dt.timedelta(days=5)
    labels = tmp_path / "labels.csv"
    proc = meterwatch("simulate", "--data", str(folder), "--start", start.isoformat(),
                      "--days", "3", "--anomaly-rate", "0.2", "--labels", str(labels), env=env)
    assert proc.returncode == 0, proc.stderr
    injected = {(r["household_id"], r["date"]) for r in csv.DictReader(labels.open())}
    assert injected and {d for _, d in injected} <= {
        (start + dt.timedelta(days=i)).isoformat() for i in range(3)}
    sent = asyncio.run(_raw_readings(settings, 40 * 3 * 48))
    assert len(sent) == HOUSEHOLDS * 3 * 48, len(sent)  # each once: the keys below are unique
    for (hid, ts), kwh in sent.items():
        date = ts[:10]
        if (hid, date) in injected:
            continue
        h = data.household_ids.index(hid)
        d = (dt.date.fromisoformat(date) - first).days
        slot = int(ts[11:13]) * 2 + int(ts[14:16]) // 30
        assert kwh == pytest.approx(float(data.kwh[h, d, slot]), abs=1e-3), (hid, ts)
    assert f"produced {HOUSEHOLDS * 3 * 48:,} readings" in proc.stdout, proc.stdout

    bad = meterwatch("simulate", "--data", str(folder), "--start", "2030-01-01", env=env)
    last = bad.stderr.strip().splitlines()[-1]  # after the loader's line of what it read
    assert bad.returncode == 2 and bad.stderr.count("error") == 1, bad.stderr
    assert last.startswith("meterwatch: error: --start: the data ends on 2013-"), last
    assert "before 2030-01-01; give an earlier --start" in last, last


async def _raw_readings(settings: Settings, expected: int) -> dict[tuple[str, str], float]:
    """(household, ts) -> kWh of every reading on the input topic (single or in arrays)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(settings.input_topic, bootstrap_servers=settings.bootstrap_servers,
                                group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    out: dict[tuple[str, str], float] = {}
    n = 0
    try:
        deadline = time.monotonic() + 60
        while n < expected and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                for r in recs:
                    doc = orjson.loads(r.value)
                    for one in doc if isinstance(doc, list) else [doc]:
                        out[(one["household_id"], one["ts"])] = one["kwh"]
                        n += 1
    finally:
        await consumer.stop()
    assert n == len(out), (n, len(out))  # no reading sent twice
    return out
