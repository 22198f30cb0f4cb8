"""The service's own start checks what ``meterwatch run`` checks before its settings line, so a
program that calls ``run_service`` (or starts a ``Service``) directly gets the same refusals
before any Kafka client exists; and ``meterwatch run`` reads and validates each checkpoint,
and parses each context CSV, once (the CLI hands what it checked to the service).

Before: ``run_service`` with a checkpoint of NaN weights served it (only the CLI checked),
and a CLI start loaded both checkpoints twice, validated the shadow twice and parsed the
CSVs twice."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from meterwatch.model import Detector
from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError
from meterwatch.stream.preflight import check_inputs
from meterwatch.stream.service import Service, run_service
from tests.cli_helpers import METERWATCH, clean_env


@pytest.fixture(scope="module")
def nan_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint that loads but whose network gives NaN (every weight NaN)."""
    ckpt = Detector.load(tiny_model, device="cpu").checkpoint()
    for tensor in ckpt["state_dict"].values():
        tensor.fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan-model") / "nan.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port that accepts connections and answers nothing: a Kafka client that started
    would connect to it (``check_connection`` connects to each bootstrap server first)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        yield sock


def connections(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def settings_for(listener: socket.socket, **overrides: object) -> Settings:
    host, port = listener.getsockname()
    return Settings(bootstrap_servers=f"{host}:{port}", metrics_host="127.0.0.1",
                    metrics_port=0, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["--model-path", "--shadow-model-path"])
async def test_run_service_refuses_a_nan_checkpoint_before_any_client(
        flag: str, tiny_model: Path, nan_model: Path, listener: socket.socket) -> None:
    s = settings_for(listener, model_path=nan_model if flag == "--model-path" else tiny_model,
                     shadow_model_path=nan_model if flag != "--model-path" else None)
    with pytest.raises(ConfigurationError) as caught:
        await asyncio.wait_for(run_service(s), 60)  # (before: served, retrying)
    assert caught.value.flag == flag
    assert str(caught.value) == (
        f"{flag}: {nan_model}: {Detector.load(nan_model, device='cpu').version}: the network "
        "reconstructs synthetic days to non-finite values; give a checkpoint written by "
        "meterwatch train" + (", or leave it out" if flag != "--model-path" else ""))
    assert connections(listener) == 0  # refused before anything connected to the broker


async def test_a_nan_detector_handed_to_the_service_is_refused(
        nan_model: Path, listener: socket.socket) -> None:
    service = Service(settings_for(listener), detector=Detector.load(nan_model, device="cpu"))
    with pytest.raises(ConfigurationError, match=r"^--model-path: .*non-finite values"):
        await asyncio.wait_for(service.start(), 60)
    assert connections(listener) == 0
    assert service.scorer is None


async def test_run_service_names_a_csv_that_does_not_parse(
        tiny_model: Path, tmp_path: Path, listener: socket.socket) -> None:
    bad = tmp_path / "weather.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigurationError, match=f"^--weather: {bad}:1: missing column"):
        await asyncio.wait_for(run_service(settings_for(listener, model_path=tiny_model,
                                                        weather=bad)), 60)
    assert connections(listener) == 0


#: ``meterwatch run`` in a fresh interpreter with each load, validation and CSV read
#: counted (the real functions run); the counts are printed once it tries the broker (by
#: then the start has done everything with the models), and it ends there.
_COUNTED = textwrap.dedent("""
    import collections, logging, os, sys
    from meterwatch.model import ContextTables, Detector
    from meterwatch.stream import lifecycle
    from meterwatch.stream.cli import main

    calls = collections.Counter()

    def counted(name, f):
        def wrapper(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return wrapper

    Detector.load = classmethod(counted("load", Detector.load.__func__))
    ContextTables.from_files = classmethod(counted("csv", ContextTables.from_files.__func__))
    lifecycle.validate = counted("validate", lifecycle.validate)

    class CountsWhenConnecting(logging.Handler):
        def emit(self, record):
            if "broker not reachable" in record.getMessage():
                print(calls["load"], calls["validate"], calls["csv"], flush=True)
                os._exit(0)

    logging.getLogger("meterwatch.stream.service").addHandler(CountsWhenConnecting())
    main(["run", *sys.argv[1:]])
""")


def test_meterwatch_run_loads_and_validates_each_model_once(tiny_model: Path,
                                                              tmp_path: Path) -> None:
    """Live + shadow + a weather CSV: 2 loads, 2 validations, 1 CSV read (was 4, 3, 2)."""
    weather = tmp_path / "weather.csv"
    weather.write_text("time,temperatureMax,temperatureMin\n"
                       "2013-03-01 00:00:00,10.0,3.0\n")
    out = subprocess.run(
        [sys.executable, "-c", _COUNTED, "--model-path", str(tiny_model),
         "--shadow-model-path", str(tiny_model), "--weather", str(weather)],
        capture_output=True, text=True, timeout=180, check=False,
        env=clean_env(METERWATCH_BOOTSTRAP_SERVERS="127.0.0.1:1",
                      METERWATCH_METRICS_PORT="0"))
    assert out.stdout.split() == ["2", "2", "1"], (out.stdout, out.stderr[-3000:])


async def test_run_service_refuses_a_metrics_port_that_is_taken(
        tiny_model: Path, listener: socket.socket) -> None:
    """The port's only bind is the check's: a port taken is the one-line refusal (exit 2
    through ``meterwatch run``), never the server's ``[Errno 98]`` after the settings line."""
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        s = settings_for(listener, model_path=tiny_model).model_copy(
            update={"metrics_host": "0.0.0.0", "metrics_port": port})
        with pytest.raises(ConfigurationError) as caught:
            await asyncio.wait_for(run_service(s), 60)
    assert str(caught.value) == (f"--metrics-port: 0.0.0.0:{port} is already in use; stop "
                                 "what holds it, or choose another port (0 = any free one)")
    assert connections(listener) == 0


async def test_the_port_checked_is_the_port_served_and_nothing_takes_it_between(
        tiny_model: Path, listener: socket.socket) -> None:
    """``meterwatch run`` checks, logs its settings line, then starts the service: the port
    stays bound in between (before: released after the check and bound again by the
    server, so a process that took it in between made the start fail with ``[Errno 98]``),
    and a probe that connects in between is answered once the server runs."""
    s = settings_for(listener, model_path=tiny_model)
    checked = check_inputs(s)
    port = checked.probes[0].getsockname()[1]
    with pytest.raises(OSError) as caught:  # another process trying to take it now
        socket.create_server(("127.0.0.1", port)).close()
    assert caught.value.errno == errno.EADDRINUSE
    early = socket.create_connection(("127.0.0.1", port), timeout=30)  # waits in the backlog
    early.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    service = Service(s, checked=checked)
    start = asyncio.create_task(service.start())  # then retries the silent broker
    try:
        reply = await asyncio.to_thread(early.recv, 4096)
        assert reply.startswith(b"HTTP/1.1 200 OK"), reply
        assert service.metrics_port == port
    finally:
        early.close()
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
    with socket.create_server(("127.0.0.1", port)):  # released by the stop
        pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_retrying_the_broker_stops_gracefully(
        sig: signal.Signals, tiny_model: Path) -> None:
    """``meterwatch run`` (default scorer: a process) against a port where no broker
    listens, signalled while it retries: exit status 0, the documented one after
    SIGTERM/SIGINT, after a graceful stop; nothing leaked. Before: the signals were handled
    only once the start was over, so SIGTERM killed it (143) and multiprocessing's resource
    tracker said "There appear to be 1 leaked semaphore objects to clean up at shutdown"
    (SIGINT: exit status 130)."""
    with socket.socket() as closed:  # a port of this machine nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    proc = subprocess.Popen(
        [str(METERWATCH), "run", "--model-path", str(tiny_model)], stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True,
        env=clean_env(METERWATCH_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
                      METERWATCH_METRICS_PORT="0"))
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while sum("broker not reachable" in line for line in seen) < 2:  # retried, twice
            assert time.monotonic() < deadline, "".join(seen)
            line = proc.stderr.readline()
            assert line, "".join(seen)  # (ended before it retried)
            seen.append(line)
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)  # to EOF: the resource tracker's too
    finally:
        proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == 0, stderr
    assert "leaked" not in stderr and "Traceback" not in stderr, stderr
    assert "signal received: shutting down gracefully" in stderr
    assert "stopped in" in stderr


