"""What the service checks before it joins its group, so that misconfiguration fails fast.

A retry fixes a broker that is restarting or not up yet; it never fixes a wrong password, a
CA file that is missing or does not sign the broker's certificate, a missing input topic or
output topics too small for the input. Those raise ``ConfigurationError`` (exit status 2,
one line naming the setting and the fix). Anything else stays retryable: the caller retries
with backoff and reports ``broker_reachable: false`` on ``/readyz``.

1. without a broker, before any client is built: ``check_files`` (``--bootstrap-servers``
   is host:port, topic names Kafka takes and six different ones, a group id,
   ``--fetch-max-wait-ms`` below the request timeout; the TLS files, checkpoints and
   context CSVs exist); ``check_inputs``: ``--device cuda`` has a GPU, the probes' address
   can be bound, the context CSVs parse and each checkpoint is usable: it loads (weights
   only, on the CPU: this process never touches a GPU, ``docs/gpu.md``), takes
   ``--target-far`` and scores a small synthetic history to finite values
   (``stream.lifecycle.validate``), the shadow against the live model. ``meterwatch run``
   calls both before it logs anything, so a refusal is the only line on stderr, and hands
   what ``check_inputs`` checked (``Checked``) to the service, which uses it as it is; a
   service started without it (``run_service`` called directly) calls both itself, first;
2. ``check_connection``: one connection per bootstrap server, authenticating exactly as the
   clients will; aiokafka's clients hide why a bootstrap failed ("Unable to bootstrap"), a
   single connection does not (``SaslAuthenticationFailed``, ``ssl.SSLError``); then the
   addresses the brokers advertise, which every later connection uses, are reached once;
3. ``check_topics``: the input topic exists (it is never created: a typo must not become an
   empty topic the service waits on forever); missing output topics are created when
   ``--create-topics`` (with at least the input's partition count; a topic the broker will
   not create is refused by name), and every output topic has at least as many partitions as
   the input (records about input partition ``p`` go to partition ``p`` of each output):
   with ``--create-topics`` an output topic with fewer (the input grew) is given more, else
   it is refused by name; then ``await_group_coordinator``: the group's coordinator is
   waited for (bounded), quietly, before the consumer joins. A cluster makes it on first use
   (Kafka creates ``__consumer_offsets`` and loads it in about a second), and aiokafka's
   consumer logs each try meanwhile as an error or warning ("Marking the coordinator dead").

A session timeout outside the broker's bounds is only refused when the group is joined;
``stream.service`` maps that answer (``InvalidSessionTimeoutError``) with ``session_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    GroupCoordinatorNotAvailableError,
    GroupLoadInProgressError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    NotCoordinatorForGroupError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest

from meterwatch.stream.authorization import (
    check_group_authorized,
    check_topics_authorized,
    describe_group,
    group_refused,
)
from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError, problem_of

if TYPE_CHECKING:  # imported where used: ``meterwatch reset`` needs neither torch nor a model
    from meterwatch.model import ContextTables, Detector

log = logging.getLogger(__name__)

_SASL_FLAG = "--sasl-username/--sasl-password"

#: The context CSVs ``meterwatch run`` reads: flag, setting, what it is, and the layouts it
#: takes (a utility's plain one, and the Low Carbon London one).
CONTEXT_CSVS = (
    ("--household-info", "household_info", "household info CSV",
     "household_id,tariff,group (or Low Carbon London's LCLid,stdorToU,Acorn_grouped)"),
    ("--weather", "weather", "daily weather CSV",
     "date,temp_max,temp_min in °C (or Low Carbon London's Dark Sky "
     "time,temperatureMax,temperatureMin)"),
    ("--holidays", "holidays", "bank holidays CSV",
     "a date column (or Low Carbon London's Bank holidays)"))


def check_files(settings: Settings, *, service: bool = True) -> None:
    """Step 1: ``--bootstrap-servers`` is a list of host:port, the topic names and the
    group id are ones Kafka takes (``check_names``); every TLS file that is set
    exists and is readable; with ``service``, so do the checkpoints and the context CSVs
    ``meterwatch run`` reads (``meterwatch reset`` reads none of them)."""
    check_bootstrap(settings.bootstrap_servers)
    check_names(settings)
    check_fetch_wait(settings)
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


def check_bootstrap(servers: str) -> list[tuple[str, int]]:
    """``--bootstrap-servers`` as (host, port) pairs: comma-separated ``host[:port]`` (port
    9092 by default; an IPv6 address in brackets). A malformed list raises
    ``ConfigurationError`` here instead of being retried against forever."""
    out = []
    for entry in servers.split(","):
        entry = entry.strip()
        if entry.startswith("["):  # [v6] or [v6]:port
            host, bracket, rest = entry[1:].partition("]")
            colon, port = rest[:1], rest[1:]
            ok = bool(bracket) and colon in ("", ":") and bool(port or not colon)
        else:  # host or host:port (a bare IPv6 address would be ambiguous)
            host, colon, port = entry.partition(":")
            ok = ":" not in port and bool(port or not colon)
        if not (ok and host and (not port or (port.isdigit() and 0 < int(port) < 65536))):
            raise ConfigurationError(
                "--bootstrap-servers", f"{entry!r} is not host:port",
                "give a comma-separated list like broker-1:9092,broker-2:9092 "
                "(an IPv6 address in brackets: [::1]:9092)")
        out.append((host, int(port or 9092)))
    return out


#: What Kafka accepts as a topic name (``org.apache.kafka.common.internals.Topic``).
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: The topics of an application, in the order their flags are listed.
TOPIC_SETTINGS = ("input_topic", "scores_topic", "alerts_topic", "data_quality_topic",
                  "dead_letter_topic", "state_topic")


def check_names(settings: Settings) -> None:
    """Every topic name is one Kafka accepts, the six topics are six different ones (an
    output written to the input would be read back as readings; two outputs sharing a
    topic would mix the ledger with alerts), and the group id is not empty. A broker would
    refuse the first and the last only later, as a retryable-looking error or an empty
    topic; the second it would take."""
    seen: dict[str, str] = {}
    for attr in TOPIC_SETTINGS:
        name, flag = getattr(settings, attr), "--" + attr.replace("_", "-")
        if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigurationError(
                flag, f"{name[:60]!r} is not a Kafka topic name",
                "use 1-249 letters, digits, '.', '_' or '-'")
        if name in seen:
            raise ConfigurationError(flag, f"{name!r} is also {seen[name]}",
                                     "give each topic its own name")
        seen[name] = flag
    if not settings.group_id.strip():
        raise ConfigurationError("--group-id", "empty", "give the consumer group a name "
                                 "(every member of one application uses the same)")


def check_fetch_wait(settings: Settings) -> None:
    """``--fetch-max-wait-ms`` below the consumer's request timeout (aiokafka's default,
    which the service keeps): a fetch the broker holds longer than that times out on every
    quiet partition (``RequestTimedOutError`` every 40 s, nothing read) instead of
    returning empty. (Kafka's Java consumer once refused the same combination.)"""
    from aiokafka import AIOKafkaConsumer

    limit = inspect.signature(AIOKafkaConsumer).parameters["request_timeout_ms"].default
    if settings.fetch_max_wait_ms >= limit:
        raise ConfigurationError(
            "--fetch-max-wait-ms", f"{settings.fetch_max_wait_ms} ms is not below the "
            f"consumer's request timeout ({limit} ms): a fetch on a quiet partition would "
            "time out instead of returning",
            f"use less than {limit} ms (the default, 25, keeps latency low)")


def check_metrics_address(settings: Settings) -> list[socket.socket]:
    """``--metrics-host`` resolves to addresses of this machine and ``--metrics-port`` can
    be bound there; else ``ConfigurationError``, before anything started. Returns the
    sockets, bound and listening (as asyncio's server would bind them: ``SO_REUSEADDR``,
    IPv6 only on an IPv6 address, each address the name resolves to), for the probes server
    to serve on (``HttpServer.start``): the port is bound once, so nothing can take it
    between this check and the server (a connection meanwhile waits in the backlog)."""
    host, port = settings.metrics_host, settings.metrics_port
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigurationError("--metrics-host", f"cannot resolve {host!r} "
                                 f"({exc.strerror or exc})", "give an address or name of "
                                 "this machine (0.0.0.0 = every interface)") from None
    addresses = list(dict.fromkeys(infos))
    not_here: list[str] = []  # asyncio skips these (a family not enabled): all of them fail
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in addresses:
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
                sock.listen(100)  # (asyncio's backlog) held: a second bind of it fails
            except OSError as exc:
                where = f"{addr[0]}:{port}"
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigurationError(
                        "--metrics-port", f"{where} is already in use",
                        "stop what holds it, or choose another port (0 = any free one)") \
                        from None
                if exc.errno in (errno.EACCES, errno.EPERM):
                    raise ConfigurationError(
                        "--metrics-port", f"binding {where} is not permitted",
                        "use a port above 1023") from None
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise ConfigurationError(
                        "--metrics-host", f"cannot listen on {where} ({exc.strerror})",
                        "give an address of this machine (0.0.0.0 = every interface)") \
                        from None
                not_here.append(where)
                bound.pop().close()
        if not bound:
            raise ConfigurationError(
                "--metrics-host", f"cannot listen on {not_here[0]} (not an address of this "
                "machine)", "give an address of this machine (0.0.0.0 = every interface)")
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def check_device(settings: Settings) -> None:
    """``--device cuda`` needs a CUDA build of torch and a visible GPU; ``auto`` falls back
    to the CPU by itself. Asks without creating a CUDA context (``device_count`` is
    answered by the driver or NVML; the scorer process, which owns the device, creates
    it)."""
    if settings.device != "cuda":
        return
    import torch

    if not torch.backends.cuda.is_built():
        raise ConfigurationError(
            "--device", f"cuda, but this torch ({torch.__version__}) is built without CUDA",
            "install a CUDA build of torch, or use --device auto (the CPU without a GPU)")
    if torch.cuda.device_count() == 0:
        raise ConfigurationError(
            "--device", "cuda, but no GPU is visible to this process (driver, "
            "CUDA_VISIBLE_DEVICES)", "make one visible, or use --device auto or cpu")


def context_tables(settings: Settings) -> ContextTables | None:
    """``--household-info``, ``--weather`` and ``--holidays`` read (None when none is set);
    a file that cannot be used raises ``ConfigurationError`` naming its flag (the reason
    names the line)."""
    from meterwatch.model import ContextTables
    from meterwatch.model.loaders import LoadError

    s = settings
    if not (s.household_info or s.weather or s.holidays):
        return None
    try:
        return ContextTables.from_files(household_csv=s.household_info, weather_csv=s.weather,
                                        holidays_csv=s.holidays)
    except LoadError as exc:
        for flag, attr, _, like in CONTEXT_CSVS:
            path = getattr(s, attr)
            if path is not None and os.fspath(path) == exc.path:
                raise ConfigurationError(flag, str(exc), f"give a CSV of {like}, or leave "
                                         "it out") from None
        raise  # (names its file and line)
    except UnicodeDecodeError as exc:  # a binary file: which one? each alone says
        for flag, attr, _, like in CONTEXT_CSVS:
            path = getattr(s, attr)
            try:
                if path is not None:  # (from_files' keywords: household_csv, ...)
                    ContextTables.from_files(**{f"{attr.split('_')[0]}_csv": path})
            except UnicodeDecodeError:
                raise ConfigurationError(
                    flag, f"{path}: not a text CSV ({exc.reason} at byte {exc.start})",
                    f"give a CSV of {like}, or leave it out") from None
            except (LoadError, OSError):
                pass
        raise


@dataclass
class Checked:
    """What ``check_inputs`` checked, for the service to use as it is, so that a start
    loads and validates each checkpoint once and reads each context CSV once."""

    #: the live model: on the CPU when read from ``--model-path`` (else the one handed to
    #: the service), ``--target-far`` applied, validated
    detector: Detector
    #: ``--shadow-model-path`` on the CPU, the budget applied where it has a curve,
    #: validated against ``detector``; None without one
    shadow: Detector | None
    #: ``--household-info``, ``--weather``, ``--holidays`` read; None when none is set
    tables: ContextTables | None
    #: ``--metrics-host``/``--metrics-port`` bound and listening, for the probes server
    #: (``check_metrics_address``); the service's ``HttpServer`` serves on them
    probes: list[socket.socket]

    def close(self) -> None:
        """Release the probes' sockets (a caller that does not start a service with this)."""
        for sock in self.probes:
            sock.close()


def check_inputs(settings: Settings, detector: Detector | None = None) -> Checked:
    """Step 1 of a start, after ``check_files`` and before anything starts (no probes
    server, no Kafka client): ``--device`` is there, the probes' address can be bound, the
    context CSVs parse, and each checkpoint is usable as the service will hold it. Returns
    what it checked (``Checked``: ``stream.service.Service`` takes it as it is); raises
    ``ConfigurationError`` naming ``--device``, ``--metrics-host`` or ``--metrics-port``,
    ``--model-path``, ``--shadow-model-path``, ``--target-far`` or a CSV's flag.

    ``meterwatch run`` calls it before its settings line, so a refusal is the only line on
    stderr; a ``Service`` started without its result (``run_service`` called directly, an
    embedding program) calls it itself, at the same point of its start. ``detector``: a
    live model handed to the service instead of ``--model-path`` (checked the same way, on
    its own device).

    Each checkpoint is read with ``weights_only`` and built on the CPU whatever ``--device``
    says (the service process never creates a CUDA context; the scorer process owns the
    device), takes the alert budget, and must score the lifecycle's synthetic history to
    finite values (``stream.lifecycle.validate``; a checkpoint with NaN weights loads
    fine)."""
    from meterwatch.model import Detector
    from meterwatch.model.detector import CheckpointError
    from meterwatch.stream.lifecycle import ModelRejected, apply_budget, other_zone, validate

    s = settings
    check_device(s)
    tables = context_tables(s)
    if detector is None and s.model_path is None:
        raise ConfigurationError("--model-path", "no model given",
                                 "train one with meterwatch train and pass its path")

    def usable(flag: str, path: os.PathLike[str] | None, live: Detector | None,
               det: Detector | None = None) -> Detector:
        fix = "give a checkpoint written by meterwatch train" + (
            ", or leave it out" if live is not None else "")
        if det is None:
            assert path is not None
            try:
                det = Detector.load(path, device="cpu")
            except CheckpointError as exc:
                raise ConfigurationError(flag, problem_of(exc), fix) from None
        trained = other_zone(det, s.timezone)
        if trained is not None:
            where = f"{os.fspath(path)}" if path is not None else det.version
            raise ConfigurationError(
                "--timezone", f"{s.timezone}, but {where} was trained on days in {trained}",
                f"run with --timezone {trained}, or give a model trained with meterwatch "
                f"train --timezone {s.timezone}")
        if live is None:
            apply_budget(det, s.target_far, "--target-far")
        else:  # a shadow without a curve keeps its own threshold (the service warns)
            apply_budget(det, s.target_far, flag, optional=True)
        try:
            validate(det, live, tables)
        except ModelRejected as exc:
            where = f"{os.fspath(path)}: " if path is not None else ""
            raise ConfigurationError(flag, f"{where}{exc}", fix) from None
        return det

    with _quiet("meterwatch.model"):  # the service logs the loads; an error is one line
        live = usable("--model-path", None if detector is not None else s.model_path,
                      None, detector)
        shadow = None if s.shadow_model_path is None else \
            usable("--shadow-model-path", s.shadow_model_path, live)
    # last: held from here until the probes server serves on them (or ``Checked.close``)
    return Checked(live, shadow, tables, check_metrics_address(s))


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """INFO lines of ``logger`` held back for the duration (warnings still show)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(max(logging.WARNING, target.getEffectiveLevel()))
    try:
        yield
    finally:
        target.setLevel(level)


def session_timeout_error(settings: Settings) -> ConfigurationError:
    return ConfigurationError(
        "--session-timeout-ms", f"the broker refused {settings.session_timeout_ms} ms",
        "use a value within the broker's group.min/max.session.timeout.ms "
        "(stock Kafka: 6000-1800000)")


async def check_connection(settings: Settings, timeout_s: float = 10.0) -> None:
    """Step 2: raise ``ConfigurationError`` if a bootstrap server refuses our credentials or
    our TLS, or speaks another security protocol; return when one server accepted them or
    none answered (retryable)."""
    refused = await connection_refusal(
        check_bootstrap(settings.bootstrap_servers), settings.kafka_options(), timeout_s)
    if refused is not None:
        raise refused


_TLS = ("SSL", "SASL_SSL")
#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


async def connection_refusal(servers: Sequence[tuple[str, int]], options: dict[str, Any],
                             timeout_s: float = 10.0) -> ConfigurationError | None:
    """Why the brokers refuse us, naming the flag to fix, when a server answered and refused
    our credentials, our TLS or our security protocol (``options``: a client's keyword
    arguments, ``Settings.kafka_options``); None when one accepted or none answered (down,
    not resolved: maybe later). Never the secret."""
    protocol = str(options.get("security_protocol", "PLAINTEXT"))
    mechanism = str(options.get("sasl_mechanism") or "PLAIN")
    for host, port in servers:
        server = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(create_conn(
                host, port,
                client_id=str(options.get("client_id", "meterwatch")),
                request_timeout_ms=int(timeout_s * 1000),
                ssl_context=options.get("ssl_context"), security_protocol=protocol,
                sasl_mechanism=mechanism,
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password")), timeout_s)
        except SaslAuthenticationFailed:
            return _rejected(server, mechanism)
        except KeyError as exc:
            # aiokafka's SCRAM client reads the verifier ("v") from the server's final
            # message; a server that refuses the proof sends an error ("e") instead
            if mechanism.startswith("SCRAM") and exc.args == ("v",):
                return _rejected(server, mechanism)
            log.debug("preflight connection to %s: %r", server, exc)
            continue
        except UnsupportedSaslMechanismError:
            return ConfigurationError(
                "--sasl-mechanism", f"the broker at {server} does not offer {mechanism}",
                "use a mechanism the listener enables")
        except ssl.SSLError as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) \
                or exc.__class__.__name__
            if getattr(exc, "verify_code", None) in _NAME_MISMATCH:
                # the CA is right (the chain was verified first): the name we dialled is not
                # on the certificate
                return ConfigurationError(
                    "--bootstrap-servers",
                    f"the certificate of the broker at {server} is not for {host!r}",
                    "give the broker by a name its certificate is for, or have its "
                    f"certificate name {host!r}")
            return ConfigurationError(
                "--ssl-cafile", f"TLS with {server} failed ({reason})",
                "give the CA that signed the broker's certificate, and an SSL listener")
        except Exception as exc:  # refused, reset, timeout, DNS: maybe later
            log.debug("preflight connection to %s: %r", server, exc)
            # it answered, then hung up in the handshake (or, asked for TLS, waited for the
            # rest of a "request" as a plain listener may): maybe the other protocol
            hung_up = not isinstance(exc, ConnectionRefusedError | socket.gaierror
                                     | TimeoutError)
            if hung_up or (isinstance(exc, TimeoutError) and protocol in _TLS):
                other = await _other_protocol(host, port, protocol in _TLS, timeout_s)
                if other is not None:
                    return _mismatch(server, protocol, *other)
            continue
        wants_sasl, brokers = await _ask_brokers(conn, timeout_s)
        if wants_sasl and not protocol.startswith("SASL"):  # a listener that wants SASL hangs up
            return ConfigurationError(
                "--security-protocol", f"the broker at {server} hung up on a request made "
                "without SASL: its listener wants SASL",
                f"use --security-protocol {'SASL_SSL' if protocol in _TLS else 'SASL_PLAINTEXT'}"
                " with --sasl-mechanism, --sasl-username and --sasl-password")
        return await _advertised_refusal(server, brokers, options, timeout_s)
    return None


#: Pause before the advertised addresses are tried a second time, when none answered: a
#: broker's own DNS name can appear moments after it starts to answer on a shared address.
ADVERTISED_RETRY_S = 3.0


async def _advertised_refusal(server: str, brokers: Sequence[tuple[str, int]],
                              options: dict[str, Any],
                              timeout_s: float) -> ConfigurationError | None:
    """Every connection after the first goes to the addresses the brokers advertise
    (``advertised.listeners``), not to the bootstrap server. A broker in a container or
    behind a load balancer often advertises a name only its own network resolves, and the
    clients retried for ever ("broker not reachable"). ``ConfigurationError`` naming
    ``--bootstrap-servers`` when none of ``brokers`` (host, port) can be reached from here,
    twice ``ADVERTISED_RETRY_S`` apart: not resolved, refused, silent, or TLS that fails (a
    certificate not for the advertised name); a warning naming those that cannot when some
    can; None when all can or none were advertised."""
    if not brokers:
        return None
    failed: list[str] = []
    for attempt in range(2):
        why = await asyncio.gather(*(_reach(h, p, options, timeout_s) for h, p in brokers))
        failed = [f"{h}:{p} ({w})" for (h, p), w in zip(brokers, why, strict=True)
                  if w is not None]
        if len(failed) < len(brokers):
            if failed:
                log.warning("brokers advertise addresses this host cannot reach: %s; their "
                            "partitions are unavailable here until they can be",
                            ", ".join(failed))
            return None
        if attempt == 0:
            await asyncio.sleep(ADVERTISED_RETRY_S)
    return ConfigurationError(
        "--bootstrap-servers", f"the broker at {server} answered, but the brokers give "
        f"their addresses as {', '.join(failed)}",
        "have the brokers advertise addresses this host can reach (advertised.listeners), "
        "or give the listener meant for clients outside their network")


async def _reach(host: str, port: int, options: dict[str, Any],
                 timeout_s: float) -> str | None:
    """Why an advertised address cannot be reached from here (TCP, and the TLS handshake of
    ``options``' protocol with its context), or None."""
    protocol = str(options.get("security_protocol", "PLAINTEXT"))
    context = options.get("ssl_context") if protocol in _TLS else None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if context else None), timeout_s)
    except socket.gaierror:
        return "the name does not resolve here"
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"TLS failed: {exc.reason or exc.__class__.__name__}"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    writer.close()
    return None


