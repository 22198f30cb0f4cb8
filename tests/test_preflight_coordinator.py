"""The group coordinator is waited for, quietly, before the consumer joins.

On a new Apache Kafka 4.0 cluster the first ``meterwatch run`` logged 1-9 ERROR lines
("Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError") and 3-9
WARNING lines ("Marking the coordinator dead (node 1)for group meterwatch.") from aiokafka's
consumer while the broker created ``__consumer_offsets`` (COORDINATOR_NOT_AVAILABLE) and
loaded its partition (NOT_COORDINATOR) — harmless, read by a new user as errors. The start
now asks the broker itself (DescribeGroups, at DEBUG) until the coordinator answers, at
most 20 s, and the consumer joins a coordinator that is ready (measured on fresh clusters:
docs/first-contact.md). A fresh cluster cannot be had per test (a Kafka start takes 5-10 s), so
these run on the session's broker: a group the broker has never seen."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from meterwatch.stream.broker import Broker
from meterwatch.stream.config import Settings
from meterwatch.stream.preflight import await_group_coordinator


async def _wait(settings: Settings, wait_s: float = 20.0) -> tuple[bool, float]:
    admin = AIOKafkaAdminClient(**settings.kafka_options())
    await admin.start()
    try:
        t0 = time.monotonic()
        ready = await await_group_coordinator(settings, admin, wait_s)
        return ready, time.monotonic() - t0
    finally:
        await admin.close()


@pytest.mark.integration
def test_a_new_group_finds_its_coordinator_quietly(broker: Broker,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(bootstrap_servers=broker.bootstrap_servers,
                        group_id=f"mw-coordinator-{uuid.uuid4().hex[:8]}")
    with caplog.at_level(logging.DEBUG, logger="meterwatch.stream.preflight"):
        ready, took = asyncio.run(_wait(settings))
    assert ready, caplog.text
    assert took < 20, took
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [], caplog.text
    assert f"group coordinator of {settings.group_id!r} ready after" in caplog.text
