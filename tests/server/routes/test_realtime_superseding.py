"""A realtime frame that waits in the engine for a batch still counts as buffered: newer frames
supersede it there, in its place in the engine's line (``Session._generate_newest``).

The real app and WebSocket on loopback, over an engine that holds every request until the test
releases it, so what waits where is exact."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from websockets.sync.client import ClientConnection, connect

from livegen.bench.null_engine import NullEngine, serve_in_thread
from livegen.engine import GenerationRequest, GenerationResult
from livegen.settings import Settings
from tests.conftest import wait_for

KEY = "test-key-superseding"
FRAME = {"model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


class GateEngine(NullEngine):
    """Holds each request until ``release``; a held one can be replaced (unless ``refuse``, as
    when it went into a batch just before the replacement came)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.held: list[tuple[GenerationRequest, Future[GenerationResult]]] = []
        self.refuse = False

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        future: Future[GenerationResult] = Future()
        with self.lock:
            self.held.append((request, future))
        return future

    def replace(self, future: Future[GenerationResult], request: GenerationRequest) -> Future[GenerationResult] | None:
        with self.lock:
            for i, (_, held) in enumerate(self.held):
                if held is future and not self.refuse and future.cancel():
                    self.held[i] = (request, Future())
                    return self.held[i][1]
        return None

    def prompts(self) -> list[str]:
        with self.lock:
            return [r.prompt for r, _ in self.held]

    def release(self) -> None:
        with self.lock:
            request, future = self.held.pop(0)
        future.set_running_or_notify_cancel()
        future.set_result(super().submit(request).result())


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[GateEngine, str]]:
    engine = GateEngine()
    with serve_in_thread(Settings(data_dir=tmp_path, api_keys=KEY, models=[]), engine) as url:  # type: ignore[arg-type]
        yield engine, url


def session(url: str, buffering: int | None) -> ClientConnection:
    """A session asking for ``buffering`` (None: it asks for nothing, as fal's clients by default)."""
    query = "" if buffering is None else f"?max_buffering={buffering}"
    ws_url = url.replace("http", "ws", 1) + f"/fal-ai/fast-turbo-diffusion/realtime{query}"
    return connect(ws_url, additional_headers={"Authorization": f"Key {KEY}"})


def send(ws: ClientConnection, n: int) -> None:
    ws.send(msgpack.packb({**FRAME, "prompt": f"f{n}", "request_id": str(n)}, use_bin_type=True))


def results(ws: ClientConnection, timeout: float = 0.5) -> list[str]:
    """The request_ids of the results that come within ``timeout`` s of each other."""
    ids: list[str] = []
    while True:
        try:
            message = ws.recv(timeout=timeout)
        except TimeoutError:
            return ids
        if isinstance(message, bytes):
            ids.append(msgpack.unpackb(message, raw=False)["request_id"])