def _rejected(server: str, mechanism: str) -> ConfigurationError:
    return ConfigurationError(
        _SASL_FLAG, f"the broker at {server} rejected the credentials ({mechanism})",
        "check the user name, the password and --sasl-mechanism")


def _mismatch(server: str, protocol: str, other: str,
              sasl: bool | None) -> ConfigurationError:
    """The listener speaks ``other`` ("TLS" or "plain text"), wanting SASL or not (None: not
    known): the protocol that matches it, with the SASL flags where the client had none
    (without them where it had some)."""
    use = _matching(other, protocol, sasl)
    speaks = other + (" with SASL" if sasl else "")
    flags = ""
    if use.startswith("SASL") and not protocol.startswith("SASL"):
        flags = " with --sasl-mechanism, --sasl-username and --sasl-password,"
    elif protocol.startswith("SASL") and not use.startswith("SASL"):
        flags = " without the --sasl-* settings,"  # (refused beside a protocol without SASL)
    return ConfigurationError(
        "--security-protocol", f"the broker at {server} speaks {speaks}, not {protocol}",
        f"use --security-protocol {use}{flags} or the broker's listener for {protocol}")


def _matching(other: str, protocol: str, sasl: bool | None = None) -> str:
    """The protocol to use on a listener that speaks ``other`` (TLS or plain text): with
    SASL when it wants SASL (``sasl``), else where it was asked for (``sasl`` None: the
    listener hung up before it could tell)."""
    if sasl is None:
        sasl = protocol.startswith("SASL")
    if other == "TLS":
        return "SASL_SSL" if sasl else "SSL"
    return "SASL_PLAINTEXT" if sasl else "PLAINTEXT"


