"""A small HTTP server on the event loop: ``/metrics``, ``/healthz`` and ``/readyz``.

It starts before anything else, so a service waiting for its broker already answers
``/healthz`` (alive) and ``/readyz`` (503 with the unmet checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class HttpServer:
    """Serves metrics and probes; ``readiness()`` returns ``{check: ok}``.

    ``start``/``stop`` (or ``async with``); ``stop`` is safe twice."""

    def __init__(self, registry: CollectorRegistry, readiness: Callable[[], dict[str, bool]],
                 host: str, port: int) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.port = port
        self._servers: list[asyncio.base_events.Server] = []

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, sockets: Sequence[socket.socket] = ()) -> None:
        """Serve on ``sockets``, bound to ``host``:``port`` already (``meterwatch run`` binds
        them in ``stream.preflight.check_metrics_address``, so a port that is taken is
        refused there, once); without any, bind ``host``:``port`` here. The sockets are the
        server's from here on (closed by ``stop``)."""
        if sockets:
            self._servers = [await asyncio.start_server(self._handle, sock=sock)
                             for sock in sockets]
        else:
            self._servers = [await asyncio.start_server(self._handle, self.host, self.port)]
        self.port = self._servers[0].sockets[0].getsockname()[1]
        log.info("metrics and probes on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, ctype, body = self._route(path)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return "200 OK", "application/json", b'{"status":"ok"}'
        if path == "/readyz":
            checks = self.readiness()
            ok = all(checks.values())
            body = orjson.dumps({"ready": ok, "checks": checks})
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        return "404 Not Found", "text/plain", b"not found\n"
