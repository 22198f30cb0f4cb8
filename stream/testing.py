"""``meterwatch run`` in a subprocess, for tests and benchmarks that need the real CLI.

Settings travel as ``METERWATCH_*`` environment variables, exactly as a deployment passes
them; the metrics port is picked free. ``kill`` SIGKILLs the service and reports any child
(the scorer process) that outlived it. ``cli_env`` is the environment of a ``meterwatch run``
given only what a deployment names (the rest default), for the console script; ``ready``
probes ``/readyz``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from meterwatch.stream.broker import free_port
from meterwatch.stream.config import Settings


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without METERWATCH_* (the caller sets its own), plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERWATCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cli_env(broker: Any, tag: str, **extra: str) -> dict[str, str]:
    """``clean_env`` with METERWATCH_* variables for a ``meterwatch run`` of its own on
    ``broker`` (a ``stream.broker.Broker``): topics and group named after ``tag``,
    everything else default (idempotence off only where the broker has none)."""
    topics = {"INPUT_TOPIC": f"readings-{tag}", "ALERTS_TOPIC": f"alerts-{tag}",
              "SCORES_TOPIC": f"scores-{tag}", "DEAD_LETTER_TOPIC": f"dlq-{tag}",
              "DATA_QUALITY_TOPIC": f"dq-{tag}", "STATE_TOPIC": f"state-{tag}"}
    env = {f"METERWATCH_{k}": v for k, v in topics.items()}
    env["METERWATCH_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
    env["METERWATCH_GROUP_ID"] = f"mw-cli-{tag}"
    if not broker.supports_idempotence:
        env["METERWATCH_IDEMPOTENCE"] = "off"
    return clean_env(**env, **extra)


def ready(port: int) -> bool:
    """Whether the service on ``port`` answers ``/readyz`` with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def service_env(settings: Settings, model_path: Path, port: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``meterwatch run`` with these settings (``extra`` last)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, value in settings.model_dump().items():
        if value is not None and name not in ("metrics_port", "model_path"):
            env[f"METERWATCH_{name.upper()}"] = str(value)
    env["METERWATCH_METRICS_PORT"] = str(port)
    env["METERWATCH_MODEL_PATH"] = str(model_path)
    env.update(extra or {})
    return env


@dataclass
class ServiceProcess:
    """A ``meterwatch run`` subprocess, killable at any moment."""

    settings: Settings
    model_path: Path
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    children_at_kill: int = 0
    exit_seconds: float | None = None  # how long the last terminate() took

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> ServiceProcess:
        self.port = free_port()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path or os.devnull, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meterwatch.stream.cli", "run"],
            env=service_env(self.settings, self.model_path, self.port, self.env),
            stdout=log, stderr=subprocess.STDOUT)
        return self

    def ready(self) -> bool:
        return ready(self.port)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            if self.ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"service not ready after {timeout_s:.0f} s; see {self.log_path}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout_s``); the exit code."""
        assert self.proc is not None
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_seconds = time.perf_counter() - t0
        return self.proc.returncode

    def kill(self) -> list[int]:
        """SIGKILL the service; the pids of its children (its scorer process) still alive
        10 s later, which are then killed (there should be none)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.children_at_kill = len(children)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            p.kill()
        return [p.pid for p in alive]
