"""TLS files that exist but cannot be used are a settings error naming the flag, for every
command that reads the connection settings (``config``, ``simulate``, ``run``): ``simulate``
used to print OpenSSL's own line with no flag
(``meterwatch: error: [X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_helpers import clean_env, meterwatch, one_line_error


def _pair(folder: Path, name: str, *, names: str = "") -> tuple[Path, Path]:
    """A self-signed certificate and its unencrypted key (PEM), made with openssl; for the
    host ``names`` (a subjectAltName, e.g. ``IP:127.0.0.1``) where given."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    san = ["-addext", f"subjectAltName={names}"] if names else []
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}", *san],
                   check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def tls_server(folder: Path) -> Iterator[int]:
    """A real TLS listener on a free port of 127.0.0.1 with a self-signed certificate: it
    completes a handshake (for a client that accepts the certificate) and drops what it is
    sent. Yields the port."""
    cert, key = _pair(folder, "server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(sock, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pem")
    cert, key = _pair(folder, "a")
    _, other_key = _pair(folder, "b")
    encrypted = folder / "encrypted.key"
    subprocess.run(["openssl", "rsa", "-in", str(key), "-aes256", "-passout", "pass:x",
                    "-out", str(encrypted)], check=True, capture_output=True)
    text = folder / "notes.txt"
    text.write_text("not a certificate\n")
    return {"cert": cert, "key": key, "other_key": other_key, "encrypted": encrypted,
            "text": text}


CASES = [
    (["--ssl-cafile", "text"], "--ssl-cafile: ", "holds no PEM certificate"),
    (["--ssl-cafile", "key"], "--ssl-cafile: ", "holds no PEM certificate"),
    (["--ssl-certfile", "cert", "--ssl-keyfile", "other_key"], "--ssl-certfile: ",
     "KEY_VALUES_MISMATCH"),
    (["--ssl-certfile", "cert", "--ssl-keyfile", "encrypted"], "--ssl-certfile: ",
     "the key is encrypted"),
    (["--ssl-certfile", "text", "--ssl-keyfile", "key"], "--ssl-certfile: ",
     "not a PEM certificate and its unencrypted key"),
]


@pytest.mark.parametrize("command", ["config", "simulate"])
@pytest.mark.parametrize(("flags", "starts", "says"), CASES)
def test_unusable_tls_file_is_one_line_naming_the_flag(pem: dict[str, Path], command: str,
                                                       flags: list[str], starts: str,
                                                       says: str) -> None:
    args = [str(pem[f]) if f in pem else f for f in flags]
    extra = ["--households", "1", "--days", "1"] if command == "simulate" else []
    proc = meterwatch(command, "--security-protocol", "SSL", *args, *extra,
                      "--bootstrap-servers", "127.0.0.1:9", env=clean_env(), timeout=120)
    line = one_line_error(proc)
    assert line.startswith(f"meterwatch: error: {starts}"), line
    assert says in line, line
    assert "BEGIN" not in proc.stderr and "PRIVATE" not in proc.stderr, proc.stderr


def test_usable_tls_files_pass(pem: dict[str, Path]) -> None:
    proc = meterwatch("config", "--security-protocol", "SSL", "--ssl-cafile", str(pem["cert"]),
                      "--ssl-certfile", str(pem["cert"]), "--ssl-keyfile", str(pem["key"]),
                      env=clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(pem["cert"]) in proc.stdout


def test_unusable_tls_file_in_run_names_the_flag(pem: dict[str, Path], tmp_path: Path) -> None:
    proc = meterwatch("run", "--model-path", str(tmp_path / "none.pt"), "--security-protocol",
                      "SSL", "--ssl-cafile", str(pem["text"]), env=clean_env(), timeout=120)
    line = one_line_error(proc)
    assert line.startswith("meterwatch: error: --ssl-cafile: "), line
