"""SSRF: every way of pointing ``image_url``, ``mask_url`` or ``fal_webhook`` inside is refused
before a connection is made, proved by loopback "canary" servers that count accepted TCP
connections (IPv4 and, where the host has it, IPv6).

tests/server/test_urlfetch.py covers the fetcher's mechanics (pinning, redirects, sizes, time);
this file attacks it with many spellings at once and keeps one tally, then does the same end to
end through live servers: the default one (everything refused, the canaries count 0) and one
started with ``--allow-private-urls`` (the same canary URLs are fetched and the webhook is
delivered, so the canaries demonstrably work). Figures are printed with ``-s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import msgpack
import pytest
from PIL import Image
from websockets.sync.client import connect

from livegen.protocol.errors import FetchRefused
from livegen.server.urlfetch import FetchPolicy, Resolver, check_target, fetch_bytes
from tests.conftest import LiveServer, data_url, png_bytes, start_server, stop_server

TURBO = "fal-ai/fast-turbo-diffusion"
I2I = {"model_name": "stabilityai/sd-turbo", "num_inference_steps": 2, "strength": 0.5}
PUBLIC = "93.184.216.34"  # a global unicast address; the NAT transport below maps it to loopback


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 160, 90)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


class _Canary(BaseHTTPRequestHandler):
    server: Canary
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append(self.path)
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self._head(302, {"Location": parse_qs(parts.query)["to"][0], "Content-Length": "0"})
        elif parts.path == "/big":  # declared small enough to start, then far more than allowed
            self._head(200, {"Content-Type": "image/png"})
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            self.close_connection = True
        elif parts.path == "/trickle":  # a byte at a time: no single read ever times out
            self._head(200, {"Content-Type": "image/png", "Content-Length": "100000"})
            with contextlib.suppress(OSError):
                for _ in range(600):
                    if self.server.release.wait(0.05):
                        break
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            self.close_connection = True
        else:
            self._head(200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))})
            self.wfile.write(PNG)

    def do_POST(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._head(200, {"Content-Length": "0"})

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Canary(ThreadingHTTPServer):
    """Counts every TCP connection it accepts, before any byte is read."""

    daemon_threads = True

    def __init__(self, host: str, family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__((host, 0), _Canary)
        self.connections = 0
        self.requests: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections we cut on purpose


class Canaries:
    def __init__(self) -> None:
        self.v4 = Canary("127.0.0.1", socket.AF_INET)
        self.v6: Canary | None = None
        with contextlib.suppress(OSError):
            self.v6 = Canary("::1", socket.AF_INET6)
        self.all = [c for c in (self.v4, self.v6) if c is not None]

    @property
    def port(self) -> int:
        return self.v4.port

    @property
    def connections(self) -> int:
        return sum(c.connections for c in self.all)

    def url(self, host: str, path: str = "/img.png") -> str:
        ipv6_loopback = host in ("[::1]", "[0:0:0:0:0:0:0:1]")
        port = self.v6.port if self.v6 is not None and ipv6_loopback else self.port
        return f"http://{host}:{port}{path}"


@pytest.fixture(scope="module")
def canaries() -> Iterator[Canaries]:
    c = Canaries()
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True) for s in c.all]
    for t in threads:
        t.start()
    yield c
    for s in c.all:
        s.release.set()
        s.shutdown()
        s.server_close()


# --- the cases -------------------------------------------------------------------------------------

# Hosts that are loopback however they are written: a canary listens behind each of them.
LOOPBACK_HOSTS = [
    "127.0.0.1", "127.1", "127.0.1", "127.000.000.001", "127.0.0.1.", "2130706433", "017700000001",
    "0x7f000001", "0x7f.1", "0x7f.0x0.0x0.0x1", "0177.0.0.1", "0177.1", "localhost", "localhost.",
    "LocalHost", "0.0.0.0", "0", "%31%32%37.0.0.1", "\uff11\uff12\uff17.\uff10.\uff10.\uff11",
    "[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::127.0.0.1]", "[::]", "[::ffff:0.0.0.0]",
]  # fmt: skip

# Private, link-local, shared, reserved and special-purpose ranges (nothing listens there).
PRIVATE_HOSTS = [
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.0.1", "192.168.255.255",
    "100.64.0.1", "100.127.255.254", "169.254.169.254", "169.254.0.1", "0.0.0.1", "192.0.0.1",
    "192.0.2.1", "198.18.0.1", "198.51.100.1", "203.0.113.1", "224.0.0.1", "240.0.0.1",
    "255.255.255.255", "[fd00::1]", "[fc00::1]", "[fd12:3456:789a::1]", "[fe80::1]", "[fe80::1%25eth0]",
    "[ff02::1]", "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "[2001:db8::1]", "[100::1]",
]  # fmt: skip

# Names whose DNS answer points inside (a stub resolver gives the answers).
DNS_ANSWERS = {
    "loopback.test": ["127.0.0.1"],
    "loopback6.test": ["::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "private.test": ["10.1.2.3"],
    "cgnat.test": ["100.100.100.200"],
    "ula.test": ["fd00:ec2::254"],
    "zero.test": ["0.0.0.0"],
    "mixed.test": [PUBLIC, "127.0.0.1"],
    "mixed6.test": ["2606:2800:220:1::", "fe80::1"],
}


# Schemes other than http(s), and URL tricks that put a loopback host behind a public-looking one.
def _other_urls(port: int) -> list[str]:
    return [
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        f"ftp://127.0.0.1:{port}/img.png",
        f"gopher://127.0.0.1:{port}/_GET%20/",
        f"dict://127.0.0.1:{port}/info",
        f"ldap://127.0.0.1:{port}/",
        f"ws://127.0.0.1:{port}/",
        "jar:http://127.0.0.1/x.jar!/",
        "javascript:alert(1)",
        f"//127.0.0.1:{port}/img.png",
        f"127.0.0.1:{port}/img.png",
        f"HTTP://127.0.0.1:{port}/img.png",
        f"http://public.test@127.0.0.1:{port}/img.png",
        f"http://127.0.0.1:{port}#@public.test/img.png",
        f"http://127.0.0.1:{port}?@public.test/img.png",
        f"http://public.test:{port}@127.0.0.1:{port}/img.png",
    ]


# Parser-differential URLs: WHATWG parsers read the host as 127.0.0.1, httpx as public.test.
# Either reading is safe as long as the address checked is the address connected to.
def _ambiguous_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}\\@public.test/img.png",
        f"http://127.0.0.1:{port}\\\\@public.test/img.png",
        f"http://public.test\\@127.0.0.1:{port}/img.png",
    ]


def _stub(table: dict[str, list[str]]) -> Resolver:
    """The table's answers; other names (localhost, 2130706433) go to the system resolver."""

    async def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return table[host]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]

    return resolve


