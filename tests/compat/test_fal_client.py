"""The official Python client (fal-client 1.0.3, pinned) against a live livegen server,
pointed at it with ``livegen.client.point_fal_client`` and nothing else."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator

import fal_client
import httpx
import pytest
from PIL import Image

from livegen.client import point_fal_client
from tests.conftest import LiveServer, decode_data_url, png_bytes


@pytest.fixture(scope="module")
def fal(live_server: LiveServer) -> Iterator[fal_client.SyncClient]:
    point_fal_client(live_server.base_url)
    yield fal_client.SyncClient(key=live_server.key)


def _jpeg(url: str) -> Image.Image:
    mime, data = decode_data_url(url)
    assert mime == "image/jpeg"
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    return img


def test_quickstart_module_level_run(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # fal's own quickstart shape: the module-level function, the key from FAL_KEY.
    monkeypatch.setenv("FAL_KEY", live_server.key)
    point_fal_client(live_server.base_url)
    client = fal_client.SyncClient()  # what fal_client.run uses, built after FAL_KEY is set
    result = client.run("fal-ai/fast-turbo-diffusion", {"prompt": "a red fox"})
    img = _jpeg(result["images"][0]["url"])
    assert img.size == (512, 512)
    assert result["images"][0]["width"] == 512 and result["images"][0]["height"] == 512
    assert result["images"][0]["content_type"] == "image/jpeg"
    assert isinstance(result["seed"], int)
    assert result["has_nsfw_concepts"] == [False]
    assert result["timings"]["inference"] > 0


def test_lcm_image_to_image_with_data_url(fal: fal_client.SyncClient) -> None:
    image_url = fal_client.encode(png_bytes(512, 512), "image/png")
    result = fal.run(
        "fal-ai/fast-lcm-diffusion/image-to-image",
        {
            "prompt": "a watercolor fox",
            "image_url": image_url,
            "num_inference_steps": 4,
            "strength": 0.5,
            "seed": 7,
        },
    )
    assert _jpeg(result["images"][0]["url"]).size == (512, 512)
    assert result["seed"] == 7
    assert result["prompt"] == "a watercolor fox"


def test_async_client(live_server: LiveServer, fal: fal_client.SyncClient) -> None:
    async def go() -> dict[str, object]:
        client = fal_client.AsyncClient(key=live_server.key)
        return await client.run(
            "fal-ai/fast-turbo-diffusion",
            {
                "prompt": "a lighthouse",
                "model_name": "stabilityai/sd-turbo",
                "num_images": 2,
                "format": "png",
            },
        )

    result = asyncio.run(go())
    images = result["images"]
    assert isinstance(images, list) and len(images) == 2
    for image in images:
        assert decode_data_url(image["url"])[0] == "image/png"


def test_file_output_when_not_sync_mode(fal: fal_client.SyncClient) -> None:
    result = fal.run(
        "fal-ai/fast-turbo-diffusion",
        {"prompt": "a boat", "model_name": "stabilityai/sd-turbo", "sync_mode": False},
    )
    url = result["images"][0]["url"]
    assert url.startswith("http://127.0.0.1:")
    response = httpx.get(url)  # no key: file URLs are public
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(response.content)).size == (512, 512)
    assert len(response.content) == result["images"][0]["file_size"]


def test_validation_error_surfaces_in_client(fal: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal.run("fal-ai/fast-turbo-diffusion", {"negative_prompt": "no prompt here"})
    assert info.value.status_code == 422
    assert isinstance(info.value.message, list)
    assert info.value.message[0]["loc"] == ["body", "prompt"]


def test_wrong_key_is_401(live_server: LiveServer, fal: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.SyncClient(key="nope").run("fal-ai/fast-turbo-diffusion", {"prompt": "x"})
    assert info.value.status_code == 401
    assert info.value.error_type == "unauthorized"


def _ws_answer(messages: list[str | bytes]) -> tuple[int, dict[str, object]]:
    """One HTTP-over-WebSocket answer (start, body, end), as fal's ``fal.apps.ws`` reads it."""
    start, body, end = (json.loads(m) for m in messages)
    assert start["type"] == "start" and end["type"] == "end" and start["request_id"] == end["request_id"]
    return start["status"], body


@pytest.mark.parametrize("use_jwt", [True, False])
def test_ws_connect(fal: fal_client.SyncClient, use_jwt: bool) -> None:
    """``ws_connect`` opens a raw WebSocket on the app's own URL (its default path is empty):
    livegen answers HTTP over WebSocket there (fal's ws.fal.run protocol). With ``use_jwt`` the
    URL carries a token for the app; without, the handshake carries the key."""
    with fal.ws_connect("fal-ai/fast-turbo-diffusion/image-to-image", use_jwt=use_jwt) as ws:
        image_url = fal_client.encode(png_bytes(128, 128), "image/png")
        ws.send(json.dumps({"prompt": "a fox", "image_url": image_url, "strength": 1.0, "seed": 3}))
        status, output = _ws_answer([ws.recv() for _ in range(3)])
        ws.send(json.dumps({"image_url": image_url}))
        refused, error = _ws_answer([ws.recv() for _ in range(3)])
    assert status == 200 and output["seed"] == 3
    assert _jpeg(output["images"][0]["url"]).size == (128, 128)  # type: ignore[index]
    assert refused == 422 and error["detail"][0]["loc"] == ["body", "prompt"]  # type: ignore[index]


def test_ws_connect_async(live_server: LiveServer, fal: fal_client.SyncClient) -> None:
    async def go() -> list[tuple[int, dict[str, object]]]:
        client = fal_client.AsyncClient(key=live_server.key)
        async with client.ws_connect("fal-ai/fast-lcm-diffusion") as ws:
            answers = []
            for seed in (1, 2):  # sent ahead: answered in order
                await ws.send(json.dumps({"prompt": "a kite", "num_inference_steps": 2, "seed": seed}))
            for _ in range(2):
                answers.append(_ws_answer([await ws.recv() for _ in range(3)]))
            return answers

    answers = asyncio.run(go())
    assert [(status, output["seed"]) for status, output in answers] == [(200, 1), (200, 2)]
