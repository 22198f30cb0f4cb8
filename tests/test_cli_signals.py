"""SIGTERM and SIGINT in the first seconds of ``meterwatch run``, before its settings line
(the imports of torch and aiokafka, the checks): they took their default action, exit
status 143 (SIGTERM) or 130 and sometimes a ``KeyboardInterrupt`` traceback (SIGINT), the
documented status after either signal being 0. The console script now handles both from the
first line of ``main``: the run ends quietly with status 0 at the next step of its start
(nothing has started by then), and the service's own handlers take over once installed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meterwatch.stream.errors import SIGNAL_ECHO_S, StopSignals
from tests.cli_helpers import METERWATCH, clean_env

#: Nothing listens there: a run that got past its checks would retry, not connect.
NO_BROKER = {"METERWATCH_BOOTSTRAP_SERVERS": "127.0.0.1:1", "METERWATCH_METRICS_PORT": "0"}


def caught(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for ``sig`` (``SigCgt`` in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines()
                if line.startswith("SigCgt:"))
    return bool(mask >> (int(sig) - 1) & 1)


def _interruptible() -> None:
    """SIGINT as in a terminal, also when the tests run as a background job (which ignores
    it, and a process keeps an ignored signal ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_the_settings_line_exits_0_quietly(sig: signal.Signals,
                                                           tiny_model: Path) -> None:
    """Signalled as soon as the script handles SIGTERM (the first line of ``main``; a
    Python process does not otherwise catch it): well before the settings line, which comes
    after torch is imported and the model checked (1-2 s)."""
    proc = subprocess.Popen([str(METERWATCH), "run", "--model-path", str(tiny_model)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=clean_env(**NO_BROKER), preexec_fn=_interruptible)
    try:
        deadline = time.monotonic() + 30
        while not caught(proc.pid, signal.SIGTERM):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.splitlines()[-1].endswith(
        f"INFO meterwatch: {sig.name} received before the start: stopped (nothing had "
        "started)"), stderr
    assert "starting:" not in stderr, stderr  # no settings line, no probes, no client
    assert took < 20, took  # at the next step of the start: 0.1-2.7 s measured


_HANDOVER = textwrap.dedent("""
    import asyncio, signal
    from meterwatch.stream.cli import _StartSignals

    signals = _StartSignals()
    signal.raise_signal(signal.SIGTERM)   # after the last check, before the service's own
    got = []

    async def service():                  # as run_until_signalled: handlers, then awaits
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda sig=sig: (got.append(sig.name), stopping.set()))
        await asyncio.wait_for(stopping.wait(), 10)

    async def run():
        asyncio.get_running_loop().call_soon(signals.hand_over)
        await service()

    asyncio.run(run())
    print(got, signals.installed())
""")


def test_a_signal_just_before_the_service_takes_over_reaches_it() -> None:
    """A signal recorded after the start's last check is delivered to the service's
    handlers once they are installed (its event loop's first turn), not lost."""
    proc = subprocess.run([sys.executable, "-c", _HANDOVER], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['SIGTERM'] False", proc.stdout


def test_other_commands_keep_the_default_interrupt() -> None:
    """Only ``run`` keeps the start's handlers past argument parsing: ``main`` hands the
    previous ones back (a program's own, or Python's ``KeyboardInterrupt``)."""
    script = textwrap.dedent("""
        import signal
        from meterwatch.stream.cli import main
        mine = lambda *a: None
        signal.signal(signal.SIGTERM, mine)
        interrupt = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a background job
        assert main(["config"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is interrupt
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False, env=clean_env())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_a_stop_delivered_twice_is_one_stop(tmp_path: Path, tiny_model: Path) -> None:
    """``timeout 60 meterwatch run`` signals the process and then its process group, and a
    terminal's Ctrl-C reaches every process of the group: the same SIGTERM arrives twice
    within microseconds. It used to be taken as a second signal ("second signal: exiting
    now", status 1); within ``SIGNAL_ECHO_S`` it is one stop (status 0). Sent while the
    service retries an unreachable broker (its handlers installed), and again before the
    settings line (the start's handlers)."""
    for when in ("retrying", "before the settings line"):
        log = tmp_path / f"{when}.log"
        with log.open("w") as err:
            proc = subprocess.Popen([str(METERWATCH), "run", "--model-path", str(tiny_model)],
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    env=clean_env(**NO_BROKER))
        try:
            deadline = time.monotonic() + 60
            while not (caught(proc.pid, signal.SIGTERM) if when != "retrying"
                       else "broker not reachable" in log.read_text()):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)  # delivered apart (two pending SIGTERMs would merge into one)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        text = log.read_text()
        assert proc.returncode == 0, (when, proc.returncode, text)
        assert "second signal" not in text and "Traceback" not in text, (when, text)


def test_a_second_stop_later_than_its_echo_exits_at_once() -> None:
    """Only a repeat within ``SIGNAL_ECHO_S`` is an echo: a signal after that is the
    operator's second, which exits at once."""
    stops = StopSignals()
    assert [stops.receive(), stops.receive()] == ["first", "echo"]
    time.sleep(SIGNAL_ECHO_S + 0.05)
    assert stops.receive() == "force"
