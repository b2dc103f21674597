"""HTTP keep-alive: the server keeps an idle connection open longer than clients' pools do.

httpx (under fal-client) expires a pooled connection after 5 s idle, and uvicorn's default
closes it after 5 s too: a request sent as the server closes fails with a connection reset
(``httpx.ReadError``; an overload test hit it once on CI). livegen holds idle connections for
``LIVEGEN_KEEP_ALIVE_TIMEOUT_S`` (75 s), so the client always closes first."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from livegen.bench.null_engine import NullEngine, serve_in_thread
from livegen.settings import Settings
from tests.conftest import LiveServer

HTTPX_POOL_EXPIRY_S = httpx.Limits().keepalive_expiry or 5.0


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.rsplit("//", 1)[1].split(":")
    return host, int(port)


def get_readyz(sock: socket.socket) -> bytes:
    """One ``GET /readyz`` on an open connection, read to the end of its body; b"" if the
    server had closed the connection."""
    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: livegen\r\n\r\n")
    response = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b""
        if not chunk:
            return response
        response += chunk
        head, found, body = response.partition(b"\r\n\r\n")
        lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
        if found and lengths and len(body) >= int(lengths[0].split(b":")[1]):
            return response


def test_an_idle_connection_outlives_the_clients_pool_expiry(live_server: LiveServer) -> None:
    with socket.create_connection(address(live_server.base_url), timeout=10) as sock:
        assert get_readyz(sock).startswith(b"HTTP/1.1 200")
        time.sleep(HTTPX_POOL_EXPIRY_S + 1.0)  # past uvicorn's default 5 s
        assert get_readyz(sock).startswith(b"HTTP/1.1 200"), "the server closed an idle connection a client may reuse"


def test_idle_connections_are_closed_after_the_keep_alive_timeout(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys="k", models=[], keep_alive_timeout_s=1)  # type: ignore[arg-type]
    with serve_in_thread(settings, NullEngine()) as url, socket.create_connection(address(url), timeout=10) as sock:
        assert get_readyz(sock).startswith(b"HTTP/1.1 200")
        time.sleep(2.5)
        sock.settimeout(5)
        assert sock.recv(1) == b"", "an idle connection was kept past LIVEGEN_KEEP_ALIVE_TIMEOUT_S"