async def _other_protocol(host: str, port: int, asked_tls: bool,
                          timeout_s: float) -> tuple[str, bool | None] | None:
    """After a connection that failed in its handshake: ("plain text", sasl) when a client
    that asked for TLS meets a listener that answers a plain Kafka version request,
    ("TLS", sasl) when a plain client meets a listener that completes a TLS handshake (any
    certificate: nothing secret is sent); else None. ``sasl``: whether the listener wants
    SASL — it hung up on one metadata request made without it (True), answered it
    (False), or did not answer a Kafka request at all (None)."""
    try:
        if asked_tls:
            conn = await asyncio.wait_for(create_conn(
                host, port, request_timeout_ms=int(timeout_s * 1000),
                security_protocol="PLAINTEXT"), timeout_s)
            # it answered the client's version request in plain text
            return "plain text", await _wants_sasl(conn, timeout_s)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx), timeout_s)
        writer.close()
    except Exception as exc:  # it does not speak the other one either
        log.debug("preflight: %s:%d speaks neither protocol: %r", host, port, exc)
        return None
    try:  # TLS: a Kafka listener behind it? (one that wants SASL answers versions too)
        conn = await asyncio.wait_for(create_conn(
            host, port, request_timeout_ms=int(timeout_s * 1000), ssl_context=ctx,
            security_protocol="SSL"), timeout_s)
    except Exception as exc:
        log.debug("preflight: %s:%d speaks TLS, then no Kafka: %r", host, port, exc)
        return "TLS", None
    return "TLS", await _wants_sasl(conn, timeout_s)