def dropped(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('livegen_realtime_frames_total{outcome="dropped"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("buffering", [1, None])  # 1 is the default (settings.default_max_buffering)
def test_with_buffering_1_the_newest_frame_takes_the_waiting_ones_place(
    gate: tuple[GateEngine, str], buffering: int | None
) -> None:
    engine, url = gate
    with session(url, buffering) as ws:
        send(ws, 0)
        wait_for(lambda: engine.prompts() == ["f0"])
        for n in range(1, 5):
            send(ws, n)
        wait_for(lambda: engine.prompts() == ["f4"])  # one request in the engine, the newest frame
        engine.release()
        assert results(ws) == ["4"]
    assert dropped(url) == 4


def test_with_buffering_2_the_inboxs_oldest_moves_into_the_engine(gate: tuple[GateEngine, str]) -> None:
    """The waiting frame and the inbox hold 2: each frame beyond supersedes the oldest, which is
    the one in the engine; the inbox's oldest takes its place there. Frames 0-3: 0 and 1 are
    superseded, 2 waits in the engine, 3 in the inbox, and both are rendered, in order."""
    engine, url = gate
    with session(url, 2) as ws:
        send(ws, 0)
        wait_for(lambda: engine.prompts() == ["f0"])
        for n in range(1, 4):
            send(ws, n)
        wait_for(lambda: engine.prompts() == ["f2"])
        time.sleep(0.1)
        assert engine.prompts() == ["f2"]  # frame 3 stays in the inbox: the buffer holds 2
        engine.release()
        wait_for(lambda: engine.prompts() == ["f3"])
        engine.release()
        assert results(ws) == ["2", "3"]
    assert dropped(url) == 2


def test_a_frame_already_in_a_batch_is_rendered_and_nothing_newer_is_lost(gate: tuple[GateEngine, str]) -> None:
    """When the engine refuses the replacement (the waiting frame went into a batch meanwhile),
    the newer frame goes back to the front of the inbox: every frame the buffer held is rendered."""
    engine, url = gate
    engine.refuse = True
    with session(url, 2) as ws:
        send(ws, 0)
        wait_for(lambda: engine.prompts() == ["f0"])
        send(ws, 1)
        send(ws, 2)
        time.sleep(0.2)
        engine.release()
        for n in (1, 2):
            wait_for(lambda n=n: engine.prompts() == [f"f{n}"])  # type: ignore[misc]
            engine.release()
        assert results(ws) == ["0", "1", "2"]
    assert dropped(url) == 0


def i2i_frame(n: int) -> dict[str, Any]:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "JPEG")
    image = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return {
        **FRAME,
        "prompt": f"f{n}",
        "request_id": str(n),
        "image_url": image,
        "strength": 0.5,
        "num_inference_steps": 2,
    }


def test_a_swap_that_loses_the_race_keeps_its_decoded_input(
    gate: tuple[GateEngine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newer frame was prepared (its input image decoded) for a swap the engine refused: it
    goes back to the inbox as prepared, so each frame's image is decoded once."""
    from livegen.server import generation

    engine, url = gate
    engine.refuse = True
    decoded: list[int] = []
    real_decode = generation.decode_image

    def counted_decode(*args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(generation, "decode_image", counted_decode)
    with session(url, 1) as ws:
        ws.send(msgpack.packb(i2i_frame(0), use_bin_type=True))
        wait_for(lambda: engine.prompts() == ["f0"])
        ws.send(msgpack.packb(i2i_frame(1), use_bin_type=True))  # tries to supersede f0, refused
        wait_for(lambda: len(decoded) == 2)
        time.sleep(0.2)
        engine.release()
        wait_for(lambda: engine.prompts() == ["f1"])
        engine.release()
        assert results(ws) == ["0", "1"]
    assert len(decoded) == 2
    assert dropped(url) == 0


def test_frames_that_come_while_a_swap_is_made_are_swapped_in_next(
    gate: tuple[GateEngine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making the newer frame's request takes time (here its input image's decode, held by the
    test). A frame that arrives meanwhile overfills the buffer again: once the first swap is
    made, the worker swaps again at once, so the engine ends up with the newest frame, not with
    one that the buffer has no room for."""
    from livegen.server import generation

    engine, url = gate
    decoding = threading.Event()
    decoding.set()
    real_decode = generation.decode_image

    def held_decode(*args: Any, **kwargs: Any) -> Any:
        assert decoding.wait(10)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(generation, "decode_image", held_decode)

    def send_i2i(ws: ClientConnection, n: int) -> None:
        ws.send(msgpack.packb(i2i_frame(n), use_bin_type=True))

    with session(url, 1) as ws:
        send_i2i(ws, 0)
        wait_for(lambda: engine.prompts() == ["f0"])
        decoding.clear()
        send_i2i(ws, 1)  # supersedes f0: the worker starts making f1's request, held in the decode
        time.sleep(0.2)
        send_i2i(ws, 2)  # arrives while f1 is being made
        time.sleep(0.2)
        decoding.set()
        wait_for(lambda: engine.prompts() == ["f2"])
        engine.release()
        assert results(ws) == ["2"]
    assert dropped(url) == 2
