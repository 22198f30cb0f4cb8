"""An Apache Kafka 4.0 of a test's own, configured as .ci/run's shared one cannot be: with an
authoriser (``tests/test_authorization.py``) or other broker settings
(``tests/test_transactional_expiry.py``).

Started from the same broker build as .ci/run's (``../shared/kafka``, or
``METERWATCH_SHARED_DIR``). Two listeners: ``plain`` (PLAINTEXT) and ``sasl``
(SASL_PLAINTEXT, PLAIN, users ``admin`` and ``mw``). With ``acl=True``: ``StandardAuthorizer``
and ``allow.everyone.if.no.acl.found=false``, as a secured production cluster runs; the
``plain`` listener's principal ``User:ANONYMOUS`` is a super user (the platform team, which
creates topics and grants ACLs) and ``mw`` may do only what it is granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest

from meterwatch.stream.broker import Broker, free_port

ROOT = Path(__file__).resolve().parents[1]
DIST = "kafka_2.13-4.0.0"
USER, PASSWORD = "mw", "mw-secret"

#: Kafka's ACL codes: resource types, operations, pattern types
RESOURCE = {"TOPIC": 2, "GROUP": 3, "CLUSTER": 4, "TRANSACTIONAL_ID": 5}
OPERATION = {"ALL": 2, "READ": 3, "WRITE": 4, "CREATE": 5, "DESCRIBE": 8}
PATTERN = {"LITERAL": 3, "PREFIXED": 4}
ALLOW = 3


def kafka_tarball() -> Path:
    shared = Path(os.environ.get("METERWATCH_SHARED_DIR", ROOT.parent / "shared"))
    return shared / "kafka" / f"{DIST}.tgz"


@dataclass
class OwnKafka:
    plain: str  # host:port (with ``acl``: a super user)
    sasl: str  # host:port, SASL_PLAINTEXT PLAIN
    _launch: Callable[[], subprocess.Popen[bytes]]
    _server_log: Path
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def broker(self) -> Broker:
        """Its plain listener as the tests' broker (``unique_settings``, ``genuine_kafka``)."""
        return Broker(self.plain, "external", supports_idempotence=True)

    def start(self) -> None:
        """Start the broker and wait until it says it started (at most 90 s)."""
        started = self._starts()
        self._proc = self._launch()
        deadline = time.monotonic() + 90
        while self._starts() == started:
            assert self._proc.poll() is None, \
                f"Kafka exited {self._proc.returncode}; see {self._server_log}"
            assert time.monotonic() < deadline, \
                f"Kafka not started in 90 s; see {self._server_log}"
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop it as an operator does (SIGTERM: a controlled shutdown)."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self, down_s: float) -> None:
        """Stop, stay down ``down_s``, start again: the same data, the same ports."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def _starts(self) -> int:
        if not self._server_log.exists():
            return 0
        return self._server_log.read_text(errors="replace").count("Kafka Server started")

    def grant(self, *acls: str, principal: str = f"User:{USER}") -> None:
        """Allow ``principal`` each of ``acls``, written ``RESOURCE:name:PATTERN:OPERATION``
        (``TOPIC:readings:LITERAL:READ``)."""
        self._send(CreateAclsRequest, acls, principal)

    def revoke(self, *acls: str, principal: str = f"User:{USER}") -> None:
        """Remove what ``grant`` allowed."""
        self._send(DeleteAclsRequest, acls, principal)

    def _send(self, request: Any, acls: tuple[str, ...], principal: str) -> None:
        async def send() -> None:
            host, port = self.plain.rsplit(":", 1)
            conn = await create_conn(host, int(port))
            try:
                for acl in acls:
                    rtype, name, pattern, op = acl.split(":")
                    answer = await conn.send(request(
                        RESOURCE[rtype], name, PATTERN[pattern], principal, "*", OPERATION[op],
                        ALLOW))
                    results = getattr(answer, "creation_responses", None) or \
                        getattr(answer, "filter_responses", [])
                    assert [r[0] for r in results] == [0], (acl, answer)
            finally:
                conn.close()

        asyncio.run(send())


@contextlib.contextmanager
def acl_kafka(folder: Path) -> Iterator[OwnKafka]:
    """A broker with an authoriser, in ``folder``."""
    with own_kafka(folder, {
            "authorizer.class.name":
                "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS;User:admin",
            "allow.everyone.if.no.acl.found": "false"}) as kafka:
        yield kafka


@contextlib.contextmanager
def own_kafka(folder: Path, properties: dict[str, str] | None = None) -> Iterator[OwnKafka]:
    """Start a broker in ``folder`` with these server ``properties`` on top of a
    single-node configuration (about 10 s); stopped and deleted afterwards."""
    tarball = kafka_tarball()
    assert tarball.exists(), f"{tarball}: the ACL tests need the shared Kafka 4.0 build"
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    home = folder / DIST
    plain, controller, sasl = free_port(), free_port(), free_port()
    listeners = (f"PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{controller},"
                 f"SASL_PLAINTEXT://127.0.0.1:{sasl}")
    jaas = ('org.apache.kafka.common.security.plain.PlainLoginModule required '
            f'user_admin="admin-secret" user_{USER}="{PASSWORD}";')
    conf = folder / "server.properties"
    conf.write_text("\n".join([
        "process.roles=broker,controller", "node.id=1",
        f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}",
        f"listeners={listeners}", f"advertised.listeners={listeners}",
        "inter.broker.listener.name=PLAINTEXT", "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
        "SASL_PLAINTEXT:SASL_PLAINTEXT",
        f"log.dirs={folder / 'data'}", "num.partitions=1",
        "offsets.topic.replication.factor=1", "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1", "group.initial.rebalance.delay.ms=0",
        "sasl.enabled.mechanisms=PLAIN",
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
        *(f"{k}={v}" for k, v in (properties or {}).items()), ""]))
    logs = folder / "logs"
    logs.mkdir()
    env = {**os.environ, "LOG_DIR": str(logs), "KAFKA_HEAP_OPTS": "-Xmx512M -Xms512M"}
    tools = {**env, "KAFKA_LOG4J_OPTS":
             f"-Dlog4j2.configurationFile={home / 'config' / 'tools-log4j2.yaml'}"}
    cluster = subprocess.run([home / "bin" / "kafka-storage.sh", "random-uuid"], env=tools,
                             capture_output=True, text=True, check=True).stdout.split()[-1]
    subprocess.run([home / "bin" / "kafka-storage.sh", "format", "--standalone", "-t", cluster,
                    "-c", conf], env=tools, capture_output=True, check=True)
    server_log = logs / "server.log"
    command = [home / "bin" / "kafka-run-class.sh", "-name", "kafkaServer", "kafka.Kafka", conf]
    run_env = {**env, "KAFKA_LOG4J_OPTS":
               f"-Dlog4j2.configurationFile={home / 'config' / 'log4j2.yaml'}"}
    kafka = OwnKafka(f"127.0.0.1:{plain}", f"127.0.0.1:{sasl}",
                     lambda: subprocess.Popen(command, env=run_env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL,
                                              start_new_session=True), server_log)
    try:
        kafka.start()
        yield kafka
    finally:
        kafka.stop()
        shutil.rmtree(folder, ignore_errors=True)
