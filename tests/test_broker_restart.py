"""The broker restarts under a running service, as in a rolling upgrade of the cluster.

On a Kafka 4.0 of the test's own (``tests/own_kafka.py``): ``meterwatch run`` with default
settings, a day streamed and scored, the broker stopped (SIGTERM, a controlled shutdown),
down 5 s and started again on the same data and ports, the next day streamed. Every day is
scored once, the service never exits, and its log holds a few of aiokafka's lines, not the
thousands of one per failed attempt (``cli.AiokafkaRepeats``: about 2,000 ERROR lines for a
38 s restart before). Tansu keeps its data in memory: a restart of it is a new, empty broker,
not this scenario; the test asserts that.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import Broker, create_topics
from meterwatch.stream.testing import ServiceProcess
from tests.conftest import HISTORY_DAYS, genuine_kafka, read_topic, unique_settings
from tests.own_kafka import own_kafka
from tests.test_compression import produce_day

pytestmark = pytest.mark.integration


def test_a_broker_restart_under_the_service(broker, detector_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not genuine_kafka(broker):
        _tansu_forgets_everything_at_a_restart()
        return
    with own_kafka(tmp_path / "kafka") as kafka:
        s = unique_settings(kafka.broker,
                            topic_partitions=4)
        data = generate(SyntheticConfig(n_households=30, n_days=HISTORY_DAYS + 2, seed=8,
                                        anomaly_rate=0.0))
        n = len(data.household_ids)
        log = tmp_path / "service.log"
        service = ServiceProcess(s, detector_path, log_path=log).start()
        try:
            service.wait_ready(120)
            asyncio.run(produce_day(s.bootstrap_servers, s.input_topic, data, range(n),
                                    HISTORY_DAYS))
            asyncio.run(read_topic(s, s.scores_topic, min_records=n))
            kafka.restart(down_s=5)
            asyncio.run(produce_day(s.bootstrap_servers, s.input_topic, data, range(n),
                                    HISTORY_DAYS + 1))
            scores = asyncio.run(read_topic(s, s.scores_topic, min_records=2 * n,
                                            timeout_s=120))
            assert service.proc is not None and service.proc.poll() is None, "it exited"
        finally:
            assert service.terminate() == 0
    assert len({(d["household_id"], d["date"]) for d in scores}) == len(scores) == 2 * n
    from_aiokafka = [line for line in log.read_text().splitlines() if " aiokafka" in line]
    assert len(from_aiokafka) < 40, "\n".join(from_aiokafka[:60])


def _tansu_forgets_everything_at_a_restart() -> None:
    first = Broker.start(prefer="tansu")
    port = int(first.bootstrap_servers.rsplit(":", 1)[1])
    try:
        asyncio.run(create_topics(first.bootstrap_servers, {"kept": 1}))
        assert "kept" in asyncio.run(_topics(first))
    finally:
        first.stop()
    again = Broker.start(prefer="tansu", port=port)
    try:
        assert "kept" not in asyncio.run(_topics(again))
    finally:
        again.stop()


async def _topics(broker: Broker) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()
