"""A client and a listener that speak different security protocols: ``meterwatch run`` used
to retry for ever ("broker not reachable" every 10 s) when TLS met a plain listener, a plain
client met a TLS listener or a listener that wants SASL. Now it exits 2 with one line naming
``--security-protocol`` and the protocol to use (found by the new-user audit,
``docs/audit.md``). A listener's wish for SASL is told by one metadata request made without
it, over TLS too: a plain client on a SASL_SSL listener was told to use SSL, a TLS client on
a SASL_PLAINTEXT listener to use PLAINTEXT (``docs/first-contact.md``).

The TLS listeners in front of the embedded broker are TLS-terminating proxies (as stunnel
or a cloud load balancer makes one): the broker behind them is real, and what it answers
(or hangs up on) goes back through TLS. On Apache Kafka 4.0 started with ``--sasl`` the
SASL_SSL listener is Kafka's own (``KAFKA_SASL_SSL``, passed by .ci/run)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterwatch.stream.broker import Broker, free_port
from meterwatch.stream.preflight import _advertised_refusal, connection_refusal
from tests.cli_helpers import meterwatch, one_line_error
from tests.conftest import genuine_kafka, unique_settings
from tests.test_config_tls import _pair, tls_server
from tests.test_faults_contract import assert_fails_fast, run_to_exit, sasl_bootstrap

SASL_FLAGS = "with --sasl-mechanism, --sasl-username and --sasl-password,"


@contextlib.contextmanager
def tls_proxy(folder: Path, upstream: str, names: str = "",
              listen_port: int = 0) -> Iterator[str]:
    """A TLS listener on 127.0.0.1 (on ``listen_port``, else a free one; self-signed certificate
    ``folder/proxy.pem``, for the host ``names`` where given) that forwards what it
    decrypts to ``upstream`` (host:port) and back: a TLS listener of that broker. Yields its
    host:port."""
    cert, key = _pair(folder, "proxy", names=names)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    host, port = upstream.rsplit(":", 1)
    loop = asyncio.new_event_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = loop.run_until_complete(
        asyncio.start_server(forward, "127.0.0.1", listen_port, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        async def shut() -> None:  # connections still open end here, not in the collector
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextlib.contextmanager
def tls_broker(folder: Path, names: str) -> Iterator[str]:
    """An embedded broker whose only listener its clients reach is TLS: a ``tls_proxy`` in
    front of it, and the broker advertises the proxy's address. Yields that host:port."""
    port = free_port()
    broker = Broker.start(prefer="tansu", advertise=f"127.0.0.1:{port}")
    try:
        with tls_proxy(folder, broker.bootstrap_servers, names, port) as listener:
            yield listener
    finally:
        broker.stop()


@contextlib.contextmanager
def sasl_ssl_listener(broker: Broker, folder: Path) -> Iterator[str]:
    """A SASL_SSL listener: Kafka's own (``kafka.sh start --sasl``), or TLS in front of an
    embedded broker that requires SASL (``sasl_bootstrap``)."""
    if genuine_kafka(broker) and os.environ.get("KAFKA_SASL_SSL"):
        yield os.environ["KAFKA_SASL_SSL"]
        return
    with sasl_bootstrap(broker) as plain, tls_proxy(folder, plain) as listener:
        yield listener


def refusal(listener: str, protocol: str, timeout_s: float = 5.0) -> str:
    host, port = listener.rsplit(":", 1)
    options: dict[str, object] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context()  # (not reached: no TLS)
    refused = asyncio.run(connection_refusal([(host, int(port))], options, timeout_s))
    assert refused is not None
    return str(refused)