async def _wants_sasl(conn: Any, timeout_s: float) -> bool | None:
    """Whether the listener of ``conn`` (connected, versions exchanged, no SASL) wants SASL:
    it hangs up on a metadata request (True) or answers it (False); None if neither."""
    return (await _ask_brokers(conn, timeout_s))[0]


async def _ask_brokers(conn: Any, timeout_s: float) -> tuple[bool | None, list[tuple[str, int]]]:
    """One metadata request on ``conn`` (connected, versions exchanged), closed after:
    whether the listener hung up on it (True; without SASL: it wants SASL), answered it
    (False, and the (host, port) each broker advertises) or neither (None)."""
    try:
        answer = await asyncio.wait_for(conn.send(MetadataRequest([])), timeout_s)
        return False, [(str(b[1]), int(b[2])) for b in answer.brokers]
    except KafkaConnectionError:
        return True, []
    except Exception as exc:
        log.debug("preflight request: %r", exc)
        return None, []
    finally:
        conn.close()


async def check_topics(settings: Settings, admin: AIOKafkaAdminClient,
                       outputs: Sequence[str], compacted: Sequence[str] = ()) -> int:
    """Step 3; returns the input topic's partition count."""
    s = settings
    existing = set(await admin.list_topics())
    if s.input_topic not in existing:
        await check_topics_authorized(s, admin)  # a topic it may not describe is not listed
        raise ConfigurationError(
            "--input-topic", f"topic {s.input_topic!r} does not exist",
            "create it (meterwatch never creates its input) or fix the name")
    input_meta = await _partition_metadata(admin, s.input_topic)
    n_input = len(input_meta)
    missing = [t for t in outputs if t not in existing]
    if missing and s.create_topics:
        n = max(s.topic_partitions, n_input)
        # as durable as the input: a state topic of one replica loses every household's
        # state with one broker (and, below min.insync.replicas, refuses every write)
        rf = s.replication_factor or _replicas(input_meta)
        new = [NewTopic(t, n, rf, topic_configs={"cleanup.policy": "compact"}
                        if t in compacted else {}) for t in missing]
        try:
            answer = await admin.create_topics(new)
        except TopicAlreadyExistsError:
            pass
        else:
            _creation_refused(answer, n, s)
        log.info("created topics %s with %d partitions and %d replicas", missing, n, rf)
    elif missing:
        raise ConfigurationError(
            "--create-topics", f"output topics {missing} do not exist",
            "create them with at least as many partitions as the input, or pass "
            "--create-topics")
    # before any question about a topic it may not describe (it would look like one with
    # no partitions)
    await check_topics_authorized(s, admin)
    for t in compacted:  # one the platform made: kept, not deleted after a retention
        policy = await _cleanup_policy(admin, t) if t in existing else None
        if policy is not None and "compact" not in {p.strip() for p in policy.split(",")}:
            raise ConfigurationError(
                _topic_flag(s, t, "--state-topic"), f"topic {t!r} has cleanup.policy="
                f"{policy}: the household states in it would be deleted after its retention, "
                "and recovery would read every one kept",
                f"make it compacted (kafka-configs.sh --alter --entity-type topics "
                f"--entity-name {t} --add-config cleanup.policy=compact), or name a new "
                "topic (created compacted with --create-topics)")
    small = {t: n for t in outputs if (n := await _partitions(admin, t)) < n_input}
    if small and s.create_topics:  # the input grew: the service's own topics grow with it
        await _grow(admin, small, n_input, s)
    for t, n in small.items():
        if not s.create_topics:
            raise ConfigurationError(
                "--topic-partitions", _fewer(t, n, n_input, s),
                f"add partitions to {t!r} (at least {n_input}), or pass --create-topics")
    await await_group_coordinator(s, admin)  # last, right before the consumer joins
    return n_input


