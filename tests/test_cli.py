"""The ``meterwatch`` console script as a user runs it: versions, help, settings errors,
secrets, checkpoints, misuse. Every command goes through the installed script in a
subprocess; none of these need a broker (``test_cli_pipeline.py`` has the ones that do)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import (
    SECRET,
    clean_env,
    meterwatch,
    one_line_error,
    stderr_until,
)


def test_version_and_help() -> None:
    proc = meterwatch("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"meterwatch {version('meterwatch')}"
    top = meterwatch("--help")
    assert top.returncode == 0
    for command in ("run", "train", "simulate", "demo", "evaluate", "config"):
        assert command in top.stdout
    run = meterwatch("run", "--help").stdout
    assert "(default: 65536)" in run and "METERWATCH_BATCH_MAX_SIZE" in run  # defaults, env
    assert "{auto,cpu,cuda}" in run and "{text,json}" in run  # choices
    train = meterwatch("train", "--help").stdout
    assert "(default: 200)" in train and "{default,reference}" in train
    sim = meterwatch("simulate", "--help").stdout
    assert "--rate" in sim and "--duration" in sim and "--sasl-password" in sim


@pytest.mark.parametrize("args,env,flag", [
    # the command: SASL_SSL without a mechanism
    (["--sasl-password", SECRET, "--sasl-username", "u", "--security-protocol", "SASL_SSL"],
     {}, "--sasl-mechanism"),
    # SASL settings with PLAINTEXT: contradictory, an error (it used to be ignored)
    (["--sasl-password", SECRET, "--sasl-username", "u"], {}, "--sasl-"),
    (["--sasl-password", SECRET, "--sasl-username", "u", "--sasl-mechanism", "PLAIN",
      "--security-protocol", "PLAINTEXT"], {}, "--sasl-"),
    # the same through the environment
    ([], {"METERWATCH_SASL_PASSWORD": SECRET, "METERWATCH_SASL_USERNAME": "u",
          "METERWATCH_SECURITY_PROTOCOL": "SASL_SSL"}, "--sasl-mechanism"),
    ([], {"METERWATCH_SASL_PASSWORD": SECRET}, "--sasl-password"),
    # a password in the wrong type of field is still not echoed
    (["--sasl-username", SECRET, "--security-protocol", "SASL_SSL", "--sasl-mechanism",
      "PLAIN"], {}, "--sasl-password"),
    (["--security-protocol", SECRET], {}, "--security-protocol"),
    ([], {"METERWATCH_SASL_PASSWORD": SECRET, "METERWATCH_SASL_USERNAME": "u",
          "METERWATCH_SASL_MECHANISM": "PLAIN", "METERWATCH_SECURITY_PROTOCOL": "SASL_SSL",
          "METERWATCH_BATCH_MAX_SIZE": "x"}, "--batch-max-size"),
])
def test_secrets_never_printed(args: list[str], env: dict[str, str], flag: str) -> None:
    for command in ("config", "run"):
        proc = meterwatch(command, *args, "--metrics-port", "0", env=clean_env(**env))
        line = one_line_error(proc)
        assert flag in line, line
        everything = proc.stdout + proc.stderr
        assert SECRET[:3] not in everything, everything  # not even its first characters


def test_valid_secret_is_masked(tiny_model: Path) -> None:
    sasl = ["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-512",
            "--sasl-username", "meterwatch", "--sasl-password", SECRET]
    proc = meterwatch("config", *sasl)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["sasl_password"] == "**********" and cfg["sasl_username"] == "meterwatch"
    assert SECRET not in proc.stdout + proc.stderr
    # the start-up line of `run` lists the effective settings with the secret masked (a
    # run that passed its checks: it would go on to connect, so it is stopped there)
    stderr = stderr_until(["run", *sasl, "--model-path", str(tiny_model), "--metrics-port",
                           "0", "--log-format", "json"], "starting")
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    start = [r for r in logs if "starting" in r["message"]]
    assert start and "sasl_password=***" in start[0]["message"], logs
    assert "bootstrap_servers=127.0.0.1:9092" in start[0]["message"]
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in logs)
    assert SECRET not in stderr


@pytest.mark.parametrize("args,env,expect", [
    (["--batch-max-size", "0"], {}, "--batch-max-size: input should be greater than"),
    ([], {"METERWATCH_BATCH_MAX_SIZE": "0"},
     "--batch-max-size (from METERWATCH_BATCH_MAX_SIZE)"),
    (["--device", "gpu"], {}, "--device: not one of the allowed values; choose one of auto"),
    (["--timezone", "Europe/Londn"], {}, "--timezone: unknown time zone 'Europe/Londn'"),
    ([], {"METERWATCH_TIMEZONE": "Mars/Olympus"}, "--timezone"),
    (["--ssl-cafile", "/nonexistent/ca.pem", "--security-protocol", "SSL"], {},
     "--ssl-cafile: no such file"),
    (["--ssl-cafile", "/nonexistent/ca.pem"], {}, "--ssl-cafile: TLS files are given but"),
    (["--no-such-flag", "1"], {}, "unrecognized arguments: --no-such-flag"),
])
def test_settings_errors_name_the_flag(args: list[str], env: dict[str, str],
                                       expect: str) -> None:
    for command in ("config", "run"):
        line = one_line_error(meterwatch(command, *args, "--metrics-port", "0",
                                         env=clean_env(**env)))
        assert expect in line, line
        assert "batch_max_size" not in line and "input_value" not in line


def test_config_markdown_and_defaults() -> None:
    proc = meterwatch("config")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["bootstrap_servers"] == "127.0.0.1:9092" and cfg["log_format"] == "text"
    table = meterwatch("config", "--markdown").stdout
    assert "| `--log-format` | `METERWATCH_LOG_FORMAT` | `text` |" in table
    # the README's configuration table is this table (a new or changed setting shows there)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert table.strip() in readme, "README.md: paste `meterwatch config --markdown`"


def test_checkpoint_errors_are_one_line(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = torch.load(tiny_model, map_location="cpu", weights_only=True)
    assert ckpt["meterwatch_version"] == version("meterwatch")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint" * 100)
    other = tmp_path / "other.pt"
    torch.save({"format": 999}, other)
    for path in (truncated, garbage, other, tmp_path / "missing.pt"):
        line = one_line_error(meterwatch("run", "--model-path", str(path),
                                         "--metrics-port", "0"))
        assert str(path) in line and "meterwatch train" in line, line
    line = one_line_error(meterwatch("run", "--metrics-port", "0"))
    assert "--model-path" in line


def test_train_misuse(tmp_path: Path) -> None:
    assert "--synthetic --data is required" in one_line_error(meterwatch("train", "--out", "x"))
    line = one_line_error(meterwatch("train", "--data", str(tmp_path / "nope"), "--out", "x"))
    assert str(tmp_path / "nope") in line
    bad = tmp_path / "readings.csv"
    bad.write_text("LCLid,tstp,energy(kWh/hh)\nMAC000002,2013-01-01 00:00:00, 0.1 \n"
                   "MAC000002,2013-01-01 00:30:00\n")
    line = one_line_error(meterwatch("train", "--data", str(bad), "--out", "x.pt"))
    assert f"{bad}:3: expected 3 fields" in line
    line = one_line_error(meterwatch("train", "--data", str(tmp_path), "--out", "x.pt"))
    assert f"{bad}:3:" in line  # the folder's CSV, by name and line
    bad.write_text("LCLid,tstp,energy(kWh/hh)\nMAC000002,2013-01-01 00:00:00, 0.1 \n")
    line = one_line_error(meterwatch("train", "--data", str(bad), "--out", "x.pt",
                                     "--until", "01/02/2013"))
    assert "--until" in line and "YYYY-MM-DD" in line
    line = one_line_error(meterwatch("train", "--data", str(bad), "--out", "x.pt",
                                     "--weather", str(tmp_path / "w.csv")))
    assert "w.csv: no such file" in line
    assert "invalid choice" in one_line_error(meterwatch("train", "--synthetic", "--out", "x",
                                                         "--device", "tpu"))
    assert "invalid choice" in one_line_error(meterwatch("fly"))


def test_run_without_a_model_is_one_line() -> None:
    line = one_line_error(meterwatch("run", env=clean_env(METERWATCH_METRICS_PORT="0")))
    assert line.startswith("meterwatch: error: --model-path: ") and "meterwatch train" in line


def test_evaluate_and_simulate_misuse(tmp_path: Path) -> None:
    line = one_line_error(meterwatch("evaluate", "--data", str(tmp_path / "nope"), "--out",
                                     str(tmp_path / "out")))
    assert "--data: no such file or folder" in line
    # data too short for the default periods (its last quarter, the twelfth before) names
    # the flags
    from meterwatch.model import SyntheticConfig, generate
    from tests.cli_helpers import write_layout

    folder = write_layout(generate(SyntheticConfig(n_households=4, n_days=10, seed=3)),
                          "folder", tmp_path / "short")
    line = one_line_error(meterwatch("evaluate", "--data", str(folder), "--out",
                                     str(tmp_path / "out")))
    assert "--calib-start/--test-start" in line and "too few household-days" in line
    empty = tmp_path / "empty"  # a header and nothing else: one line, not numpy's error
    empty.mkdir()
    (empty / "readings.csv").write_text("LCLid,tstp,energy(kWh/hh)\n")
    line = one_line_error(meterwatch("evaluate", "--data", str(empty), "--out",
                                     str(tmp_path / "out")))
    assert line.startswith("meterwatch: error: --data: no readings in it"), line
    line = one_line_error(meterwatch("simulate", "--rate", "-5"))
    assert "--rate" in line
    line = one_line_error(meterwatch("simulate", "--start", "March"))
    assert "--start" in line
    line = one_line_error(meterwatch("simulate", "--sasl-password", SECRET))
    assert "--sasl-password" in line and SECRET not in line
    from meterwatch.stream.broker import free_port

    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc = meterwatch("simulate", "--bootstrap-servers", nobody, "--households", "2",
                      "--days", "1", timeout=180)
    line = one_line_error(proc)
    assert f"--bootstrap-servers: cannot connect to {nobody}" in line
    assert "Unclosed" not in proc.stderr


def test_schemas_import_without_torch() -> None:
    code = ("import sys\n"
            "from meterwatch.stream.schemas import SCHEMA_NAMES, load_schema\n"
            "import meterwatch.stream.events\n"
            "assert all(load_schema(n)['type'] == 'object' for n in SCHEMA_NAMES)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_shipped_schemas_match_the_record_classes() -> None:
    from meterwatch.stream.events import OUTPUT_RECORDS, json_schema
    from meterwatch.stream.schemas import SCHEMA_NAMES, load_schema

    assert set(SCHEMA_NAMES) == set(OUTPUT_RECORDS)
    for name in SCHEMA_NAMES:
        assert load_schema(name) == json_schema(name), (
            f"stream/schemas/{name}.schema.json is stale: python -m meterwatch.stream.events")


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """What `meterwatch demo` / `evaluate` / `train --plot` print when their extra is not
    installed (the real extras are installed here, so a missing module is named instead)."""
    from meterwatch.stream import cli

    monkeypatch.setitem(cli._EXTRA_MODULES, "demo", ("no_such_module_for_demo",))
    monkeypatch.setitem(cli._EXTRA_MODULES, "eval", ("no_such_module_for_eval",))
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err.strip() == (
        "meterwatch: error: meterwatch demo needs no_such_module_for_demo: "
        "pip install 'meterwatch[demo]'")
    assert cli.main(["evaluate", "--data", ".", "--out", "x"]) == 2
    assert "pip install 'meterwatch[eval]'" in capsys.readouterr().err
    assert cli.main(["train", "--synthetic", "--out", "x.pt", "--plot", "p.png"]) == 2
    assert "--plot needs no_such_module_for_eval" in capsys.readouterr().err


def test_aiokafkas_repeated_lines_are_held_back() -> None:
    """While a broker restarts aiokafka logs each failed attempt (about 2,000 ERROR lines in
    40 s); the CLI's logging passes each kind once per window and then says how many it
    held back. SASL PLAIN without TLS: "Sending username and password in the clear" on
    every connection (20 lines at each start on Kafka 4.0), once. Other loggers untouched."""
    code = ("import logging, time\n"
            "from meterwatch.stream.cli import AiokafkaRepeats, setup_logging\n"
            "AiokafkaRepeats.WINDOW_S = 0.5\n"
            "setup_logging(); setup_logging()\n"
            "conn, client = logging.getLogger('aiokafka.conn'), logging.getLogger('aiokafka')\n"
            "for i in range(50):\n"
            "    conn.warning('Sending username and password in the clear')\n"
            "    client.error('Unable connect to node with id %s: %s', 1, i)\n"
            "    logging.getLogger('meterwatch.x').warning('ours %d', i)\n"
            "time.sleep(0.6)\n"
            "conn.warning('Sending username and password in the clear')\n"
            "client.error('Unable connect to node with id %s: %s', 1, 'last')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stderr
    assert err.count("Sending username and password in the clear") == 1, err
    lines = [line.split(" aiokafka: ", 1)[1] for line in err.splitlines()
             if " aiokafka: " in line]
    assert lines[0] == "Unable connect to node with id 1: 0", lines
    assert lines[1].startswith("Unable connect to node with id 1: last (and 49 more like it "
                               "in the last "), lines
    assert len(lines) == 2, lines
    assert err.count(" meterwatch.x: ours ") == 50
