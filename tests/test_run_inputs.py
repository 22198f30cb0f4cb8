"""``meterwatch run`` with input files that are missing or unusable: exit 2, one line that
names the flag (the installed console script, default settings, no broker needed: the
files are checked before any client is built), and nothing else on stderr: no settings
line, no probes server, no model log line before it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from meterwatch.model import Detector
from tests.cli_helpers import (
    FORBID_CUDA,
    clean_env,
    meterwatch,
    one_line_error,
    stderr_until,
)

#: Nothing listens there: a run that got past its checks would retry, not connect.
NO_BROKER = {"METERWATCH_BOOTSTRAP_SERVERS": "127.0.0.1:1", "METERWATCH_METRICS_PORT": "0"}


def only_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The error line of a run refused before it started: exit 2, and stderr is that one
    line (nothing logged before it, nothing after)."""
    line = one_line_error(proc)
    assert proc.stderr.splitlines() == [line], proc.stderr
    assert proc.stdout == "", proc.stdout
    return line


@pytest.mark.parametrize("flag", ["--model-path", "--shadow-model-path", "--household-info",
                                  "--weather", "--holidays"])
def test_missing_input_file_names_its_flag(flag: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.file"
    model = tmp_path / "model.pt"  # also missing: the flag under test must be the one named
    args = ["run", "--model-path", str(missing if flag == "--model-path" else model)]
    if flag != "--model-path":
        model.write_bytes(b"not read: the missing file is found first")
        args += [flag, str(missing)]
    proc = meterwatch(*args, env=clean_env(**NO_BROKER))
    line = only_line(proc)  # found before anything started
    assert line.startswith(f"meterwatch: error: {flag}: {missing} does not exist"), line
    assert "; " in line  # ... and how to fix it


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    line = only_line(meterwatch("run", "--model-path", str(tmp_path),
                                env=clean_env(**NO_BROKER)))
    assert line.startswith(f"meterwatch: error: --model-path: {tmp_path} "), line


@pytest.fixture(scope="module")
def broken_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, Path]:
    """Checkpoints that exist but cannot serve: not a checkpoint at all, a truncated one,
    one whose weights are NaN (it loads: only scoring shows it), and a good one without a
    calibration curve (usable, but not with --target-far)."""
    folder = tmp_path_factory.mktemp("broken-models")
    garbage = folder / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 50)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(tiny_model.read_bytes()[:2000])
    ckpt = Detector.load(tiny_model, device="cpu").checkpoint()
    for tensor in ckpt["state_dict"].values():
        tensor.fill_(float("nan"))
    torch.save(ckpt, folder / "nan.pt")
    ckpt = Detector.load(tiny_model, device="cpu").checkpoint()
    del ckpt["far_curve"]
    ckpt["version"] = "no-curve"
    torch.save(ckpt, folder / "nocurve.pt")
    return {"garbage": garbage, "truncated": truncated, "nan": folder / "nan.pt",
            "nocurve": folder / "nocurve.pt"}


def test_unusable_checkpoint_names_model_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 50)
    line = only_line(meterwatch("run", "--model-path", str(garbage),
                                env=clean_env(METERWATCH_METRICS_PORT="0")))
    assert line.startswith(f"meterwatch: error: --model-path: {garbage}: not a usable "), line
    assert line.endswith("give a checkpoint written by meterwatch train"), line
    assert len(line) < 300, line  # torch's paragraph-long unpickling error is cut to a sentence


@pytest.mark.parametrize("kind", ["garbage", "truncated", "nan"])
@pytest.mark.parametrize("flag", ["--model-path", "--shadow-model-path"])
def test_a_checkpoint_that_cannot_serve_is_refused_before_anything_starts(
        flag: str, kind: str, tiny_model: Path, broken_models: dict[str, Path]) -> None:
    bad = broken_models[kind]
    args = ["run", "--model-path", str(bad if flag == "--model-path" else tiny_model)]
    if flag == "--shadow-model-path":
        args += [flag, str(bad)]
    line = only_line(meterwatch(*args, env=clean_env(**NO_BROKER), timeout=120))
    assert line.startswith(f"meterwatch: error: {flag}: {bad}: "), line
    why = {"garbage": "not a usable meterwatch checkpoint (UnpicklingError",
           "truncated": "not a usable meterwatch checkpoint (",
           "nan": "reconstructs synthetic days to non-finite values"}[kind]
    assert why in line, line
    assert "give a checkpoint written by meterwatch train" in line, line