class NatTransport(httpx.AsyncBaseTransport):
    """Connections to PUBLIC go to the IPv4 canary instead: a "public" server we control."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(str(request.url))
        if request.url.host == PUBLIC:
            request.url = request.url.copy_with(host="127.0.0.1")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _refused(url: str, *, field: str = "image_url", resolver: Resolver | None = None) -> FetchRefused:
    transport = NatTransport()
    with pytest.raises(FetchRefused) as info:
        asyncio.run(fetch_bytes(url, FetchPolicy(timeout_s=5), field=field, resolver=resolver, transport=transport))
    assert transport.sent == [], f"{url}: a request was sent to {transport.sent}"
    assert info.value.http_status == 422 and info.value.loc == ("body", field)
    return info.value


def _webhook_refused(url: str, resolver: Resolver | None = None) -> FetchRefused:
    with pytest.raises(FetchRefused) as info:
        asyncio.run(check_target(url, allow_private=False, field="fal_webhook", resolver=resolver))
    return info.value


FIGURES: dict[str, Any] = {}


def _record(name: str, value: Any) -> None:
    FIGURES[name] = value
    print(f"ssrf figures: {name} = {value}")


# --- unit level: urlfetch and the webhook target check ----------------------------------------------


def test_every_loopback_spelling_is_refused_without_a_connection(canaries: Canaries) -> None:
    before = canaries.connections
    messages = {}
    for host in LOOPBACK_HOSTS:
        for field in ("image_url", "mask_url"):
            messages[host] = _refused(canaries.url(host), field=field).message
        _webhook_refused(canaries.url(host, "/hook"))
    assert canaries.connections == before
    # Refused for what the host is, not for an incidental parse error (the spellings the OS or
    # httpx cannot even parse are refused too, which is what matters, but say so).
    unparsed = {h for h, m in messages.items() if "private or loopback" not in m}
    httpx_rejects = {"0177.0.0.1", "127.000.000.001", "\uff11\uff12\uff17.\uff10.\uff10.\uff11"}  # "invalid URL"
    resolver_rejects = {"127.0.0.1.", "localhost.", "%31%32%37.0.0.1"}  # "could not be resolved", on some hosts
    assert unparsed <= httpx_rejects | resolver_rejects, messages
    _record("loopback spellings refused (image_url, mask_url, fal_webhook)", len(LOOPBACK_HOSTS))


def test_private_and_special_ranges_are_refused_without_a_request(canaries: Canaries) -> None:
    before = canaries.connections
    for host in PRIVATE_HOSTS:
        exc = _refused(f"http://{host}/img.png")
        assert "private or loopback" in exc.message or "invalid" in exc.message, (host, exc.message)
        _webhook_refused(f"http://{host}/hook")
    assert canaries.connections == before
    _record("private/special ranges refused", len(PRIVATE_HOSTS))


def test_dns_answers_pointing_inside_are_refused(canaries: Canaries) -> None:
    before = canaries.connections
    resolver = _stub(DNS_ANSWERS)
    for name in DNS_ANSWERS:
        exc = _refused(f"http://{name}:{canaries.port}/img.png", resolver=resolver)
        assert f"{name} → " in exc.message, exc.message
        assert "private or loopback" in _webhook_refused(f"https://{name}/hook", resolver).message
    assert canaries.connections == before
    _record("DNS answers pointing inside refused", len(DNS_ANSWERS))


def test_other_schemes_and_url_tricks_are_refused(canaries: Canaries) -> None:
    before = canaries.connections
    urls = _other_urls(canaries.port)
    resolver = _stub({"public.test": [PUBLIC]})
    for url in urls:
        _refused(url, resolver=resolver)
        _webhook_refused(url, resolver)
    for url in ("data:application/json,{}", "data:text/plain;base64,aGk=", "about:blank", "", " ", "http://"):
        _webhook_refused(url)
    sent: list[httpx.Request] = []

    def public_server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=PNG)

    public = httpx.MockTransport(public_server)
    for url in _ambiguous_urls(canaries.port):
        with contextlib.suppress(FetchRefused):
            asyncio.run(fetch_bytes(url, FetchPolicy(timeout_s=5), resolver=resolver, transport=public))
    assert {r.url.host for r in sent} <= {PUBLIC}, [str(r.url) for r in sent]
    assert canaries.connections == before
    _record("other schemes / URL tricks refused", len(urls) + 6)
    _record("parser-differential URLs: sent only to the public address", len(_ambiguous_urls(canaries.port)))


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://localhost:{port}/img.png",
        "http://2130706433:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",
        "http://loopback.test:{port}/img.png",
        "http://metadata.test/latest/meta-data/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:{port}/_x",
    ],
)
def test_a_public_server_redirecting_inside_is_refused_at_the_redirect(canaries: Canaries, location: str) -> None:
    """The first hop really happens (a "public" name whose server is the canary, behind a NAT
    transport); the redirect target is checked before its connection and refused."""
    resolver = _stub({"public.test": [PUBLIC], **DNS_ANSWERS})
    before = canaries.v4.connections, len(canaries.v4.requests)
    target = quote(location.format(port=canaries.port), safe="")
    transport = NatTransport()
    with pytest.raises(FetchRefused) as info:
        asyncio.run(
            fetch_bytes(
                f"http://public.test:{canaries.port}/redirect?to={target}",
                FetchPolicy(timeout_s=5),
                resolver=resolver,
                transport=transport,
            )
        )
    assert "redirected" in info.value.message or "private or loopback" in info.value.message
    assert len(transport.sent) == 1  # the public hop, nothing after it
    assert canaries.v4.connections - before[0] == 1
    assert [p.split("?")[0] for p in canaries.v4.requests[before[1] :]] == ["/redirect"]


def test_the_canaries_do_count_when_private_urls_are_allowed(canaries: Canaries) -> None:
    """The control: the same URLs with allow_private=True reach the canaries."""
    before = canaries.connections
    policy = FetchPolicy(allow_private=True, timeout_s=5)
    hosts = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "localhost", "[::ffff:127.0.0.1]"]
    if canaries.v6 is not None:
        hosts.append("[::1]")
    for host in hosts:
        assert asyncio.run(fetch_bytes(canaries.url(host), policy)) == PNG, host
    resolver = _stub({"public.test": [PUBLIC]})
    redirect = f"http://public.test:{canaries.port}/redirect?to=" + quote(canaries.url("127.0.0.1"), safe="")
    assert asyncio.run(fetch_bytes(redirect, policy, resolver=resolver, transport=NatTransport())) == PNG
    counted = canaries.connections - before
    assert counted >= len(hosts) + 2
    _record("canary connections with allow_private (unit)", counted)


# --- end to end: the default server ----------------------------------------------------------------


def _e2e_urls(canaries: Canaries) -> list[str]:
    return [
        canaries.url("127.0.0.1"),
        canaries.url("localhost"),
        canaries.url("2130706433"),
        canaries.url("0x7f.1"),
        canaries.url("127.1"),
        canaries.url("[::1]"),
        canaries.url("[::ffff:127.0.0.1]"),
        canaries.url("0.0.0.0"),
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://[fd00::1]/x.png",
        "file:///etc/passwd",
        f"ftp://127.0.0.1:{canaries.port}/x.png",
        f"gopher://127.0.0.1:{canaries.port}/_x",
    ]


def _detail(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text[:300]
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    first: dict[str, Any] = detail[0]
    return first


def test_live_server_refuses_inside_urls_in_every_field(live_server: LiveServer, canaries: Canaries) -> None:
    before = canaries.connections
    urls = _e2e_urls(canaries)
    image = data_url(png_bytes(64, 64))
    refused = 0
    with live_server.client() as http:
        for url in urls:
            d = _detail(http.post(f"/{TURBO}/image-to-image", json={"prompt": "x", "image_url": url, **I2I}))
            assert d["loc"] == ["body", "image_url"] and d["type"] == "file_download_error", d
            assert "private or loopback" in d["msg"] or "only http(s) and data URLs" in d["msg"], d
            body = {"prompt": "x", "image_url": image, "mask_url": url, **I2I}
            d = _detail(http.post(f"/{TURBO}/inpainting", json=body))
            assert d["loc"] == ["body", "mask_url"], d
            # fal_webhook: refused at submit, so no job and no delivery attempt exist.
            r = http.post(f"/queue/{TURBO}", json={"prompt": "x", **I2I}, params={"fal_webhook": url})
            d = _detail(r)
            assert d["loc"][-1] == "fal_webhook" and "request_id" not in r.text, d
            refused += 3
    assert canaries.connections == before
    _record("end-to-end refusals on the default server (sync image_url, mask_url, webhook)", refused)


def test_live_server_queue_job_with_an_inside_url_fails_without_fetching(
    live_server: LiveServer, canaries: Canaries
) -> None:
    """image_url is checked when the job runs (the submit only validates the body's shape):
    the job completes with fal's file_download_error and nothing is fetched."""
    before = canaries.connections
    with live_server.client() as http:
        body = {"prompt": "x", "image_url": canaries.url("localhost"), **I2I}
        submitted = http.post(f"/queue/{TURBO}/image-to-image", json=body).json()
        deadline = time.monotonic() + 60
        while http.get(submitted["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        result = http.get(submitted["response_url"])
    assert result.status_code == 422
    assert "private or loopback" in json.dumps(result.json())
    assert canaries.connections == before


def test_live_server_realtime_frame_with_an_inside_url_gets_an_error_frame(
    live_server: LiveServer, canaries: Canaries
) -> None:
    before = canaries.connections
    token = httpx.post(
        live_server.base_url + "/rest/tokens/",
        json={"allowed_apps": ["fast-turbo-diffusion"]},
        headers={"Authorization": f"Key {live_server.key}"},
    ).json()
    url = f"{live_server.base_url.replace('http', 'ws', 1)}/{TURBO}/realtime?fal_jwt_token={token}"
    with connect(url) as ws:
        for host in ("127.0.0.1", "localhost", "[::1]"):
            ws.send(msgpack.packb({"prompt": "x", "image_url": canaries.url(host), **I2I}))
            while True:
                control = json.loads(ws.recv(timeout=60))
                if control["type"] == "x-fal-error":
                    break
            assert control["error"] == "INVALID_INPUT" and "private or loopback" in control["reason"], control
    assert canaries.connections == before


# --- end to end: a server with --allow-private-urls -------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    env = {
        "LIVEGEN_FETCH_TIMEOUT_S": "1.5",
        "LIVEGEN_MAX_INPUT_IMAGE_BYTES": "1000000",
        "LIVEGEN_WEBHOOK_BACKOFF_BASE_S": "0.2",
    }
    server = start_server(
        tmp_path_factory.mktemp("ssrf-open"),
        "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo", "--allow-private-urls",
        env=env, synth_from=shared_data_dir,
    )  # fmt: skip
    yield server
    stop_server(server)


def test_with_allow_private_urls_the_same_urls_are_fetched(open_server: LiveServer, canaries: Canaries) -> None:
    before = canaries.connections
    with open_server.client() as http:
        for host in ("127.0.0.1", "localhost", "2130706433"):
            r = http.post(f"/{TURBO}/image-to-image", json={"prompt": "x", "image_url": canaries.url(host), **I2I})
            assert r.status_code == 200, r.text[:300]
        hook = canaries.url("127.0.0.1", "/hook")
        submitted = http.post(f"/queue/{TURBO}", json={"prompt": "x", **I2I}, params={"fal_webhook": hook})
        assert submitted.status_code == 200, submitted.text
        deadline = time.monotonic() + 60
        while "/hook" not in canaries.v4.requests:
            assert time.monotonic() < deadline, "the webhook was not delivered"
            time.sleep(0.1)
    counted = canaries.connections - before
    assert counted >= 4
    _record("canary connections with --allow-private-urls (end to end)", counted)


def test_oversized_and_slow_drip_bodies_are_cut_off(open_server: LiveServer, canaries: Canaries) -> None:
    with open_server.client() as http:
        started = time.monotonic()
        r = http.post(
            f"/{TURBO}/image-to-image", json={"prompt": "x", "image_url": canaries.url("127.0.0.1", "/big"), **I2I}
        )
        assert r.status_code == 413, r.text[:300]
        assert "1000000-byte limit" in r.json()["detail"]
        started = time.monotonic()
        body = {"prompt": "x", "image_url": canaries.url("127.0.0.1", "/trickle"), **I2I}
        d = _detail(http.post(f"/{TURBO}/image-to-image", json=body))
        took = time.monotonic() - started
    assert "timed out after 1.5 s" in d["msg"], d
    assert took < 6, took  # the whole download is capped, not each read
    _record("slow-drip cut off after (s)", round(took, 2))
