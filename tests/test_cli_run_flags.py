"""``meterwatch run`` flags given bad values as a user types them: each ends with exit
status 2 and stderr that is exactly one line, ``meterwatch: error: <flag>: ...; <fix>``,
before anything started (no settings line, no probes server, no Kafka client). Before
these checks, the values below gave a traceback (``--log-level debug``, ``--device cuda``
without CUDA), a line naming no flag (``[Errno -2] Name or service not known``, ``invalid
literal for int()``), or were taken and retried against forever (``--bootstrap-servers
b1:9092,,b2:9092``, ``--group-id ""``), taken silently (``--grace-s inf``, ``--commit-interval-s
inf``, ``--alerts-topic`` the input topic: the service would read its own alerts back as
readings; ``--fetch-max-wait-ms 60000``: every fetch on a quiet partition timed out), or
reported as something else 10 s later (``--input-topic 'meter readings'``:
"topic does not exist"; an output topic name Kafka refuses: "has 0 partitions")."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterwatch.stream.errors import ConfigurationError
from meterwatch.stream.preflight import check_bootstrap
from tests.cli_helpers import clean_env, meterwatch, one_line_error

#: Nothing listens there: a run that got past its checks would retry, not connect.
NO_BROKER = {"METERWATCH_BOOTSTRAP_SERVERS": "127.0.0.1:1", "METERWATCH_METRICS_PORT": "0"}


def only_line(proc: subprocess.CompletedProcess[str]) -> str:
    line = one_line_error(proc)
    assert proc.stderr.splitlines() == [line], proc.stderr
    return line


def run(model: Path, *args: str, **env: str) -> str:
    return only_line(meterwatch("run", "--model-path", str(model), *args,
                                env=clean_env(**{**NO_BROKER, **env}), timeout=120))


@pytest.mark.parametrize(("args", "env", "expect"), [
    (["--log-level", "debug"], {},
     "--log-level: not one of the allowed values; choose one of DEBUG, INFO, WARNING, ERROR"),
    ([], {"METERWATCH_LOG_LEVEL": "trace"}, "--log-level (from METERWATCH_LOG_LEVEL): not one"),
    (["--grace-s", "inf"], {}, "--grace-s: input should be a finite number"),
    (["--commit-interval-s", "Infinity"], {}, "--commit-interval-s: input should be a finite"),
    (["--shutdown-timeout-s", "inf"], {}, "--shutdown-timeout-s: input should be a finite"),
    (["--target-far", "nan"], {}, "--target-far: input should be a finite number"),
    ([], {"METERWATCH_MAX_FUTURE_S": "inf"},
     "--max-future-s (from METERWATCH_MAX_FUTURE_S): input should be a finite number"),
    (["--model-poll-s", "-1"], {}, "--model-poll-s: input should be greater than or equal to 0"),
    (["--bootstrap-servers", "localhost:abc"], {},
     "--bootstrap-servers: 'localhost:abc' is not host:port; give a comma-separated list"),
    (["--bootstrap-servers", "b1:9092,,b2:9092"], {}, "--bootstrap-servers: '' is not host:port"),
    (["--bootstrap-servers", "b1:90920"], {}, "--bootstrap-servers: 'b1:90920' is not"),
    (["--bootstrap-servers", "::1:9092"], {}, "(an IPv6 address in brackets: [::1]:9092)"),
    (["--metrics-host", "no-such-host.invalid"], {},
     "--metrics-host: cannot resolve 'no-such-host.invalid'"),
    (["--metrics-host", "192.0.2.1"], {},  # TEST-NET-1: never an address of this machine
     "--metrics-host: cannot listen on 192.0.2.1:0 (not an address of this machine)"),
    (["--alerts-topic", "meterwatch.readings"], {},
     "--alerts-topic: 'meterwatch.readings' is also --input-topic; give each topic its own"),
    ([], {"METERWATCH_STATE_TOPIC": "meterwatch.scores"},
     "--state-topic: 'meterwatch.scores' is also --scores-topic"),
    (["--input-topic", "meter readings"], {},
     "--input-topic: 'meter readings' is not a Kafka topic name; use 1-249 letters"),
    (["--dead-letter-topic", "d" * 250], {}, "--dead-letter-topic: 'ddd"),
    (["--group-id", ""], {}, "--group-id: empty; give the consumer group a name"),
    (["--fetch-max-wait-ms", "60000"], {},  # each quiet fetch timed out (RequestTimedOutError)
     "--fetch-max-wait-ms: 60000 ms is not below the consumer's request timeout (40000 ms)"),
    # a CPU build of torch says so; a CUDA build with no GPU visible says that
    (["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "--device: cuda, but "),
])
def test_bad_value_is_one_line_before_anything_starts(tiny_model: Path, args: list[str],
                                                      env: dict[str, str], expect: str) -> None:
    line = run(tiny_model, *args, **env)
    assert expect in line, line
    assert "; " in line.removeprefix("meterwatch: error: "), line  # ... and the fix


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_metrics_port_in_use_names_the_port(tiny_model: Path, busy_port: int) -> None:
    line = run(tiny_model, "--metrics-port", str(busy_port))
    assert line == (f"meterwatch: error: --metrics-port: 0.0.0.0:{busy_port} is already in "
                    "use; stop what holds it, or choose another port (0 = any free one)"), line


def test_bootstrap_forms_that_are_fine() -> None:
    assert check_bootstrap("kafka") == [("kafka", 9092)]
    assert check_bootstrap(" b1:9092 , b2:9093") == [("b1", 9092), ("b2", 9093)]
    assert check_bootstrap("[::1]:19092,[fe80::1]") == [("::1", 19092), ("fe80::1", 9092)]
    for bad in ("", "b1:", ":9092", "b1:0", "b1:x", "[::1", "[::1]x", "fe80::1"):
        with pytest.raises(ConfigurationError, match="--bootstrap-servers"):
            check_bootstrap(bad)
