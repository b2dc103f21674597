"""The playground in a real browser: Debian's Chromium driven by Playwright against
``livegen serve --weights tiny-random``, with Chromium's fake camera as the webcam.

The page's Content-Security-Policy forbids eval, and the tests leave it on (so they would notice
a policy that breaks the page): they poll with ``page.evaluate``, which the policy does not
govern, instead of ``wait_for_function``, which it does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request

from tests.conftest import LiveServer, make_certificate, start_server, stop_server, wait_ready_tls
from tests.web.prefix_proxy import prefix_proxy

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
WAIT_S = 90.0  # tiny models on a small shared CPU: generous


@dataclass
class Recorder:
    """What the page did on the network and in its console."""

    requests: list[Request] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning") and "/rest/tokens/" not in (message.location.get("url") or ""):
            self.problems.append(f"console {message.type}: {message.text}")

    def tokens(self) -> list[str]:
        return [t for url in self.sockets for t in parse_qs(urlsplit(url).query).get("fal_jwt_token", [])]


def open_page(browser: Browser, server: LiveServer | str) -> tuple[Page, Recorder]:
    """The playground of ``server``, or at the URL ``server`` (behind a proxy)."""
    url = server if isinstance(server, str) else server.base_url + "/"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    parts = urlsplit(url)
    context.grant_permissions(["camera"], origin=f"{parts.scheme}://{parts.netloc}")
    page = context.new_page()
    rec = Recorder()
    page.on("request", lambda request: rec.requests.append(request))
    page.on("websocket", lambda ws: rec.sockets.append(ws.url))
    page.on("console", rec.console)
    page.on("pageerror", lambda error: rec.problems.append(f"page error: {error}"))
    page.set_default_timeout(WAIT_S * 1000)
    page.goto(url)
    return page, rec


def until(page: Page, expression: str, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            state = page.evaluate(
                "({status: document.querySelector('#status').textContent,"
                " error: document.querySelector('#error').textContent,"
                " frames: document.querySelector('#frames').textContent})"
            )
            pytest.fail(f"timed out after {timeout} s waiting for {what}; page: {state}")
        time.sleep(0.1)


def frames(page: Page) -> int:
    return int(page.text_content("#frames") or 0)


def enter_key(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.click("#key-form button[type=submit]")


def result_for(page: Page, prompt: str) -> str:
    until(page, f"document.querySelector('#result').dataset.prompt === {prompt!r}", f"a result for {prompt!r}")
    src = page.get_attribute("#result", "src")
    assert src and src.startswith("data:image/jpeg;base64,"), (src or "")[:40]
    return src


def assert_no_secrets_leaked(rec: Recorder, server: LiveServer, key: str) -> None:
    """The key goes only in the Authorization header of POST /rest/tokens/; tokens only in the
    WebSocket URL; neither in any HTTP URL, nor in the server's log."""
    secrets = [key, *rec.tokens()]
    for request in rec.requests:
        assert not any(s in request.url for s in secrets), f"a secret in {request.url[:80]}"
        assert "fal_jwt_token" not in request.url
        auth = request.headers.get("authorization")
        if auth is not None:
            assert (request.method, urlsplit(request.url).path, auth) == ("POST", "/rest/tokens/", f"Key {key}")
    for url in rec.sockets:
        assert key not in url
    log = server.log()
    for secret in secrets:
        assert secret not in log


def test_text_webcam_and_sketch(browser: Browser, live_server: LiveServer) -> None:
    page, rec = open_page(browser, live_server)
    assert page.is_visible("#key-form") and page.is_hidden("#main")
    enter_key(page, live_server.key)
    page.select_option("#size", "256")  # the tiny models are fast, the CPU is not

    # Text to image as you type; a new prompt gives a new image.
    page.fill("#prompt", "a lighthouse at dusk")
    first = result_for(page, "a lighthouse at dusk")
    page.fill("#prompt", "a lighthouse at dawn, oil painting")
    second = result_for(page, "a lighthouse at dawn, oil painting")
    assert second != first
    assert page.evaluate("Number(document.querySelector('#latency').textContent) > 0")
    assert page.evaluate("Number(document.querySelector('#server-ms').textContent) > 0")

    # Webcam: Chromium's fake camera, streamed continuously.
    page.click("button[data-mode=webcam]")
    until(page, "document.querySelector('#result').dataset.source === 'webcam'", "a webcam result")
    start = frames(page)
    until(page, f"Number(document.querySelector('#frames').textContent) >= {start + 10}", "10 webcam frames")
    assert float(page.text_content("#fps") or 0) > 0
    src = page.get_attribute("#result", "src")
    assert src and src.startswith("blob:")  # webcam results come back as bytes (image_bytes in)
    assert page.locator("#gallery img").count() >= 10

    # Sketch: the blank canvas is sent first; a stroke drawn with the mouse gives a new result.
    page.click("button[data-mode=sketch]")
    until(page, "document.querySelector('#result').dataset.source === 'sketch'", "a result for the blank sketch")
    box = page.locator("#sketch").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 60, box["y"] + 250)
    page.mouse.down()
    for i in range(1, 13):
        page.mouse.move(box["x"] + 60 + 20 * i, box["y"] + 250 - 12 * i + (i % 3) * 8)
    page.mouse.up()
    until(page, "Number(document.querySelector('#result').dataset.strokes) > 0", "a result for the drawn sketch")

    assert page.is_hidden("#error"), page.text_content("#error")
    assert page.get_attribute("#download", "href")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    assert rec.tokens(), "the WebSocket carried a token"
    assert_no_secrets_leaked(rec, live_server, live_server.key)
    assert page.evaluate("sessionStorage.getItem('livegen.apiKey')") == live_server.key
    assert rec.problems == []
    page.context.close()


