"""server/urlfetch.py against a real loopback HTTP server, stub resolvers and httpx.MockTransport."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from livegen.bench import free_port
from livegen.protocol.errors import FetchRefused, PayloadTooLarge
from livegen.server.urlfetch import FetchPolicy, Resolver, check_target, fetch_bytes

BODY = bytes(range(256)) * 8  # 2048 bytes
DEFAULT = FetchPolicy()
PRIVATE_OK = FetchPolicy(allow_private=True, timeout_s=5.0)


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, self.headers.get("Host")))
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/img":
            self._send(200, BODY)
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/big-streamed":  # no Content-Length: the body ends when we close
            self.send_response(200)
            self.end_headers()
            for _ in range(10):
                self.wfile.write(BODY)
        elif parts.path == "/slow":
            self.server.release.wait(5)
        elif parts.path == "/trickle":  # one byte every 0.1 s: no single read ever times out
            self.send_response(200)
            self.send_header("Content-Length", "50")
            self.end_headers()
            for _ in range(50):
                if self.server.release.wait(0.1):
                    return
                self.wfile.write(b"x")
                self.wfile.flush()
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients we time out on purpose leave broken pipes behind


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(2)


def stub_resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def fetch(url: str, policy: FetchPolicy = DEFAULT, **kwargs: Any) -> bytes:
    return asyncio.run(fetch_bytes(url, policy, **kwargs))


def refused(url: str, policy: FetchPolicy = DEFAULT, **kwargs: Any) -> FetchRefused:
    with pytest.raises(FetchRefused) as info:
        fetch(url, policy, **kwargs)
    assert info.value.http_status == 422
    return info.value


def mock(handler: Any) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


# --- private addresses -------------------------------------------------------------------------


def test_loopback_is_refused_by_default_without_connecting(server: LoopbackServer) -> None:
    exc = refused(f"http://127.0.0.1:{server.port}/img")
    assert "private or loopback address (127.0.0.1)" in exc.message
    assert "--allow-private-urls" in exc.message
    assert exc.loc == ("body", "image_url")
    assert server.connections == 0


def test_loopback_is_fetched_when_private_urls_are_allowed(server: LoopbackServer) -> None:
    assert fetch(f"http://127.0.0.1:{server.port}/img", PRIVATE_OK) == BODY
    assert server.connections == 1


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",  # decimal
        "0x7f.1",  # hex, short form
        "0x7f000001",
        "127.1",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
        "[::ffff:7f00:1]",
        "0.0.0.0",
        "[::]",
        "169.254.169.254",  # cloud metadata
    ],
)
def test_every_spelling_of_a_private_address_is_refused(server: LoopbackServer, host: str) -> None:
    exc = refused(f"http://{host}:{server.port}/img", field="mask_url")
    assert "private or loopback address" in exc.message
    assert exc.loc == ("body", "mask_url")
    assert server.connections == 0


def test_octal_ip_is_refused(server: LoopbackServer) -> None:
    # httpx itself rejects the octal form; either way it never reaches the network.
    refused(f"http://0177.0.0.1:{server.port}/img")
    assert server.connections == 0


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",  # carrier-grade NAT: not global
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",  # NAT64 for 127.0.0.1
        "2002:7f00:1::",  # 6to4 for 127.0.0.1
        "not-an-address",
    ],
)
def test_resolved_non_public_addresses_are_refused(address: str) -> None:
    requests: list[httpx.Request] = []
    transport = mock(lambda r: requests.append(r) or httpx.Response(200))
    exc = refused("http://name.test/x.png", resolver=stub_resolver({"name.test": [address]}), transport=transport)
    assert f"name.test → {address}" in exc.message
    assert requests == []


def test_one_private_address_among_public_ones_is_enough_to_refuse() -> None:
    resolver = stub_resolver({"name.test": ["93.184.216.34", "10.1.2.3"]})
    assert "10.1.2.3" in refused("http://name.test/", resolver=resolver).message


@pytest.mark.parametrize(
    "address, connected_to",
    [
        ("93.184.216.34", "93.184.216.34"),
        ("2606:2800:220:1::", "2606:2800:220:1::"),
        ("::ffff:93.184.216.34", "93.184.216.34"),
    ],
)
def test_public_addresses_are_fetched_pinned(address: str, connected_to: str) -> None:
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, content=BODY)

    resolver = stub_resolver({"cdn.test": [address]})
    assert fetch("https://cdn.test/a/b.png?sig=secret", resolver=resolver, transport=mock(answer)) == BODY
    [request] = requests
    assert request.url.host == connected_to
    assert request.url.scheme == "https"
    assert request.url.raw_path == b"/a/b.png?sig=secret"
    assert request.headers["host"] == "cdn.test"
    assert request.extensions["sni_hostname"] == "cdn.test"


def test_dns_rebinding_cannot_swap_the_address_after_the_check() -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    requests: list[httpx.Request] = []
    transport = mock(lambda r: requests.append(r) or httpx.Response(200, content=b"ok"))
    assert fetch("http://rebind.test/", resolver=rebinding, transport=transport) == b"ok"
    assert calls == ["rebind.test"]  # resolved once per hop, and that answer is the one used
    assert requests[0].url.host == "93.184.216.34"
    assert requests[0].headers["host"] == "rebind.test"


# --- schemes and malformed URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "gopher://127.0.0.1:70/_",
        "javascript:alert(1)",
        "example.com/x.png",
        "http:///x.png",
        "http://[::1/x.png",
    ],
)
def test_other_schemes_and_malformed_urls_are_refused(url: str) -> None:
    transport = mock(lambda r: pytest.fail("must not send a request"))
    refused(url, PRIVATE_OK, transport=transport)


@pytest.mark.parametrize(
    ("url", "resolver"),
    [
        ("ftp://example.com/hook", None),  # refused when parsed
        ("http://hooks.test/h", stub_resolver({"hooks.test": ["10.0.0.7"]})),  # refused when resolved
        ("http://nowhere.test/h", stub_resolver({})),  # cannot be resolved
    ],
)
def test_check_target_reports_where_the_url_came_from(url: str, resolver: Resolver | None) -> None:
    """A refusal's loc is in the body unless the caller names another place (fal_webhook: the query)."""
    for where, loc in ((None, ("body", "fal_webhook")), (("query", "fal_webhook"), ("query", "fal_webhook"))):
        with pytest.raises(FetchRefused) as info:
            asyncio.run(check_target(url, allow_private=False, field="fal_webhook", loc=where, resolver=resolver))
        assert info.value.loc == loc
        assert info.value.detail()[0]["loc"] == list(loc)
    # Body fields fetched as inputs still say body.
    assert refused(url, resolver=resolver).loc == ("body", "image_url")


