"""``pip install .`` into a fresh virtualenv, used from a folder that has its own
``model.py`` and ``stream.py`` (a notebook folder): meterwatch must import as
``meterwatch.model`` / ``meterwatch.stream`` and leave the user's modules alone.

The wheel is built from this checkout and installed without dependencies (no network, no
multi-GB torch); the dependencies come from the test interpreter's site-packages through
PYTHONPATH, which does not activate that environment's editable meterwatch (a .pth hook).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pip_install_next_to_user_model_and_stream(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(REPO))
    (wheel,) = wheels.glob("meterwatch-*.whl")
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    _run(str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    site = Path(_run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .strip())
    # the wheel claims only meterwatch/ (no top-level model/ or stream/), schemas included
    assert (site / "meterwatch" / "model" / "detector.py").exists()
    assert (site / "meterwatch" / "stream" / "schemas" / "alert.schema.json").exists()
    assert not (site / "model").exists() and not (site / "stream").exists()

    work = tmp_path / "notebook"
    work.mkdir()
    (work / "model.py").write_text("WHO = 'the user model'\n")
    (work / "stream.py").write_text("WHO = 'the user stream'\n")
    deps = sysconfig.get_paths()["purelib"]  # numpy, torch, pydantic, ... of the test env
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "PYTHONPATH": deps}
    code = ("import model, stream\n"
            "import meterwatch.model as mm, meterwatch.stream.cli as cli\n"
            "from meterwatch.model import Detector, score_frame\n"
            "from meterwatch.stream.schemas import load_schema\n"
            "print(model.WHO, '|', stream.WHO, '|', mm.__file__, '|', cli.__file__)\n"
            "assert load_schema('alert')['title'] == 'Alert'\n")
    out = _run(str(py), "-c", code, cwd=work, env=env)
    user_model, user_stream, mm_file, cli_file = (s.strip() for s in out.split("|"))
    assert user_model == "the user model" and user_stream == "the user stream"
    assert mm_file.startswith(str(site)) and cli_file.startswith(str(site)), out
    version = _run(str(env_dir / "bin" / "meterwatch"), "--version", cwd=work, env=env)
    assert version.startswith("meterwatch ")