async def _grow(admin: AIOKafkaAdminClient, small: dict[str, int], n: int,
                settings: Settings) -> None:
    """Add partitions to the output topics ``small`` (topic -> its count) up to ``n``:
    records about input partition ``p`` go to partition ``p`` of each (named, never by key
    hash), so nothing already written moves."""
    for t, had in small.items():
        try:
            await admin.create_partitions({t: NewPartitions(total_count=n)})
        except KafkaError as exc:
            if await _partitions(admin, t) >= n:  # another member grew it meanwhile
                continue
            raise ConfigurationError(
                "--topic-partitions", f"{_fewer(t, had, n, settings)}, and the broker "
                f"refused to add partitions ({type(exc).__name__})",
                f"add partitions to {t!r} yourself, or recreate it, with at least {n}"
            ) from None
        for _ in range(50):  # until the broker's metadata shows them (at most 10 s)
            if await _partitions(admin, t) >= n:
                break
            await asyncio.sleep(0.2)
        log.warning("output topic %r grew from %d to %d partitions: the input topic %r has %d",
                    t, had, n, settings.input_topic, n)


def _fewer(topic: str, n: int, n_input: int, settings: Settings) -> str:
    return (f"output topic {topic!r} has {n} partitions, fewer than the {n_input} of input "
            f"topic {settings.input_topic!r}")


