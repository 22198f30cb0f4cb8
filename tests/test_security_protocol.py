"""A client and a listener that speak different security protocols: ``meterwatch run`` used
to retry for ever ("broker not reachable" every 10 s) when TLS met a plain listener, a plain
client met a TLS listener or a listener that wants SASL. Now it exits 2 with one line naming
``--security-protocol`` and the protocol to use (found by the new-user audit,
``docs/audit.md``)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterwatch.stream.preflight import connection_refusal
from tests.conftest import unique_settings
from tests.test_config_tls import _pair, tls_server
from tests.test_faults_contract import assert_fails_fast, run_to_exit, sasl_bootstrap


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
