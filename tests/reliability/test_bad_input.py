"""Hostile and unusual input images, over every way an image reaches the server.

The corpus is built here at test time (no binary fixtures) and sent to one live
``livegen serve --weights tiny-random`` over the sync route, the queue (submit, then result)
and the realtime WebSocket (as an ``image_url`` data URL and as raw ``image_bytes``).

Every case either succeeds (a valid image in an unusual form: 16-bit, CMYK, palette, alpha,
EXIF-rotated, tiny, mislabelled) or is refused with a 4xx in fal's error shape naming the
field, or, on the socket, an ``x-fal-error`` frame after which the same session still
answers. Never a 5xx. Per-case wall times and the server's memory before and after are
printed and kept in ``artifacts/reliability-bad-input.json``; timings are not asserted.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from livegen.engine.imaging import check_data_url_size, parse_data_url
from livegen.protocol.errors import InvalidInput, PayloadTooLarge
from livegen.server.generation import output_size
from tests.conftest import LiveServer, png_bytes
from tests.reliability.conftest import next_answer, open_session, record

TURBO = "fal-ai/fast-turbo-diffusion"
I2I = f"/{TURBO}/image-to-image"
# Small and fast on the tiny random models; no image_size, so the output takes the input's size.
FAST = {"prompt": "a cat", "model_name": "stabilityai/sd-turbo", "num_inference_steps": 1, "strength": 1.0}
MB = 1024 * 1024


# -- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes | None  # raw image bytes (also sent as image_bytes); None: only a data URL exists
    url: str  # what goes into image_url
    # "ok" with the output size, or the HTTP status of the refusal and a word its message holds.
    expect_size: tuple[int, int] | None = None
    status: int = 0
    needle: str = ""
    over_ws_cap: bool = False  # the frame is over uvicorn's WebSocket cap: the socket closes (1009)

    @property
    def ok(self) -> bool:
        return self.expect_size is not None


def save(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def b64_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A real, complete 1-bit PNG of ``width``×``height`` (100 megapixels by default) that is
    a few kilobytes: every row compresses to almost nothing. Written row by row with zlib, so
    building it never holds the pixels."""
    row = b"\x00" + bytes((width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def strip_png(width: int = 1, height: int = 100_000) -> bytes:
    row = b"\x00" + b"\x80" * width  # grey, 8-bit greyscale
    idat = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """A 64 wide × 96 high JPEG whose EXIF orientation (6) says: turn it 90° clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(Image.new("RGB", (64, 96), (10, 200, 30)), "JPEG", exif=exif.tobytes())


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    img = Image.new("I;16", (64, 64))
    img.putdata([(x * 1024) % 65536 for x in range(64 * 64)])
    return save(img, "PNG")


def palette_png() -> bytes:
    img = Image.new("P", (64, 64))
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 7) % 256)])
    img.putdata([i % 256 for i in range(64 * 64)])
    return save(img, "PNG")


def build_corpus() -> list[Case]:
    png = png_bytes(64, 64)
    jpeg = save(Image.new("RGB", (64, 64), (200, 40, 40)), "JPEG")
    noisy_png = save(Image.effect_noise((128, 128), 64).convert("RGB"), "PNG")
    noisy_jpeg = save(Image.effect_noise((128, 128), 64).convert("RGB"), "JPEG")
    garbage = bytes(range(256)) * 8
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
    html = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
    bomb = png_bomb()
    strip = strip_png()

    def refused(name: str, data: bytes, needle: str, mime: str = "image/png") -> Case:
        return Case(name, data, b64_url(data, mime), status=422, needle=needle)

    def ok(name: str, data: bytes, size: tuple[int, int], mime: str = "image/png") -> Case:
        return Case(name, data, b64_url(data, mime), expect_size=size)

    huge = "data:image/png;base64," + "A" * (50 * MB)
    big = "data:image/png;base64," + "A" * (30 * MB)  # under the body cap, over the 20 MB image cap
    return [
        refused("zero bytes", b"", "empty"),
        refused("truncated PNG", noisy_png[: len(noisy_png) // 2], "truncated"),
        refused("truncated PNG header", png[:20], "truncated"),
        refused("truncated JPEG", noisy_jpeg[: len(noisy_jpeg) // 2], "truncated", "image/jpeg"),
        ok("JPEG declared as PNG", jpeg, (64, 64)),
        ok("PNG declared as text/plain", png, (64, 64), "text/plain"),
        refused("garbage declared as PNG", garbage, "not a PNG"),
        refused("100-megapixel PNG bomb", bomb, "pixels"),
        refused("1x100000 strip", strip, "aspect ratio"),
        ok("16-bit PNG", sixteen_bit_png(), (64, 64)),
        ok("CMYK JPEG", save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), (64, 64), "image/jpeg"),
        ok("palette PNG", palette_png(), (64, 64)),
        ok("RGBA PNG", save(Image.new("RGBA", (64, 64), (255, 0, 0, 100)), "PNG"), (64, 64)),
        ok("EXIF-rotated JPEG", exif_rotated_jpeg(), (96, 64), "image/jpeg"),
        ok("1x1 PNG", save(Image.new("RGB", (1, 1), (5, 5, 5)), "PNG"), (64, 64)),
        refused("animated WebP", animation("WEBP"), "animated", "image/webp"),
        refused("animated GIF", animation("GIF"), "GIF", "image/gif"),
        refused("SVG named .png", svg, "SVG"),
        refused("HTML declared image/png", html, "HTML"),
        Case(
            "data URL with non-base64 payload",
            None,
            "data:image/png;base64,@@not*base64!!",
            status=422,
            needle="base64",
        ),  # fmt: skip
        Case(
            "percent-encoded data URL",
            png,
            "data:image/png," + urllib.parse.quote_from_bytes(png),
            expect_size=(64, 64),
        ),  # fmt: skip
        Case("30 MB base64 data URL", None, big, status=413, needle="larger than"),
        Case("50 MB base64 data URL", None, huge, status=413, needle="larger than", over_ws_cap=True),
    ]


@pytest.fixture(scope="module")
def corpus() -> list[Case]:
    return build_corpus()


# -- the output size of an image without image_size (pure) -----------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((64, 96), 2048, (64, 96)),
        ((1, 1), 2048, (64, 64)),  # scaled up to the schema's smallest side
        ((100, 30), 2048, (208, 64)),
        ((10, 320), 2048, (64, 2048)),  # 32:1, the most elongated input that fits
        ((4096, 4096), 2048, (2048, 2048)),
        ((3000, 2000), 2048, (2048, 1360)),
        ((1000, 800), 512, (512, 408)),  # a server capped below the schema
    ],
)
def test_output_size_stays_within_the_schema_bounds(
    size: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    got = output_size(size, None, preserve_aspect_ratio=False, crop_output=False, max_side=max_side)
    assert got == (*expected, None)


@pytest.mark.parametrize("size", [(1, 100_000), (10, 321), (100_000, 1)])
def test_output_size_refuses_extreme_aspect_ratios(size: tuple[int, int]) -> None:
    with pytest.raises(InvalidInput) as info:
        output_size(size, None, preserve_aspect_ratio=False, crop_output=False, field="image_bytes")
    assert info.value.loc == ("body", "image_bytes")
    assert "aspect ratio" in info.value.message and "image_size" in info.value.message


def base64_of(n: int) -> str:
    return base64.b64encode(bytes(n)).decode()


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64," + base64_of(1000),
        "data:image/png;base64," + base64_of(1001),  # one '=' of padding
        "data:image/png;base64," + base64_of(1002),  # two
        "data:image/png;base64," + base64_of(1002).rstrip("="),  # padding left off
        "data:image/png;base64," + "\n".join(base64_of(1001)[i : i + 76] for i in range(0, 1400, 76)),
        "data:;charset=x;BASE64, " + base64_of(1001) + "\r\n",
        "data:image/png;base64," + "\t\f\v".join(base64_of(1002)[i : i + 200] for i in range(0, 1400, 200)),
    ],
)
@pytest.mark.parametrize("limit", [999, 1000, 1001, 1002])
def test_data_url_size_is_counted_exactly_without_decoding(url: str, limit: int) -> None:
    """The cheap count refuses exactly what decoding would refuse."""
    try:
        parse_data_url(url, max_bytes=limit)
    except PayloadTooLarge:
        with pytest.raises(PayloadTooLarge):
            check_data_url_size(url, max_bytes=limit)
    else:
        check_data_url_size(url, max_bytes=limit)


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png," + "%00" * 2000,  # percent-encoded, not base64: left to parse_data_url
        "data:image/png;base64," + base64_of(2000).replace("A", "%41"),
        "https://example.com/" + "a" * 5000,
        "data:image/png;base64" + "A" * 5000,  # no comma: malformed, reported when parsed
    ],
)
def test_data_url_size_leaves_other_forms_to_the_parser(url: str) -> None:
    check_data_url_size(url, max_bytes=1000)


# -- figures --------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What a transport saw: per-case times, the status codes (or error codes) it got, and how
    the server's resident memory moved across each case."""

    transport: str
    pid: int
    times: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    rss_growth_kib: dict[str, int] = field(default_factory=dict)
    _started: float = 0.0
    _rss: int = 0

    def start(self) -> None:
        self._rss = memory_kib(self.pid)["VmRSS"]
        self._started = time.perf_counter()

    def stop(self, case: Case, status: int) -> None:
        self.times[case.name] = time.perf_counter() - self._started
        self.statuses[case.name] = status
        self.rss_growth_kib[case.name] = memory_kib(self.pid)["VmRSS"] - self._rss

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for status in self.statuses.values():
            counts[str(status)] = counts.get(str(status), 0) + 1
        out: dict[str, Any] = {"cases": len(self.times), "statuses": dict(sorted(counts.items()))}
        for label, names in (
            ("refusals", [n for n, s in self.statuses.items() if s != 200]),
            ("successes", [n for n, s in self.statuses.items() if s == 200]),
        ):
            if names:
                slowest = max(names, key=self.times.__getitem__)
                out[f"{label}_max_ms"] = round(self.times[slowest] * 1e3, 1)
                out[f"{label}_slowest"] = slowest
                out[f"{label}_median_ms"] = round(sorted(self.times[n] for n in names)[len(names) // 2] * 1e3, 1)
        grew = max(self.rss_growth_kib, key=self.rss_growth_kib.__getitem__)
        out["largest_rss_step_mib"] = round(self.rss_growth_kib[grew] / 1024, 1)
        out["largest_rss_step_case"] = grew
        out["ms_per_case"] = {n: round(t * 1e3, 1) for n, t in self.times.items()}
        return out


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


@pytest.fixture(scope="module")
def figures(live_server: LiveServer) -> Iterator[dict[str, Any]]:
    """Each transport's summary and the server's memory (KiB) before and after the module;
    printed and kept in ``artifacts/reliability-bad-input.json``."""
    collected: dict[str, Any] = {"server_memory_kib_before": memory_kib(live_server.process.pid)}
    yield collected
    collected["server_memory_kib_after"] = memory_kib(live_server.process.pid)
    record("bad-input", collected)


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as client:
        yield client


# -- checks shared by the HTTP transports ------------------------------------------------------------


def check_answer(case: Case, status: int, headers: httpx.Headers, body: Any) -> None:
    assert status < 500, f"{case.name}: {status} {str(body)[:300]}"
    assert headers["x-fal-request-id"]
    if case.ok:
        assert status == 200, f"{case.name}: {status} {str(body)[:300]}"
        image = body["images"][0]
        assert (image["width"], image["height"]) == case.expect_size, case.name
        return
    assert status == case.status, f"{case.name}: {status} {str(body)[:300]}"
    assert headers["content-type"] == "application/json"
    if status == 422:  # fal's validation shape, pointing at the field
        detail = body["detail"]
        assert detail[0]["loc"] == ["body", "image_url"], (case.name, detail)
        assert case.needle.lower() in detail[0]["msg"].lower(), (case.name, detail)
    else:
        assert body["error_type"] == "payload_too_large", (case.name, body)
        assert case.needle in body["detail"], (case.name, body)
    assert "base64," not in json.dumps(body)  # the input is never echoed


def test_sync_run(corpus: list[Case], http: httpx.Client, live_server: LiveServer, figures: dict[str, Any]) -> None:
    seen = Figures("sync POST", live_server.process.pid)
    for case in corpus:
        seen.start()
        response = http.post(I2I, json={**FAST, "image_url": case.url})
        seen.stop(case, response.status_code)
        check_answer(case, response.status_code, response.headers, response.json())
    figures[seen.transport] = seen.summary()


def test_strip_with_an_explicit_size_is_resized(http: httpx.Client) -> None:
    """The refusal above is about guessing an output size; given one, the strip is just resized."""
    body = {**FAST, "image_url": b64_url(strip_png()), "image_size": {"width": 64, "height": 64}}
    response = http.post(I2I, json=body)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["images"][0]["width"] == 64


def test_queue(corpus: list[Case], http: httpx.Client, live_server: LiveServer, figures: dict[str, Any]) -> None:
    seen = Figures("queue submit+result", live_server.process.pid)
    for case in corpus:
        seen.start()
        submitted = http.post("/queue" + I2I, json={**FAST, "image_url": case.url})
        if submitted.status_code != 200:  # refused at the door: the body cap
            response = submitted
        else:
            urls = submitted.json()
            while http.get(urls["status_url"]).json()["status"] != "COMPLETED":
                time.sleep(0.02)
            response = http.get(urls["response_url"])
        seen.stop(case, response.status_code)
        check_answer(case, response.status_code, response.headers, response.json())
        if submitted.status_code != 200:  # the body cap, or an inline image counted at submit
            assert case.status == 413, case.name
    figures[seen.transport] = seen.summary()


def test_memory_plateaus_under_repeated_large_inputs(
    corpus: list[Case], http: httpx.Client, live_server: LiveServer, figures: dict[str, Any]
) -> None:
    """The largest input that gets past the body cap, again and again: the server's memory
    settles after the first (allocators keep what they freed) instead of growing per request."""
    (big,) = [c for c in corpus if c.name == "30 MB base64 data URL"]
    samples = []
    for _ in range(6):
        assert http.post(I2I, json={**FAST, "image_url": big.url}).status_code == 413
        samples.append(memory_kib(live_server.process.pid)["VmRSS"])
    figures["repeated 30 MB data URL, RSS after each (KiB)"] = samples
    # Keeping even one copy of each 30 MB body would add 150 MiB over the five repeats.
    assert samples[-1] - samples[0] < 96 * 1024, samples


# -- realtime ------------------------------------------------------------------------------------------


REALTIME_CODES = {422: "INVALID_INPUT", 413: "PAYLOAD_TOO_LARGE"}


def realtime_corpus(ws: ClientConnection, cases: list[Case], as_bytes: bool, pid: int) -> Figures:
    seen = Figures("realtime " + ("image_bytes" if as_bytes else "image_url"), pid)
    for case in cases:
        frame: dict[str, Any] = {**FAST, "request_id": case.name}
        if as_bytes:
            frame["image_bytes"] = case.data
        else:
            frame["image_url"] = case.url
        seen.start()
        ws.send(msgpack.packb(frame, use_bin_type=True))
        got = next_answer(ws)
        seen.stop(case, 200 if case.ok else case.status)
        if case.ok:
            assert "images" in got, (case.name, got)
            assert got["request_id"] == case.name
            image = got["images"][0]
            assert (image["width"], image["height"]) == case.expect_size, case.name
            assert ("content" in image) is as_bytes
        else:
            assert got.get("type") == "x-fal-error", (case.name, str(got)[:300])
            assert got["error"] == REALTIME_CODES[case.status], (case.name, got)
            assert case.needle.lower() in got["reason"].lower() or case.status == 413, (case.name, got)
            assert "base64," not in got["reason"]
    # The same session still renders after the whole corpus.
    ws.send(msgpack.packb({**FAST, "image_bytes": png_bytes(64, 64)}, use_bin_type=True))
    assert "images" in next_answer(ws)
    return seen


@pytest.mark.parametrize("as_bytes", [False, True], ids=["image_url", "image_bytes"])
def test_realtime(corpus: list[Case], live_server: LiveServer, figures: dict[str, Any], as_bytes: bool) -> None:
    cases = [c for c in corpus if not c.over_ws_cap and (c.data is not None or not as_bytes)]
    with open_session(live_server) as ws:
        seen = realtime_corpus(ws, cases, as_bytes, live_server.process.pid)
    figures[seen.transport] = seen.summary()


def test_realtime_frame_over_the_socket_cap_closes_1009_and_the_server_carries_on(
    corpus: list[Case], live_server: LiveServer
) -> None:
    """A frame over twice ``max_ws_message_bytes`` is refused by the WebSocket layer itself
    before it is buffered: the server reads the frame's header, sends close 1009 ("message too
    big") and closes the connection. A client still sending the rest of that frame then sees the
    connection reset rather than the close frame (uncompressed, as the server declines
    permessage-deflate, it is still sending); one that finished sending sees 1009. Frames between
    the two caps get a PAYLOAD_TOO_LARGE error frame (the 30 MB case above). A new session works
    at once."""
    (case,) = [c for c in corpus if c.over_ws_cap]
    with open_session(live_server) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.send(msgpack.packb({**FAST, "image_url": case.url}, use_bin_type=True))
            next_answer(ws)
    closed_by = info.value.rcvd.code if info.value.rcvd is not None else "reset while sending"
    assert closed_by in (1009, "reset while sending"), info.value
    with open_session(live_server) as ws:
        ws.send(msgpack.packb({**FAST, "image_bytes": png_bytes(64, 64)}, use_bin_type=True))
        assert "images" in next_answer(ws)
