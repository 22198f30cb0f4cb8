"""``meterwatch run`` with input files that are missing or unusable: exit 2, one line that
names the flag (the installed console script, default settings, no broker needed: the
files are checked before any client is built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import clean_env, meterwatch, one_line_error, tiny_checkpoint


@pytest.mark.parametrize("flag", ["--model-path", "--shadow-model-path", "--household-info",
                                  "--weather", "--holidays"])
def test_missing_input_file_names_its_flag(flag: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.file"
    model = tmp_path / "model.pt"  # also missing: the flag under test must be the one named
    args = ["run", "--model-path", str(missing if flag == "--model-path" else model)]
    if flag != "--model-path":
        model.write_bytes(b"not read: the missing file is found first")
        args += [flag, str(missing)]
    proc = meterwatch(*args, env=clean_env(METERWATCH_METRICS_PORT="0"))
    line = one_line_error(proc)
    assert line.startswith(f"meterwatch: error: {flag}: {missing} does not exist"), line
    assert "; " in line  # ... and how to fix it
    assert "metrics and probes on" not in proc.stderr  # found before anything started


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    line = one_line_error(meterwatch("run", "--model-path", str(tmp_path),
                                     env=clean_env(METERWATCH_METRICS_PORT="0")))
    assert line.startswith(f"meterwatch: error: --model-path: {tmp_path} "), line


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run-inputs") / "tiny.pt")


def test_unusable_checkpoint_names_model_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 50)
    line = one_line_error(meterwatch("run", "--model-path", str(garbage),
                                     env=clean_env(METERWATCH_METRICS_PORT="0")))
    assert line.startswith(f"meterwatch: error: --model-path: {garbage}: not a usable "), line
    assert line.endswith("give a checkpoint written by meterwatch train"), line
    assert len(line) < 300, line  # torch's paragraph-long unpickling error is cut to a sentence


@pytest.mark.parametrize(("flag", "header"), [("--weather", "a,b"),
                                              ("--household-info", "LCLid,x"),
                                              ("--holidays", "a,b")])
def test_unusable_context_csv_names_its_flag(flag: str, header: str, tiny_model: Path,
                                             tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{header}\n1,2\n")
    line = one_line_error(meterwatch("run", "--model-path", str(tiny_model), flag, str(bad),
                                     env=clean_env(METERWATCH_METRICS_PORT="0")))
    assert line.startswith(f"meterwatch: error: {flag}: {bad}:1: missing column "), line
    assert "Low Carbon London" in line and "leave it out" in line