def test_refusals_name_the_schemes_the_field_takes() -> None:
    """An input image may be a data URL; a webhook (a URL we call) may not, so it is not offered."""
    assert "only http(s) and data URLs are accepted" in refused("ftp://example.com/x.png").message
    with pytest.raises(FetchRefused) as info:
        asyncio.run(check_target("ftp://example.com/hook", allow_private=False, field="fal_webhook"))
    assert info.value.message == "fal_webhook is a ftp: URL; only http(s) URLs are accepted"


def test_data_urls_are_decoded_without_network() -> None:
    transport = mock(lambda r: pytest.fail("must not send a request"))
    assert fetch("data:image/png;base64,aGk=", transport=transport) == b"hi"
    with pytest.raises(PayloadTooLarge):
        fetch("data:image/png;base64,aGVsbG8=", FetchPolicy(max_bytes=4))


# --- redirects ---------------------------------------------------------------------------------


def test_redirects_are_followed_and_pinned(server: LoopbackServer) -> None:
    resolver = stub_resolver({"example.test": ["127.0.0.1"]})
    url = f"http://example.test:{server.port}/redirect?to=/img"
    assert fetch(url, PRIVATE_OK, resolver=resolver) == BODY
    host = f"example.test:{server.port}"
    assert server.requests == [("/redirect?to=/img", host), ("/img", host)]