#: What a broker answers while it makes or loads a group's coordinator.
_COORDINATOR_LOADING = (GroupCoordinatorNotAvailableError, GroupLoadInProgressError,
                        NotCoordinatorForGroupError)


async def await_group_coordinator(settings: Settings, admin: AIOKafkaAdminClient,
                                  wait_s: float = 20.0) -> bool:
    """Wait until the broker answers for ``--group-id``'s coordinator (a DescribeGroups
    request answered without error: the coordinator is there and has loaded its
    partition), at most ``wait_s``; True when it does, or when the broker answers something
    else (the consumer will say what). A new cluster makes the coordinator on first use:
    Kafka 4.0 answers COORDINATOR_NOT_AVAILABLE while it creates ``__consumer_offsets`` and
    NOT_COORDINATOR while it loads it (about 1 s here), and aiokafka's consumer logs each
    of its tries as an ERROR ("Group Coordinator Request failed") or a WARNING ("Marking the
    coordinator dead"); these tries are logged at DEBUG. One that lasts is a WARNING, and
    the consumer then joins as before, its own warnings showing the outage."""
    group = settings.group_id
    t0 = time.monotonic()
    delay = 0.05
    while True:
        try:
            groups = await describe_group(admin, group)
            error: type[Exception] | None = next((for_code(c) for c, _ in groups if c), None)
        except _COORDINATOR_LOADING as exc:  # (find_coordinator raises these)
            error = type(exc)
        except KafkaConnectionError:
            raise  # the broker went away: the caller retries the connection
        except GroupAuthorizationFailedError:  # (find_coordinator: no DESCRIBE)
            raise group_refused(settings) from None
        except (KafkaError, AttributeError, IndexError, TypeError) as exc:
            log.debug("group coordinator of %r: %r; the consumer will find it", group, exc)
            return True  # (an old broker: not ours to decide)
        if error is GroupAuthorizationFailedError:
            raise group_refused(settings)
        if error is None:
            for _, operations in groups:
                check_group_authorized(settings, operations)
        waited = time.monotonic() - t0
        if error is None or not issubclass(error, _COORDINATOR_LOADING):
            if error is not None:
                log.debug("group coordinator of %r: %s", group, error.__name__)
            (log.info if waited > 2 else log.debug)(
                "group coordinator of %r ready after %.1f s", group, waited)
            return True
        log.debug("group coordinator of %r not ready (%s)", group, error.__name__)
        if waited > wait_s:
            log.warning(
                "the broker has no coordinator ready for group %r after %.0f s (%s; a cluster "
                "with fewer brokers than offsets.topic.replication.factor never has one); "
                "joining anyway", group, waited, error.__name__)
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _creation_refused(answer: Any, n: int, settings: Settings) -> None:
    """Raise ``ConfigurationError`` for a topic the broker would not create (an ACL, a
    creation policy, a name that collides with an existing one): the admin client returns
    those as error codes, and the topic would otherwise show as one with no partitions."""
    for topic, code, *rest in getattr(answer, "topic_errors", ()):
        if code in (0, TopicAlreadyExistsError.errno):
            continue
        error = for_code(code)
        why = error.__name__ + (f": {rest[0]}" if rest and rest[0] else "")
        problem = f"the broker refused to create {topic!r} ({why[:200]})"
        if error is InvalidTopicError:  # e.g. 'a_b' beside an existing 'a.b'
            raise ConfigurationError(_topic_flag(settings, topic, "--create-topics"), problem,
                                     "give it another name")
        if error is InvalidReplicationFactorError:  # more replicas than brokers
            raise ConfigurationError(
                "--replication-factor", problem, "give at most as many replicas as the "
                "cluster has brokers")
        raise ConfigurationError(
            "--create-topics", problem, f"create the output topics yourself with at least "
            f"{n} partitions (and --no-create-topics), or allow the service to create them")


