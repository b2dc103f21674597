"""The official Python client's realtime API (fal_client.realtime / realtime_async)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import fal_client
import pytest
from PIL import Image

from livegen.client import point_fal_client
from tests.conftest import LiveServer, decode_data_url, png_bytes

LCM = "fal-ai/fast-lcm-diffusion"
SD15 = {"model_name": "runwayml/stable-diffusion-v1-5", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def fal(live_server: LiveServer) -> fal_client.SyncClient:
    point_fal_client(live_server.base_url)
    return fal_client.SyncClient(key=live_server.key)


def test_quickstart_frames_with_jwt(fal: fal_client.SyncClient) -> None:
    # fal's quickstart: the base LCM app, a 512x512 PNG data URL, sync_mode: image-to-image.
    image_url = fal_client.encode(png_bytes(512, 512), "image/png")
    with fal.realtime(LCM) as connection:
        for i in range(3):
            connection.send({"prompt": f"a cat {i}", "image_url": image_url, "sync_mode": True, **SD15,
                             "strength": 0.5, "request_id": f"q{i}"})  # fmt: skip
            result = connection.recv()
            assert result is not None and result["request_id"] == f"q{i}"
            mime, data = decode_data_url(result["images"][0]["url"])
            assert mime == "image/jpeg" and Image.open(io.BytesIO(data)).size == (512, 512)


def test_text_to_image_frame_and_key_header(fal: fal_client.SyncClient) -> None:
    with fal.realtime("fal-ai/fast-turbo-diffusion", use_jwt=False) as connection:
        connection.send({"prompt": "no image", "model_name": "stabilityai/sd-turbo"})
        result = connection.recv()
        assert result is not None and result["images"][0]["width"] == 512  # turbo's default: square


def test_error_frame_raises_and_the_session_goes_on(fal: fal_client.SyncClient) -> None:
    with fal.realtime(LCM) as connection:
        connection.send({"negative_prompt": "no prompt"})
        with pytest.raises(fal_client.client.RealtimeError) as info:
            connection.recv()
        assert "INVALID_INPUT" in str(info.value) or info.value.error == "INVALID_INPUT"
        connection.send({"prompt": "fine", **SD15, "image_size": {"width": 64, "height": 64}})
        assert connection.recv() is not None


def test_image_bytes_in_content_bytes_out(fal: fal_client.SyncClient) -> None:
    with fal.realtime(LCM, max_buffering=4) as connection:
        connection.send({"prompt": "bytes", **SD15, "image_bytes": png_bytes(256, 256), "strength": 0.5})
        result = connection.recv()
    assert result is not None
    content = result["images"][0]["content"]
    assert isinstance(content, bytes) and Image.open(io.BytesIO(content)).size == (256, 256)
    assert "url" not in result["images"][0]


def test_realtime_async(live_server: LiveServer, fal: fal_client.SyncClient) -> None:
    async def go() -> dict[str, Any] | None:
        client = fal_client.AsyncClient(key=live_server.key)
        async with client.realtime(LCM) as connection:
            await connection.send({"prompt": "async", **SD15, "image_size": {"width": 64, "height": 64}})
            return await connection.recv()

    result = asyncio.run(go())
    assert result is not None and result["images"][0]["width"] == 64