def test_redirect_to_a_private_address_is_refused() -> None:
    requests: list[httpx.Request] = []

    def public_hop(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(302, headers={"Location": "http://internal.test/admin"})

    resolver = stub_resolver({"public.test": ["93.184.216.34"], "internal.test": ["127.0.0.1"]})
    exc = refused("http://public.test/img.png", resolver=resolver, transport=mock(public_hop))
    assert "internal.test → 127.0.0.1" in exc.message
    assert len(requests) == 1


def test_redirect_from_a_public_name_to_real_loopback_never_connects(server: LoopbackServer) -> None:
    def public_hop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": f"http://127.0.0.1:{server.port}/img"})

    resolver = stub_resolver({"public.test": ["93.184.216.34"]})
    refused("http://public.test/", resolver=resolver, transport=mock(public_hop))
    assert server.connections == 0


@pytest.mark.parametrize(
    "location, said",
    [
        ("file:///etc/passwd", "redirected to a file: URL"),
        ("data:image/png;base64,aGk=", "redirected to an invalid or unsupported URL"),
        ("http://[::1", "could not be fetched from public.test"),  # httpx: RemoteProtocolError
    ],
)
def test_redirect_to_another_scheme_or_nonsense_is_refused(location: str, said: str) -> None:
    transport = mock(lambda r: httpx.Response(307, headers={"Location": location}))
    resolver = stub_resolver({"public.test": ["93.184.216.34"]})
    assert said in refused("http://public.test/", resolver=resolver, transport=transport).message


def test_too_many_redirects(server: LoopbackServer) -> None:
    resolver = stub_resolver({"example.test": ["127.0.0.1"]})
    loop = "/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/img"  # three redirects
    policy = FetchPolicy(allow_private=True, max_redirects=2)
    exc = refused(f"http://example.test:{server.port}{loop}", policy, resolver=resolver)
    assert "redirected more than 2 times" in exc.message
    assert len(server.requests) == 3
    assert fetch(f"http://example.test:{server.port}{loop}", PRIVATE_OK, resolver=resolver) == BODY


# --- answers, sizes, time ----------------------------------------------------------------------


def test_http_errors_are_refused_without_echoing_the_query(server: LoopbackServer) -> None:
    exc = refused(f"http://127.0.0.1:{server.port}/missing.png?token=secret", PRIVATE_OK)
    assert "answered HTTP 404" in exc.message
    assert "secret" not in exc.message


def test_declared_oversize_body_is_refused(server: LoopbackServer) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        fetch(f"http://127.0.0.1:{server.port}/img", FetchPolicy(allow_private=True, max_bytes=1000))
    assert info.value.http_status == 413


def test_streamed_oversize_body_is_refused(server: LoopbackServer) -> None:
    policy = FetchPolicy(allow_private=True, max_bytes=len(BODY) * 3)
    with pytest.raises(PayloadTooLarge):
        fetch(f"http://127.0.0.1:{server.port}/big-streamed", policy)
    policy = FetchPolicy(allow_private=True, max_bytes=len(BODY) * 10)
    assert fetch(f"http://127.0.0.1:{server.port}/big-streamed", policy) == BODY * 10


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_slow_servers_time_out(server: LoopbackServer, path: str) -> None:
    policy = FetchPolicy(allow_private=True, timeout_s=0.5)
    start = time.monotonic()
    exc = refused(f"http://127.0.0.1:{server.port}{path}", policy)
    assert time.monotonic() - start < 2.0
    assert "timed out after 0.5 s" in exc.message
    assert exc.__cause__ is not None


def test_slow_dns_times_out() -> None:
    async def hanging(host: str, port: int) -> list[str]:
        await asyncio.sleep(10)
        return []

    start = time.monotonic()
    exc = refused("http://slow-dns.test/", FetchPolicy(timeout_s=0.5), resolver=hanging)
    assert time.monotonic() - start < 2.0
    assert "timed out" in exc.message


def test_connection_refused() -> None:
    port = free_port()
    exc = refused(f"http://127.0.0.1:{port}/img", PRIVATE_OK)
    assert "cannot connect to 127.0.0.1" in exc.message
    assert isinstance(exc.__cause__, httpx.ConnectError)


def test_unresolvable_host() -> None:
    exc = refused("http://nowhere.test/x.png", resolver=stub_resolver({}))
    assert "nowhere.test could not be resolved" in exc.message
    assert isinstance(exc.__cause__, socket.gaierror)
    exc = refused("http://empty.test/", resolver=stub_resolver({"empty.test": []}))
    assert "empty.test could not be resolved" in exc.message


def test_logs_carry_host_and_size_only(server: LoopbackServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="livegen.server.urlfetch"):
        fetch(f"http://127.0.0.1:{server.port}/img?token=secret", PRIVATE_OK)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("livegen"))
    assert "2048 bytes" in text and "127.0.0.1" in text
    assert "secret" not in text
