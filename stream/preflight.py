"""What the service checks before it joins its group, so that misconfiguration fails fast.

A retry fixes a broker that is restarting or not up yet; it never fixes a wrong password, a
CA file that is missing or does not sign the broker's certificate, a missing input topic or
output topics too small for the input. Those raise ``ConfigurationError`` (exit status 2,
one line naming the setting and the fix). Anything else stays retryable: the caller retries
with backoff and reports ``broker_reachable: false`` on ``/readyz``.

1. ``check_files``: the TLS files, checkpoints and context CSVs exist (before any client
   is built);
2. ``check_connection``: one connection per bootstrap server, authenticating exactly as the
   clients will; aiokafka's clients hide why a bootstrap failed ("Unable to bootstrap"), a
   single connection does not (``SaslAuthenticationFailed``, ``ssl.SSLError``);
3. ``check_topics``: the input topic exists (it is never created: a typo must not become an
   empty topic the service waits on forever); missing output topics are created when
   ``--create-topics`` (with at least the input's partition count), and every output topic
   has at least as many partitions as the input (records about input partition ``p`` go to
   partition ``p`` of each output).

A session timeout outside the broker's bounds is only refused when the group is joined;
``stream.service`` maps that answer (``InvalidSessionTimeoutError``) with ``session_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)

from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError

log = logging.getLogger(__name__)

_SASL_FLAG = "--sasl-username/--sasl-password"

#: The context CSVs ``meterwatch run`` reads: flag, setting, what it is, and the Low Carbon
#: London file whose layout it takes.
CONTEXT_CSVS = (
    ("--household-info", "household_info", "household info CSV", "household_information.csv"),
    ("--weather", "weather", "daily weather CSV", "weather_daily_darksky.csv"),
    ("--holidays", "holidays", "bank holidays CSV", "uk_bank_holidays.csv"))


def check_files(settings: Settings, *, service: bool = True) -> None:
    """Step 1: every TLS file that is set exists and is readable; with ``service``, so do
    the checkpoints and the context CSVs ``meterwatch run`` reads (``meterwatch reset``
    reads none of them)."""
    for flag, path in (("--ssl-cafile", settings.ssl_cafile),
                       ("--ssl-certfile", settings.ssl_certfile),
                       ("--ssl-keyfile", settings.ssl_keyfile)):
        if path is not None and not path.is_file():
            raise ConfigurationError(flag, f"{path} does not exist or is not a file",
                                     "point it at the PEM file")
    if service:
        given = [("--model-path", settings.model_path,
                  "give a checkpoint written by meterwatch train"),
                 ("--shadow-model-path", settings.shadow_model_path,
                  "give a checkpoint written by meterwatch train, or leave it out")]
        given += [(flag, getattr(settings, attr), f"point it at the {what}, or leave it out")
                  for flag, attr, what, _ in CONTEXT_CSVS]
        for flag, path, fix in given:
            if path is not None and not path.is_file():
                raise ConfigurationError(flag, f"{path} does not exist or is not a file", fix)
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        try:
            settings.kafka_options()
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError("--ssl-cafile", f"cannot load the TLS files ({exc})",
                                     "give PEM files (CA, certificate, key)") from None


def session_timeout_error(settings: Settings) -> ConfigurationError:
    return ConfigurationError(
        "--session-timeout-ms", f"the broker refused {settings.session_timeout_ms} ms",
        "use a value within the broker's group.min/max.session.timeout.ms "
        "(stock Kafka: 6000-1800000)")


async def check_connection(settings: Settings, timeout_s: float = 10.0) -> None:
    """Step 2: raise ``ConfigurationError`` if a bootstrap server refuses our credentials or
    our TLS; return when one server accepted them or none answered (retryable)."""
    opts = settings.kafka_options()
    for server in opts["bootstrap_servers"].split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            conn = await create_conn(
                host.strip("[]") or "localhost", int(port or 9092),
                client_id=opts["client_id"], request_timeout_ms=int(timeout_s * 1000),
                ssl_context=opts.get("ssl_context"),
                security_protocol=settings.security_protocol,
                sasl_mechanism=opts.get("sasl_mechanism", "PLAIN"),
                sasl_plain_username=opts.get("sasl_plain_username"),
                sasl_plain_password=opts.get("sasl_plain_password"))
        except SaslAuthenticationFailed:
            raise ConfigurationError(
                _SASL_FLAG, f"the broker at {server} rejected the credentials "
                f"({settings.sasl_mechanism})",
                "check the user name, the password and --sasl-mechanism") from None
        except KeyError as exc:
            # aiokafka's SCRAM client reads the verifier ("v") from the server's final
            # message; a server that refuses the proof sends an error ("e") instead
            if not (settings.sasl_mechanism or "").startswith("SCRAM") or exc.args != ("v",):
                log.debug("preflight connection to %s: %r", server, exc)
                continue
            raise ConfigurationError(
                _SASL_FLAG, f"the broker at {server} rejected the credentials "
                f"({settings.sasl_mechanism})",
                "check the user name, the password and --sasl-mechanism") from None
        except UnsupportedSaslMechanismError:
            raise ConfigurationError(
                "--sasl-mechanism", f"the broker at {server} does not offer "
                f"{settings.sasl_mechanism}", "use a mechanism the listener enables") from None
        except ssl.SSLError as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) \
                or exc.__class__.__name__
            raise ConfigurationError(
                "--ssl-cafile", f"TLS with {server} failed ({reason})",
                "give the CA that signed the broker's certificate, and an SSL listener") \
                from None
        except Exception as exc:  # refused, reset, timeout, DNS: maybe later
            log.debug("preflight connection to %s: %r", server, exc)
            continue
        conn.close()
        return


async def check_topics(settings: Settings, admin: AIOKafkaAdminClient,
                       outputs: Sequence[str], compacted: Sequence[str] = ()) -> int:
    """Step 3; returns the input topic's partition count."""
    s = settings
    existing = set(await admin.list_topics())
    if s.input_topic not in existing:
        raise ConfigurationError(
            "--input-topic", f"topic {s.input_topic!r} does not exist",
            "create it (meterwatch never creates its input) or fix the name")
    n_input = await _partitions(admin, s.input_topic)
    missing = [t for t in outputs if t not in existing]
    if missing and s.create_topics:
        n = max(s.topic_partitions, n_input)
        new = [NewTopic(t, n, 1, topic_configs={"cleanup.policy": "compact"}
                        if t in compacted else {}) for t in missing]
        try:
            await admin.create_topics(new)
        except TopicAlreadyExistsError:
            pass
        log.info("created topics %s with %d partitions", missing, n)
    elif missing:
        raise ConfigurationError(
            "--create-topics", f"output topics {missing} do not exist",
            "create them with at least as many partitions as the input, or pass "
            "--create-topics")
    for t in outputs:
        n = await _partitions(admin, t)
        if n < n_input:
            raise ConfigurationError(
                "--topic-partitions", f"output topic {t!r} has {n} partitions, fewer than "
                f"the {n_input} of input topic {s.input_topic!r}",
                f"recreate {t!r} (or add partitions) with at least {n_input}")
    return n_input


async def input_partitions(admin: AIOKafkaAdminClient, topic: str) -> int:
    """The partition count of an existing topic."""
    return await _partitions(admin, topic)


async def _partitions(admin: AIOKafkaAdminClient, topic: str, wait_s: float = 10.0) -> int:
    """The topic's partition count; a topic created a moment ago may need a few metadata
    rounds before its partitions show."""
    deadline = time.monotonic() + wait_s
    while True:
        for t in await admin.describe_topics([topic]):
            if t["topic"] == topic and t["partitions"]:
                return len(t["partitions"])
        if time.monotonic() > deadline:
            return 0
        await asyncio.sleep(0.2)
