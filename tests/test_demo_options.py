"""``meterwatch demo`` with an option it cannot run with: one line naming the flag, exit 2,
before a broker is started or a model trained."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.cli_helpers import meterwatch, one_line_error


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
