"""``meterwatch demo``: the README's first command, smaller; and with an option it cannot
run with, one line naming the flag, exit 2, before a broker is started or a model trained.

Not marked ``integration``: the demo starts its own embedded broker whatever the test
session's broker is, so CI's second pass (on Apache Kafka) would only run it again."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.cli_helpers import clean_env, meterwatch, one_line_error


@pytest.mark.parametrize(("args", "starts"), [
    (["--households", "-3"], "--households: must be at least 1"),
    (["--households", "0"], "--households: must be at least 1"),
    (["--history-days", "0"], "--history-days: must be at least 1"),
    (["--stream-days", "0"], "--stream-days: must be at least 1"),
    (["--metrics-port", "70000"], "--metrics-port: must be a TCP port"),
])
def test_demo_option_it_cannot_run_with(args: list[str], starts: str, tmp_path: Path) -> None:
    proc = meterwatch("demo", *args, cwd=tmp_path, timeout=300)
    line = one_line_error(proc)
    assert line.startswith(f"meterwatch: error: {starts}"), line
    assert "starting a Kafka-protocol broker" not in proc.stdout, proc.stdout
    assert not (tmp_path / "artifacts").exists()  # nothing trained


def test_demo_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        proc = meterwatch("demo", "--metrics-port", str(port), cwd=tmp_path, timeout=300)
    line = one_line_error(proc)
    assert line.startswith(f"meterwatch: error: --metrics-port: 127.0.0.1:{port} is already "
                           "in use"), line
    assert "starting a Kafka-protocol broker" not in proc.stdout, proc.stdout


def test_demo_on_a_cluster_that_is_not_there(tmp_path: Path) -> None:
    """KAFKA_BOOTSTRAP_SERVERS (a common name) left over from another session, naming a
    broker that has stopped: the demo ended in aiokafka's traceback after training."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]  # free once closed: nothing listens there
    proc = meterwatch("demo", cwd=tmp_path, timeout=300,
                      env=clean_env(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}"))
    line = one_line_error(proc)
    assert line == (f"meterwatch: error: KAFKA_BOOTSTRAP_SERVERS: nothing answers at "
                    f"127.0.0.1:{port} (the demo runs on the cluster this variable names); "
                    "unset it to run the demo on its own embedded broker, or start that "
                    "cluster"), line
    assert not (tmp_path / "artifacts").exists()  # before training


def test_demo(tmp_path: Path) -> None:
    """`meterwatch demo` (the README's first command, smaller): its own broker, train,
    stream, summary, exit 0 only when every day was scored."""
    proc = meterwatch("demo", "--households", "30", "--history-days", "14", "--stream-days",
                      "3", "--quiet-alerts", cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "days scored           90 of 90" in proc.stdout, proc.stdout
    dead = next(line for line in proc.stdout.splitlines() if line.startswith("dead-lettered"))
    produced = int(dead.split("malformed produced: ")[1].rstrip(")"))
    assert dead.split()[2] == str(produced), dead
    assert (tmp_path / "artifacts" / "demo-model.pt").exists()
