"""``meterwatch run`` with topic settings the broker cannot honour, through the installed
console script against the session's real broker (Tansu by default, Apache Kafka 4.0 with
``KAFKA_BOOTSTRAP_SERVERS``): exit 2 and one line naming the setting, not a misleading
"has 0 partitions" ten seconds later, nor a group join retried forever."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from meterwatch.stream.broker import Broker
from tests.cli_helpers import (
    clean_env,
    meterwatch,
    one_line_error,
    stderr_until,
)
from tests.conftest import create_topics_now


def _env(broker: Broker, tag: str, **extra: str) -> dict[str, str]:
    env = {"METERWATCH_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           "METERWATCH_GROUP_ID": f"mw-{tag}", "METERWATCH_INPUT_TOPIC": f"readings-{tag}",
           "METERWATCH_ALERTS_TOPIC": f"alerts-{tag}", "METERWATCH_SCORES_TOPIC": f"scores-{tag}",
           "METERWATCH_DEAD_LETTER_TOPIC": f"dlq-{tag}",
           "METERWATCH_DATA_QUALITY_TOPIC": f"dq-{tag}", "METERWATCH_STATE_TOPIC": f"state-{tag}",
           "METERWATCH_METRICS_PORT": "0", "METERWATCH_SCORER": "thread"}
    return clean_env(**env, **extra)


@pytest.mark.integration
def test_an_output_topic_the_broker_will_not_create(broker: Broker, tiny_model: Path) -> None:
    """Apache Kafka refuses 'alerts_<tag>' beside an existing 'alerts.<tag>' (the two would
    share metric names); the admin client returns that as an error code, which used to be
    logged as "created topics" and then reported, 10 s later, as a topic with 0 partitions
    under --topic-partitions. Tansu has no such rule: there the same run starts (asserted,
    so the day Tansu refuses it too this test says so)."""
    tag = uuid.uuid4().hex[:8]
    create_topics_now(broker.bootstrap_servers, {f"readings-{tag}": 2, f"alerts.{tag}": 2})
    args = ["run", "--model-path", str(tiny_model), "--alerts-topic", f"alerts_{tag}"]
    if broker.kind == "tansu":
        stderr = stderr_until(args, "recovered partitions", env=_env(broker, tag))
        assert "meterwatch: error:" not in stderr, stderr
        return
    proc = meterwatch(*args, env=_env(broker, tag), timeout=120)
    line = one_line_error(proc)
    assert line.startswith(f"meterwatch: error: --alerts-topic: the broker refused to create "
                           f"'alerts_{tag}' (InvalidTopicError: "), line
    assert line.endswith("; give it another name"), line
    assert "created topics" not in proc.stderr, proc.stderr
