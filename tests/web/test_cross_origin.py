"""fal's JS client in a browser app on another origin: a page served from a second loopback
server (another port: another origin) imports ``@fal-ai/client`` 1.10.1 with livegen's helper,
bundled by esbuild as a web app's build would, and uses it against ``livegen serve
--allowed-origins <that page's origin>`` in Debian's Chromium. Every call below crosses origins,
so each needs livegen's CORS answers (preflights, exposed headers) or the browser refuses it.

The same page from an origin not in the list gets nothing: its requests fail in the browser.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from livegen.bench import free_port
from tests.conftest import LiveServer, png_bytes, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "tests" / "js"
TURBO = "fal-ai/fast-turbo-diffusion"
INPUT = {"prompt": "a red fox", "model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}}
ENTRY = f"""export * from {str(ROOT / "clients" / "js" / "livegen.mjs")!r};
export {{ ApiError }} from "@fal-ai/client";
"""
PAGE = """<!doctype html><meta charset="utf-8"><title>an app on another origin</title>
<script type="module">import * as livegen from "./livegen-fal.js"; window.livegen = livegen;</script>
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A static site holding the page and the bundle, on its own port; yields the port."""
    esbuild = JS / "node_modules" / ".bin" / "esbuild"
    if not esbuild.is_file():
        pytest.fail(
            "tests/js/node_modules lacks esbuild: run scripts/test, which installs it (npm ci --prefix tests/js)"
        )
    root = tmp_path_factory.mktemp("site")
    (root / "entry.mjs").write_text(ENTRY)
    (root / "index.html").write_text(PAGE)
    subprocess.run(
        [str(esbuild), str(root / "entry.mjs"), "--bundle", "--format=esm", "--platform=browser"]
        + ["--external:ws", f"--outfile={root / 'livegen-fal.js'}", "--log-level=warning"],
        env={**os.environ, "NODE_PATH": str(JS / "node_modules")},  # where @fal-ai/client is installed
        check=True,
        timeout=120,
    )
    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield port
    httpd.shutdown()
    httpd.server_close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(site: int, tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    s = start_server(
        tmp_path_factory.mktemp("cross-origin"),
        *("--weights", "tiny-random", "--device", "cpu", "--allowed-origins", f"http://127.0.0.1:{site}"),
        synth_from=shared_data_dir,
    )
    yield s
    stop_server(s)


def open_app(browser: Browser, origin: str) -> tuple[Page, list[str]]:
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.set_default_timeout(90_000)
    page.goto(origin + "/index.html")
    page.wait_for_function("window.livegen !== undefined")
    return page, problems


def in_page(page: Page, body: str, **args: Any) -> Any:
    """Run ``body`` (an async function's body, with ``livegen`` and the ``args`` in scope) in the page."""
    names = ", ".join(args)
    script = f"async ({{{names}}}) => {{ const livegen = window.livegen; {body} }}"
    return page.evaluate(script, args)


def test_the_official_client_from_another_origin(browser: Browser, site: int, server: LiveServer) -> None:
    page, problems = open_app(browser, f"http://127.0.0.1:{site}")
    base, key = server.base_url, server.key
    assert not page.url.startswith(base)  # another port: another origin

    # fal.run, in both of the helper's modes: the request id comes from a header the page may read
    # only because livegen exposes it.
    ran = in_page(
        page,
        """const out = {};
        for (const mode of ["middleware", "proxy"]) {
          const fal = livegen.createLivegenClient({ baseUrl: base, mode, credentials: key });
          const { data, requestId } = await fal.run(app, { input });
          out[mode] = { width: data.images[0].width, url: data.images[0].url.slice(0, 23), requestId };
        }
        return out;""",
        base=base,
        key=key,
        app=TURBO,
        input=INPUT,
    )
    for mode in ("middleware", "proxy"):
        assert ran[mode]["width"] == 64 and ran[mode]["url"] == "data:image/jpeg;base64,"
        assert len(ran[mode]["requestId"]) == 36, ran

    # The queue: subscribe follows the status stream (SSE), then fetches the result.
    queued = in_page(
        page,
        """const fal = livegen.createLivegenClient({ baseUrl: base, credentials: key });
        const statuses = [];
        const { data, requestId } = await fal.subscribe(app, {
          input, mode: "streaming", logs: true, onQueueUpdate: (u) => statuses.push(u.status),
        });
        return { width: data.images[0].width, requestId, last: statuses.at(-1) };""",
        base=base,
        key=key,
        app=TURBO,
        input=INPUT,
    )
    assert queued["width"] == 64 and queued["last"] == "COMPLETED" and len(queued["requestId"]) == 36

    # Storage: the client PUTs the bytes to the upload URL livegen returned (its own fetch, with a
    # bearer token); the file URL then serves as an image-to-image input.
    i2i = in_page(
        page,
        """const fal = livegen.createLivegenClient({ baseUrl: base, credentials: key });
        const url = await fal.storage.upload(new Blob([new Uint8Array(png)], { type: "image/png" }));
        const { data } = await fal.run(app + "/image-to-image", {
          input: { ...input, image_url: url, num_inference_steps: 2 },
        });
        return { url, width: data.images[0].width };""",
        base=base,
        key=key,
        app=TURBO,
        input=INPUT,
        png=list(png_bytes(64, 64)),
    )
    assert i2i["url"].startswith(base + "/cdn/files/") and i2i["width"] == 64

    # fal.stream as a browser without the key would use it: a token from the app's backend (here
    # fetched with the key in the page), then the stream with ?fal_jwt_token=.
    streamed = in_page(
        page,
        """const tokenProvider = async (appWithPath) => {
          const r = await fetch(base + "/rest/tokens/", {
            method: "POST",
            headers: { authorization: "Key " + key, "content-type": "application/json" },
            body: JSON.stringify({ allowed_apps: [appWithPath.split("/")[1]] }),
          });
          return await r.json();
        };
        const fal = livegen.createLivegenClient({ baseUrl: base });
        const stream = await fal.stream(app, { input, connectionMode: "client", tokenProvider });
        const done = await stream.done();
        return { width: done.images[0].width, requestId: stream.requestId };""",
        base=base,
        key=key,
        app=TURBO,
        input=INPUT,
    )
    assert streamed["width"] == 64 and len(streamed["requestId"]) == 36

    # Realtime: a token over HTTP, then the WebSocket, whose Origin livegen checks against the same list.
    frame = in_page(
        page,
        """await livegen.installWebSocketShim(base);
        const fal = livegen.createLivegenClient({ baseUrl: base, credentials: key });
        return await new Promise((resolve, reject) => {
          const connection = fal.realtime.connect(app, {
            onResult: (result) => { connection.close(); resolve({ width: result.images[0].width }); },
            onError: (error) => reject(new Error(String(error.message ?? error))),
          });
          connection.send(input);
          setTimeout(() => reject(new Error("no realtime result in 60 s")), 60_000);
        });""",
        base=base,
        key=key,
        app=TURBO,
        input=INPUT,
    )
    assert frame == {"width": 64}
    assert problems == []


def test_an_origin_not_in_the_list_gets_nothing(browser: Browser, site: int, server: LiveServer) -> None:
    # localhost and 127.0.0.1 are different origins: only the second one is allowed.
    page, _ = open_app(browser, f"http://localhost:{site}")
    outcome = in_page(
        page,
        """const fal = livegen.createLivegenClient({ baseUrl: base, credentials: key });
        try {
          await fal.run(app, { input });
          return "answered";
        } catch (error) {
          return { name: error.name, status: error.status ?? null, message: String(error.message) };
        }""",
        base=server.base_url,
        key=server.key,
        app=TURBO,
        input=INPUT,
    )
    assert outcome != "answered"
    assert outcome["status"] in (None, 500), outcome  # a network failure, not a livegen answer
    assert "fetch" in outcome["message"].lower(), outcome