def test_behind_a_reverse_proxy_under_a_path_prefix(browser: Browser, live_server: LiveServer) -> None:
    """Served at https://example.com/livegen/ by a proxy that strips the prefix: every request
    the page makes (static files, readiness, tokens, the WebSocket) keeps the prefix."""
    with prefix_proxy(live_server.base_url, "/livegen") as base:
        page, rec = open_page(browser, base + "/")
        enter_key(page, live_server.key)
        page.select_option("#size", "256")
        page.fill("#prompt", "a lighthouse behind a proxy")
        result_for(page, "a lighthouse behind a proxy")
        assert page.is_hidden("#error"), page.text_content("#error")
        http = [r.url for r in rec.requests if r.url.startswith("http")]
        assert any(u.endswith("/livegen/static/app.js") for u in http) and any("/rest/tokens/" in u for u in http)
        assert all(urlsplit(u).path.startswith("/livegen/") for u in http), http
        assert rec.sockets and all(urlsplit(u).path.startswith("/livegen/fal-ai/") for u in rec.sockets), rec.sockets
        assert rec.problems == []
        page.context.close()


def test_over_https_with_the_servers_own_certificate(browser: Browser, tmp_path: Path, shared_data_dir: Path) -> None:
    """``--ssl-certfile/--ssl-keyfile``: the page over https, its WebSocket over wss, and the
    webcam allowed (a secure context), as on a GPU box reached from another machine."""
    cert, key = make_certificate(tmp_path)
    args = ("--weights", "tiny-random", "--device", "cpu", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    server = start_server(tmp_path / "data", *args, synth_from=shared_data_dir, wait_ready=False)
    try:
        base = server.base_url.replace("http://", "https://")
        wait_ready_tls(server, base, cert)
        context = browser.new_context(ignore_https_errors=True)  # the test's own certificate
        context.grant_permissions(["camera"], origin=base)
        page = context.new_page()
        page.set_default_timeout(WAIT_S * 1000)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(base + "/")
        assert page.evaluate("window.isSecureContext")
        enter_key(page, server.key)
        page.select_option("#size", "256")
        page.fill("#prompt", "a lighthouse over tls")
        result_for(page, "a lighthouse over tls")
        assert sockets and all(u.startswith("wss://127.0.0.1:") for u in sockets), sockets
        page.click("button[data-mode=webcam]")
        until(page, "document.querySelector('#result').dataset.source === 'webcam'", "a webcam result over wss")
        context.close()
    finally:
        stop_server(server)


def test_a_wrong_key_is_explained(browser: Browser, live_server: LiveServer) -> None:
    page, rec = open_page(browser, live_server)
    enter_key(page, "not-a-valid-key")
    until(page, "!document.querySelector('#error').hidden", "the error message", timeout=30)
    assert "That API key was not accepted" in (page.text_content("#error") or "")
    assert page.is_visible("#key-form") and page.is_hidden("#main")
    assert page.evaluate("sessionStorage.getItem('livegen.apiKey')") is None
    assert rec.sockets == []
    assert_no_secrets_leaked(rec, live_server, "not-a-valid-key")
    page.context.close()


def test_full_server_and_lost_connection_recover(browser: Browser, tmp_path: Path, shared_data_dir: Path) -> None:
    """Its own one-session server: a second tab hears that the server is full and gets in when the
    first leaves; after a restart the page says the connection was lost and reconnects."""
    env = {"LIVEGEN_MAX_SESSIONS": "1"}
    args = ("--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo")
    server = start_server(tmp_path, *args, env=env, synth_from=shared_data_dir)
    try:
        first, _ = open_page(browser, server)
        enter_key(first, server.key)
        first.select_option("#size", "256")
        result_for(first, first.input_value("#prompt").strip())

        second, _ = open_page(browser, server)
        enter_key(second, server.key)
        until(second, "document.querySelector('#error').textContent.includes('full')", "'server full'", timeout=30)
        first.context.close()
        until(second, "document.querySelector('#result').hasAttribute('src')", "a result once the slot is free")
        assert second.is_hidden("#error")

        stop_server(server)
        until(second, "document.querySelector('#error').textContent.startsWith('Connection lost')", "'lost'", 30)
        server = start_server(tmp_path, *args, env=env, port=int(server.base_url.rsplit(":", 1)[1]))
        before = frames(second)
        second.fill("#prompt", "after the restart")
        until(second, f"Number(document.querySelector('#frames').textContent) > {before}", "a result after restart")
        assert second.is_hidden("#error")
        assert second.text_content("#status") == "live · fast-turbo-diffusion"
        second.context.close()
    finally:
        stop_server(server)


def test_static_files_and_headers(live_server: LiveServer) -> None:
    page = httpx.get(live_server.base_url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    csp = page.headers["content-security-policy"]
    host = urlsplit(live_server.base_url).netloc
    assert "script-src 'self'" in csp and "img-src 'self' data: blob:" in csp
    assert f"connect-src 'self' ws://{host} wss://{host};" in csp
    assert "unsafe" not in csp
    script = httpx.get(live_server.base_url + "/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert httpx.get(live_server.base_url + "/static/style.css").headers["content-type"] == "text/css; charset=utf-8"
    for missing in ("/static/nope.js", "/static/index.html", "/static/..%2F__init__.py", "/static/package.json"):
        assert httpx.get(live_server.base_url + missing).status_code == 404, missing
    assert httpx.get(live_server.base_url + "/docs").status_code == 200  # FastAPI's, untouched