@pytest.mark.integration
def test_tls_client_on_a_plain_listener(broker, detector_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, _ = _pair(tmp_path, "ca")
    settings = unique_settings(broker, create_input=False, security_protocol="SSL",
                               ssl_cafile=str(ca))
    line = assert_fails_fast(run_to_exit(settings, detector_path), "--security-protocol",
                             mentions="speaks plain text, not SSL")
    assert "use --security-protocol PLAINTEXT" in line, line


@pytest.mark.integration
def test_plain_client_on_a_listener_that_wants_sasl(broker, detector_path) -> None:  # type: ignore[no-untyped-def]
    with sasl_bootstrap(broker) as bootstrap:
        settings = unique_settings(broker, create_input=False, bootstrap_servers=bootstrap)
        line = assert_fails_fast(run_to_exit(settings, detector_path), "--security-protocol",
                                 mentions="its listener wants SASL")
    assert "use --security-protocol SASL_PLAINTEXT" in line, line


@pytest.fixture
def tls_listener(tmp_path: Path) -> Iterator[int]:
    with tls_server(tmp_path) as port:
        yield port


def test_plain_client_on_a_tls_listener(tls_listener: int) -> None:
    refused = asyncio.run(connection_refusal([("127.0.0.1", tls_listener)],
                                             {"security_protocol": "PLAINTEXT"}, 5.0))
    assert refused is not None
    assert str(refused) == (f"--security-protocol: the broker at 127.0.0.1:{tls_listener} "
                            "speaks TLS, not PLAINTEXT; use --security-protocol SSL or the "
                            "broker's listener for PLAINTEXT")


def test_nothing_listening_is_not_a_protocol_error() -> None:
    """A broker that is down is retried (maybe later), never reported as a protocol."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        for protocol in ("PLAINTEXT", "SSL"):
            options = {"security_protocol": protocol}
            if protocol == "SSL":
                options["ssl_context"] = ssl.create_default_context()
            assert asyncio.run(connection_refusal([("127.0.0.1", port)], options, 2.0)) is None


@pytest.mark.integration
def test_plain_client_on_a_sasl_ssl_listener(broker, detector_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Was: "speaks TLS, not PLAINTEXT; use --security-protocol SSL", and SSL then failed
    on the listener's SASL."""
    with sasl_ssl_listener(broker, tmp_path) as listener:
        settings = unique_settings(broker, create_input=False, bootstrap_servers=listener)
        line = assert_fails_fast(run_to_exit(settings, detector_path), "--security-protocol",
                                 mentions=f"the broker at {listener} speaks TLS with SASL, "
                                          "not PLAINTEXT")
    assert line.endswith(f"use --security-protocol SASL_SSL {SASL_FLAGS} or the broker's "
                         "listener for PLAINTEXT"), line


@pytest.mark.integration
def test_plain_client_on_a_real_tls_listener(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A TLS listener of the broker that does not want SASL: SSL (it answers the metadata
    request made over TLS without SASL)."""
    with tls_proxy(tmp_path, broker.bootstrap_servers) as listener:
        t0 = time.monotonic()
        assert refusal(listener, "PLAINTEXT") == (
            f"--security-protocol: the broker at {listener} speaks TLS, not PLAINTEXT; use "
            "--security-protocol SSL or the broker's listener for PLAINTEXT")
        assert refusal(listener, "SASL_PLAINTEXT").endswith(  # (was: SASL_SSL)
            "speaks TLS, not SASL_PLAINTEXT; use --security-protocol SSL without the "
            "--sasl-* settings, or the broker's listener for SASL_PLAINTEXT")
        assert time.monotonic() - t0 < 10


@pytest.mark.integration
def test_tls_client_on_a_sasl_plaintext_listener(broker) -> None:  # type: ignore[no-untyped-def]
    """Was: "use --security-protocol PLAINTEXT", which the listener then hung up on."""
    with sasl_bootstrap(broker) as listener:
        assert refusal(listener, "SSL", timeout_s=2.0) == (
            f"--security-protocol: the broker at {listener} speaks plain text with SASL, not "
            f"SSL; use --security-protocol SASL_PLAINTEXT {SASL_FLAGS} or the broker's "
            "listener for SSL")


@pytest.mark.integration
def test_a_certificate_the_client_cannot_trust(broker, detector_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """TLS verification failures exit 2 naming what to fix. A CA that did not sign the
    broker's certificate names ``--ssl-cafile``. The right CA with a certificate that is
    not for the address dialled names ``--bootstrap-servers``: it used to say "give the CA
    that signed the broker's certificate", the CA the user had given. The right CA and a
    certificate for the address pass the check."""
    base = unique_settings(broker, create_input=False)
    for names in ("IP:127.0.0.1", "DNS:kafka-0.example.net"):
        folder = tmp_path / names.replace(":", "-")
        folder.mkdir()
        with tls_broker(folder, names) as listener:
            host, port = listener.rsplit(":", 1)
            tls = base.model_copy(update=dict(bootstrap_servers=listener,
                                              security_protocol="SSL",
                                              ssl_cafile=folder / "proxy.pem"))
            refused = asyncio.run(connection_refusal([(host, int(port))],
                                                     tls.kafka_options(), 5.0))
            if names.startswith("IP:"):
                assert refused is None, refused  # verified: nothing to refuse
                other, _ = _pair(folder, "other")
                wrong = tls.model_copy(update=dict(ssl_cafile=other))
                line = assert_fails_fast(run_to_exit(wrong, detector_path), "--ssl-cafile",
                                         mentions=f"TLS with {listener} failed")
                assert line.endswith("give the CA that signed the broker's certificate, and "
                                     "an SSL listener"), line
            else:
                assert str(refused) == (
                    f"--bootstrap-servers: the certificate of the broker at {listener} is not "
                    "for '127.0.0.1'; give the broker by a name its certificate is for, or "
                    "have its certificate name '127.0.0.1'")


@pytest.mark.integration
def test_brokers_that_advertise_an_address_this_host_cannot_reach(detector_path) -> None:  # type: ignore[no-untyped-def]
    """A broker in a container advertising its container name (``advertised.listeners``):
    the bootstrap server answers, every later connection fails. ``meterwatch run`` said
    "broker not reachable" every 10 s for ever (and aiokafka logged "Name or service not
    known"); it now exits 2 naming ``--bootstrap-servers`` and what the brokers advertise,
    and so does ``meterwatch simulate``."""
    broker = Broker.start(prefer="tansu", advertise="kafka-0.invalid:9092")
    try:
        settings = unique_settings(broker, create_input=False)
        line = assert_fails_fast(
            run_to_exit(settings, detector_path), "--bootstrap-servers",
            mentions=f"the broker at {broker.bootstrap_servers} answered, but the brokers give "
                     "their addresses as kafka-0.invalid:9092 (the name does not resolve here)")
        assert line.endswith("; have the brokers advertise addresses this host can reach "
                             "(advertised.listeners), or give the listener meant for clients "
                             "outside their network"), line
        # the producer of `simulate` timed out after 40 s with a traceback
        proc = meterwatch("simulate", "--bootstrap-servers", broker.bootstrap_servers,
                          "--households", "2", "--days", "1", timeout=60)
        assert one_line_error(proc) == line
    finally:
        broker.stop()


@pytest.mark.integration
def test_an_advertised_address_some_cannot_reach_is_a_warning(broker, caplog) -> None:  # type: ignore[no-untyped-def]
    """One broker of several out of reach is a broker down (its partitions wait), not a
    setting to fix: a warning naming it, and no refusal."""
    host, port = broker.bootstrap_servers.rsplit(":", 1)
    brokers = [(host, int(port)), ("kafka-1.invalid", 9092)]
    with caplog.at_level(logging.WARNING, logger="meterwatch.stream.preflight"):
        refused = asyncio.run(_advertised_refusal(broker.bootstrap_servers, brokers,
                                                  {"security_protocol": "PLAINTEXT"}, 5.0))
    assert refused is None
    assert [r.getMessage() for r in caplog.records] == [
        "brokers advertise addresses this host cannot reach: kafka-1.invalid:9092 (the name "
        "does not resolve here); their partitions are unavailable here until they can be"]