def _topic_flag(settings: Settings, topic: str, default: str) -> str:
    """The flag that names ``topic`` (``--alerts-topic`` ...), else ``default``."""
    return next((f"--{a.replace('_', '-')}" for a in TOPIC_SETTINGS
                 if getattr(settings, a) == topic), default)


async def _cleanup_policy(admin: AIOKafkaAdminClient, topic: str) -> str | None:
    """The topic's ``cleanup.policy``; None where the broker does not say."""
    return (await _topic_config(admin, [topic], "cleanup.policy")).get(topic)


async def record_limit(admin: AIOKafkaAdminClient, topic: str) -> int | None:
    """The topic's ``max.message.bytes``; None where the broker does not say."""
    value = (await _topic_config(admin, [topic], "max.message.bytes")).get(topic)
    return None if value is None else int(value)


async def _topic_config(admin: AIOKafkaAdminClient, topics: Sequence[str],
                        key: str) -> dict[str, str]:
    """Each topic's value of the configuration ``key`` (its own, or the broker default it
    has), for the topics the broker says it of: none where it does not (Tansu closes the
    connection on a DescribeConfigs request; an ACL may refuse it)."""
    out: dict[str, str] = {}
    try:
        answers = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, {key: None}) for t in topics])
        for answer in answers:
            for code, _, _, name, entries in answer.resources:
                value = next((e[1] for e in entries if e[0] == key), None)
                if name in topics and not code and value is not None:
                    out[name] = str(value)
    except (KafkaError, AttributeError, IndexError, TypeError, ValueError) as exc:
        log.debug("%s of %s not known (%r): not checked", key, list(topics), exc)
    return out