async def test_a_thread_scorer_in_another_precision_holds_the_checked_weights_rebuilt(
        tiny_model: Path, listener: socket.socket) -> None:
    """The checks hold the models on the CPU in float32; a worker thread that scores in
    bfloat16 gets them rebuilt in bfloat16 (validated there, as a swap would be), the
    checked weights unchanged (the same path rebuilds them on a GPU for ``--device
    cuda``)."""
    s = settings_for(listener, model_path=tiny_model, shadow_model_path=tiny_model,
                     scorer="thread", device="cpu", precision="bfloat16")
    checked = check_inputs(s)
    service = Service(s, checked=checked)
    start = asyncio.create_task(service.start())  # then retries the silent broker
    try:
        deadline = time.monotonic() + 60
        while service.scorer is None or not service.scorer.up:
            assert time.monotonic() < deadline and not start.done()
            await asyncio.sleep(0.05)
        live, shadow = service.lifecycle.detector, service.lifecycle.shadow
        assert live is not None and shadow is not None
        assert (live.dtype_name, shadow.dtype_name) == ("bfloat16", "bfloat16")
        assert live is not checked.detector and shadow is not checked.shadow
        assert checked.detector.dtype_name == "float32"
        assert live.version == checked.detector.version
        assert service.scorer.detector is live
    finally:
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