def test_target_far_needs_a_curve_and_says_so_before_anything_starts(
        broken_models: dict[str, Path]) -> None:
    nocurve = broken_models["nocurve"]
    line = only_line(meterwatch("run", "--model-path", str(nocurve), "--target-far", "0.01",
                                env=clean_env(**NO_BROKER), timeout=120))
    assert line == ("meterwatch: error: --target-far: the checkpoint no-curve has no "
                    "calibration curve, so it cannot take --target-far 0.01; retrain it with "
                    "this version of meterwatch train, or leave --target-far out (the "
                    "checkpoint's own threshold)"), line


def test_a_usable_shadow_without_a_curve_still_starts(tiny_model: Path,
                                                      broken_models: dict[str, Path]) -> None:
    """The shadow keeps its own threshold (a warning), so the checks let it through: the run
    gets as far as retrying the absent broker, which proves the refusals above are not a
    check that refuses everything."""
    stderr = stderr_until(["run", "--model-path", str(tiny_model), "--shadow-model-path",
                           str(broken_models["nocurve"]), "--target-far", "0.01",
                           "--scorer", "thread"], "broker not reachable",
                          env=clean_env(**NO_BROKER))
    assert "meterwatch: error:" not in stderr, stderr
    assert "the shadow model no-curve has no calibration curve" in stderr, stderr
    assert "metrics and probes on" in stderr, stderr


_NO_CUDA = FORBID_CUDA + textwrap.dedent("""
    from meterwatch.stream.cli import main

    good, nan = sys.argv[1:3]
    assert main(["run", "--model-path", good, "--shadow-model-path", nan]) == 2
    from meterwatch.stream.config import Settings
    from meterwatch.stream.preflight import check_inputs

    check_inputs(Settings(model_path=good, shadow_model_path=good, target_far=0.01)).close()
    assert not touched and not torch.cuda.is_initialized(), touched
    print("ok")
""")


def test_the_checks_never_touch_the_gpu(tiny_model: Path, broken_models: dict[str, Path]) -> None:
    """The checkpoints are checked in the service process, which never creates a CUDA
    context (the scorer process owns the device, docs/gpu.md): with a GPU 'present' and
    --device auto, loading and validating both models stays on the CPU."""
    out = subprocess.run([sys.executable, "-c", _NO_CUDA, str(tiny_model),
                          str(broken_models["nan"])], capture_output=True, text=True,
                         timeout=120, env=clean_env(CUDA_VISIBLE_DEVICES="0"), check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "--shadow-model-path" in out.stderr  # the refusal was the NaN shadow's


@pytest.mark.parametrize(("flag", "header"), [("--weather", "a,b"),
                                              ("--household-info", "LCLid,x"),
                                              ("--holidays", "a,b")])
def test_unusable_context_csv_names_its_flag(flag: str, header: str, tiny_model: Path,
                                             tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{header}\n1,2\n")
    line = only_line(meterwatch("run", "--model-path", str(tiny_model), flag, str(bad),
                                env=clean_env(**NO_BROKER)))
    assert line.startswith(f"meterwatch: error: {flag}: {bad}:1: missing column "), line
    # the fix names the plain layout a utility writes, and the Low Carbon London one
    plain = {"--weather": "date,temp_max,temp_min in °C", "--household-info":
             "household_id,tariff,group", "--holidays": "a date column"}[flag]
    assert f"give a CSV of {plain} (or Low Carbon London's " in line, line
    assert line.endswith("or leave it out"), line


@pytest.mark.parametrize("flag", ["--weather", "--household-info", "--holidays"])
def test_a_binary_file_given_as_a_csv_names_its_flag(flag: str, tiny_model: Path) -> None:
    """A checkpoint passed where a CSV goes (was: "meterwatch: error: 'utf-8' codec can't
    decode byte 0x80 in position 64", naming neither the flag nor the file)."""
    line = only_line(meterwatch("run", "--model-path", str(tiny_model), flag, str(tiny_model),
                                env=clean_env(**NO_BROKER)))
    assert line.startswith(f"meterwatch: error: {flag}: {tiny_model}: not a text CSV ("), line
    assert "Low Carbon London" in line and line.endswith("or leave it out"), line