#: The smallest ``max.message.bytes`` an output topic may have: the largest record the
#: service writes is a day score of about 3 KB (1.1 KB of household state); a record batch
#: must hold at least one with room to spare. Dead letters are cut to fit their topic's
#: limit, which must hold the document about one (its detail, source, a cut value).
MIN_RECORD_LIMIT = 64 * 1024
MIN_DEAD_LETTER_LIMIT = 8 * 1024


async def record_limits(settings: Settings, admin: AIOKafkaAdminClient) -> dict[str, int]:
    """Each output topic's ``max.message.bytes`` (the largest record batch it takes), as
    the broker says it; ``ConfigurationError`` naming the topic's setting when one is too
    small for the service's records (``MIN_RECORD_LIMIT``). A producer batch larger than
    a topic's limit was refused with ``MessageSizeTooLargeError``, which stopped the
    service (exit 1) and, after a restart, again at the same batch."""
    s = settings
    topics = [getattr(s, a) for a in TOPIC_SETTINGS if a != "input_topic"]
    limits = {t: int(v) for t, v in
              (await _topic_config(admin, topics, "max.message.bytes")).items()}
    for t, n in limits.items():
        least = MIN_DEAD_LETTER_LIMIT if t == s.dead_letter_topic else MIN_RECORD_LIMIT
        if n < least:
            raise ConfigurationError(
                _topic_flag(s, t, "--scores-topic"), f"topic {t!r} takes record batches of "
                f"at most {n} bytes (max.message.bytes)",
                f"raise its max.message.bytes to at least {least}, or name another topic")
    return limits


async def replication_factor(admin: AIOKafkaAdminClient, topic: str) -> int:
    """The replication factor of an existing topic."""
    return _replicas(await _partition_metadata(admin, topic))


def _replicas(partitions: list[dict[str, Any]]) -> int:
    """A topic's replication factor from its partition metadata (its first partition's)."""
    return max(1, len(partitions[0].get("replicas") or ())) if partitions else 1


async def input_partitions(admin: AIOKafkaAdminClient, topic: str) -> int:
    """The partition count of an existing topic."""
    return await _partitions(admin, topic)


async def _partitions(admin: AIOKafkaAdminClient, topic: str, wait_s: float = 10.0) -> int:
    """The topic's partition count (see ``_partition_metadata``)."""
    return len(await _partition_metadata(admin, topic, wait_s))


async def _partition_metadata(admin: AIOKafkaAdminClient, topic: str,
                              wait_s: float = 10.0) -> list[dict[str, Any]]:
    """The topic's partitions as the broker describes them (none: it has none); a topic
    created a moment ago may need a few metadata rounds before its partitions show."""
    deadline = time.monotonic() + wait_s
    while True:
        for t in await admin.describe_topics([topic]):
            if t["topic"] == topic and t["partitions"]:
                return list(t["partitions"])
        if time.monotonic() > deadline:
            return []
        await asyncio.sleep(0.2)
