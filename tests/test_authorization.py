"""Kafka ACLs: a principal that may not do what the service needs is told which setting and
which grant, before it joins (``stream/authorization.py``).

On Apache Kafka 4.0 with ``StandardAuthorizer`` (``tests/own_kafka.py``), ``meterwatch run``
as a user granted one thing more at each step, with default settings. Before this, the
same steps gave: ``--input-topic: topic … does not exist; create it`` (it existed; the user
could not describe it), a traceback at recovery (``TopicAuthorizationFailedError`` on the
state topic, exit 1), and ``fetch failed: GroupAuthorizationFailedError`` every 0.5 s for
ever. The embedded broker has no authoriser: the test asserts that it reports nothing to
check, so the service starts as before.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from meterwatch.stream.authorization import (
    NOT_PROVIDED,
    AuthorizedTopicsRequest,
    check_topics_authorized,
    describe_group,
)
from meterwatch.stream.broker import Broker
from meterwatch.stream.testing import ServiceProcess
from tests.conftest import genuine_kafka, read_topic, unique_settings
from tests.own_kafka import PASSWORD, USER, acl_kafka
from tests.test_faults_contract import ask_admin, assert_fails_fast, run_to_exit

GRANT = "grant {ops} on it to that principal (an ACL), or give a {kind} it may use"


@pytest.mark.integration
def test_each_missing_grant_is_named(broker, detector_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not genuine_kafka(broker):
        _embedded_broker_reports_nothing(broker)
        return
    with acl_kafka(tmp_path / "kafka") as kafka:
        platform = kafka.broker
        s = unique_settings(platform)  # the input, made by the platform team
        mine = s.model_copy(update=dict(
            bootstrap_servers=kafka.sasl, security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN", sasl_username=USER))
        env = {"METERWATCH_SASL_PASSWORD": PASSWORD}

        def refused(flag: str, ops: str, what: str) -> None:
            line = assert_fails_fast(run_to_exit(mine, detector_path, env=env), flag,
                                     secret=PASSWORD)
            kind = what.split()[0]
            assert line == (f"meterwatch: error: {flag}: the brokers do not allow user "
                            f"{USER!r} {ops} on {what}; " + GRANT.format(ops=ops, kind=kind))

        # nothing granted: was "topic … does not exist; create it"
        refused("--input-topic", "READ", f"topic {s.input_topic!r}")
        # the input and creating topics: it creates its outputs, and may not use them
        kafka.grant(f"TOPIC:{s.input_topic}:LITERAL:READ", "CLUSTER:kafka-cluster:LITERAL:CREATE")
        refused("--scores-topic", "READ and WRITE", f"topic {s.scores_topic!r}")
        # every topic but the dead letters' (written only)
        kafka.grant(*(f"TOPIC:{t}:LITERAL:{op}" for op in ("READ", "WRITE")
                      for t in (s.scores_topic, s.alerts_topic, s.data_quality_topic,
                                s.state_topic)))
        refused("--dead-letter-topic", "WRITE", f"topic {s.dead_letter_topic!r}")
        # the topics: the group (was: "fetch failed: GroupAuthorizationFailedError" for ever)
        kafka.grant(f"TOPIC:{s.dead_letter_topic}:LITERAL:WRITE")
        refused("--group-id", "READ", f"group {s.group_id!r}")
        # the group: the transactional ids (named since the runtime redesign)
        kafka.grant(f"GROUP:{s.group_id}:LITERAL:READ")
        line = assert_fails_fast(run_to_exit(mine, detector_path, env=env), "--group-id",
                                 mentions=f"not authorised for transactional id "
                                          f"'{s.group_id}.{s.input_topic}.")
        assert line.endswith("; grant WRITE on transactional ids <group>.<input topic>.* or "
                             "use --idempotence off"), line
        # ... before joining (it was found when the first partition opened, after a join)
        groups = ask_admin(s, lambda admin: admin.describe_consumer_groups([s.group_id]))
        described = [g for answer in groups for g in answer.groups]
        assert [(g[3], len(g[5])) for g in described] == [("", 0)], described
        # all it needs: it runs and scores
        kafka.grant(f"TRANSACTIONAL_ID:{s.group_id}.{s.input_topic}.:PREFIXED:WRITE")
        service = ServiceProcess(mine, detector_path, log_path=tmp_path / "service.log",
                                 env=env).start()
        try:
            service.wait_ready(120)
            subprocess.run([sys.executable, "-m", "meterwatch.stream.cli", "simulate",
                            "--households", "10", "--days", "2", "--bootstrap-servers",
                            kafka.plain, "--input-topic", s.input_topic], check=True,
                           capture_output=True, cwd=tmp_path)
            scores = asyncio.run(read_topic(s, s.scores_topic, min_records=20, timeout_s=90))
            assert len({(d["household_id"], d["date"]) for d in scores}) == len(scores) == 20
            # an ACL removed while it runs: was "fetch failed" every 0.5 s for ever
            kafka.revoke(f"TOPIC:{s.input_topic}:LITERAL:READ")
            assert service.proc is not None
            assert service.proc.wait(60) == 2
        finally:
            service.terminate()
        log = (tmp_path / "service.log").read_text()
        assert log.count("Sending username and password in the clear") == 1  # (was 20)
        lines = [line for line in log.splitlines() if line.startswith("meterwatch: error: ")]
        assert lines == [f"meterwatch: error: --input-topic: the brokers do not allow user "
                         f"{USER!r} READ on topic {s.input_topic!r}; "
                         + GRANT.format(ops="READ", kind="topic")], lines


def _embedded_broker_reports_nothing(broker: Broker) -> None:
    """Tansu has no authoriser: no topic's operations, every group operation (-1). The day
    it reports operations, this fails: the steps above can then run on it."""
    s = unique_settings(broker)

    async def ask() -> tuple[list[int], list[tuple[int, int]]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            client = admin._client
            answer = await client.send(client.get_random_node(),
                                       AuthorizedTopicsRequest([s.input_topic]))
            await check_topics_authorized(s, admin)  # nothing refused
            return [t[4] for t in answer.topics], await describe_group(admin, s.group_id)
        finally:
            await admin.close()

    topics, group = asyncio.run(ask())
    assert topics == [NOT_PROVIDED]
    assert group == [(0, -1)]
