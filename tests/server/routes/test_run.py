"""Sync run over real HTTP against ``livegen serve --weights tiny-random``."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

from livegen.protocol.schemas import MAX_SEED
from tests.conftest import LiveServer, data_url, decode_data_url, png_bytes

TURBO = "/fal-ai/fast-turbo-diffusion"
LCM = "/fal-ai/fast-lcm-diffusion"
SD = {"model_name": "stabilityai/sd-turbo"}


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> httpx.Client:
    return live_server.client()


def run(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-fal-request-id"]
    result: dict[str, Any] = response.json()
    return result


def image_bytes(result: dict[str, Any], i: int = 0) -> bytes:
    return decode_data_url(result["images"][i]["url"])[1]


def size_of(result: dict[str, Any], i: int = 0) -> tuple[int, int]:
    size: tuple[int, int] = Image.open(io.BytesIO(image_bytes(result, i))).size
    return size


# -- determinism and seeds ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["stabilityai/sd-turbo", "stabilityai/sdxl-turbo"])
def test_same_seed_same_bytes_other_seed_other_image(http: httpx.Client, model: str) -> None:
    body = {"prompt": "a red fox", "model_name": model, "seed": 1234}
    a, b = run(http, TURBO, body), run(http, TURBO, body)
    c = run(http, TURBO, {**body, "seed": 1235})
    assert a["seed"] == b["seed"] == 1234 and c["seed"] == 1235
    assert image_bytes(a) == image_bytes(b)
    assert image_bytes(a) != image_bytes(c)


def test_random_seed_is_echoed_and_reproduces(http: httpx.Client) -> None:
    first = run(http, TURBO, {"prompt": "a cat", **SD})
    again = run(http, TURBO, {"prompt": "a cat", **SD, "seed": first["seed"]})
    assert image_bytes(first) == image_bytes(again)


def test_num_images_uses_seed_plus_i(http: httpx.Client) -> None:
    many = run(http, TURBO, {"prompt": "a dog", **SD, "seed": 40, "num_images": 3, "format": "png"})
    assert len(many["images"]) == 3 and len(many["has_nsfw_concepts"]) == 3
    third = run(http, TURBO, {"prompt": "a dog", **SD, "seed": 42, "format": "png"})
    # Same pixels (PNG is lossless); batch size may change float rounding, so compare loosely.
    a = Image.open(io.BytesIO(image_bytes(many, 2))).convert("RGB")
    b = Image.open(io.BytesIO(image_bytes(third))).convert("RGB")
    diff = max(abs(x - y) for pa, pb in zip(a.getdata(), b.getdata(), strict=True) for x, y in zip(pa, pb, strict=True))
    assert diff <= 2
    assert image_bytes(many, 0) != image_bytes(many, 1)


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "size"),
    [
        ("square", (512, 512)),
        ("square_hd", (1024, 1024)),
        ("portrait_16_9", (576, 1024)),
        ("landscape_4_3", (1024, 768)),
    ],
)
def test_image_size_presets(http: httpx.Client, preset: str, size: tuple[int, int]) -> None:
    result = run(http, TURBO, {"prompt": "a hill", **SD, "image_size": preset, "num_inference_steps": 1})
    assert size_of(result) == size
    assert (result["images"][0]["width"], result["images"][0]["height"]) == size


def test_explicit_image_size(http: httpx.Client) -> None:
    result = run(http, TURBO, {"prompt": "a hill", **SD, "image_size": {"width": 640, "height": 384}})
    assert size_of(result) == (640, 384)


def test_lcm_default_size_is_square_hd(http: httpx.Client) -> None:
    result = run(
        http,
        LCM,
        {"prompt": "a tree", "model_name": "runwayml/stable-diffusion-v1-5", "num_inference_steps": 2},
    )
    assert size_of(result) == (1024, 1024)


def test_image_to_image_takes_the_input_size(http: httpx.Client) -> None:
    body = {"prompt": "a tree", **SD, "image_url": data_url(png_bytes(300, 203)), "strength": 0.6}
    assert size_of(run(http, f"{TURBO}/image-to-image", body)) == (296, 200)  # snapped down to multiples of 8
    body["image_size"] = "square"
    assert size_of(run(http, f"{TURBO}/image-to-image", body)) == (512, 512)


def test_preserve_aspect_ratio_and_crop(http: httpx.Client) -> None:
    body = {
        "prompt": "a tree",
        **SD,
        "image_url": data_url(png_bytes(800, 400)),
        "image_size": "square",
        "preserve_aspect_ratio": True,
    }
    w, h = size_of(run(http, f"{TURBO}/image-to-image", body))
    assert w % 32 == 0 and h % 32 == 0 and abs(w / h - 2) < 0.1
    assert size_of(run(http, f"{TURBO}/image-to-image", {**body, "crop_output": True})) == (512, 512)


def test_inpainting(http: httpx.Client) -> None:
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (128, 128, 384, 384))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    for path, model in ((TURBO, "stabilityai/sdxl-turbo"), (LCM, "runwayml/stable-diffusion-v1-5")):
        body = {
            "prompt": "a window",
            "model_name": model,
            "image_url": data_url(png_bytes()),
            "mask_url": data_url(buf.getvalue()),
            "num_inference_steps": 2,
            "strength": 0.9,
        }
        assert size_of(run(http, f"{path}/inpainting", body)) == (512, 512)


def test_concurrent_requests_share_batches(http: httpx.Client, live_server: LiveServer) -> None:
    before = httpx.get(live_server.base_url + "/readyz").json()["multi_request_batches"]
    bodies = [{"prompt": f"a bird number {i}", **SD, "seed": i} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: run(http, TURBO, b), bodies))
    assert [r["seed"] for r in results] == list(range(8))
    assert [r["prompt"] for r in results] == [b["prompt"] for b in bodies]
    after = httpx.get(live_server.base_url + "/readyz").json()["multi_request_batches"]
    assert after > before


# -- bad input: always a clear 4xx, never a 500 ---------------------------------------------


def _truncated_png() -> bytes:
    return png_bytes()[:200]


def _pixel_bomb() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (the data is not needed to refuse it)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("path", "body", "loc", "needle"),
    [
        (TURBO, {}, ["body", "prompt"], "required"),
        (TURBO, {"prompt": ""}, ["body", "prompt"], "at least 1"),
        (
            TURBO,
            {"prompt": "x", "model_name": "stabilityai/sd-9000"},
            ["body", "model_name"],
            "stabilityai/sd-turbo",
        ),
        (TURBO, {"prompt": "x", "num_inference_steps": 0}, ["body", "num_inference_steps"], "greater than"),
        (TURBO, {"prompt": "x", "num_inference_steps": 51}, ["body", "num_inference_steps"], "less than"),
        (TURBO, {"prompt": "x", "num_images": 9}, ["body", "num_images"], "less than"),
        (TURBO, {"prompt": "x", "image_size": {"width": 500, "height": 512}}, None, "multiple of 8"),
        (TURBO, {"prompt": "x", "image_size": "huge"}, None, "square_hd"),
        (TURBO, {"prompt": "x", "format": "gif"}, ["body", "format"], "jpeg"),
        (f"{TURBO}/image-to-image", {"prompt": "x"}, ["body", "image_url"], "required"),
        (
            f"{TURBO}/image-to-image",
            {"prompt": "x", "image_url": data_url(_truncated_png())},
            ["body", "image_url"],
            "truncated",
        ),
        (
            f"{TURBO}/image-to-image",
            {"prompt": "x", "image_url": data_url(_pixel_bomb())},
            ["body", "image_url"],
            "pixels",
        ),
        (
            f"{TURBO}/image-to-image",
            {
                "prompt": "x",
                "image_url": "data:text/plain;base64," + base64.b64encode(b"hello world").decode(),
            },
            ["body", "image_url"],
            "PNG, JPEG or WebP",
        ),
        (
            f"{TURBO}/image-to-image",
            {"prompt": "x", "image_url": "data:image/png;base64,***"},
            ["body", "image_url"],
            "base64",
        ),
        (
            f"{TURBO}/image-to-image",
            {"prompt": "x", "image_url": "file:///etc/passwd"},
            ["body", "image_url"],
            "http",
        ),
        (
            f"{TURBO}/image-to-image",
            {"prompt": "x", "image_url": data_url(png_bytes()), "num_inference_steps": 1, "strength": 0.5},
            ["body", "strength"],
            "at least 1",
        ),
        (
            f"{TURBO}/inpainting",
            {"prompt": "x", "image_url": data_url(png_bytes())},
            ["body", "mask_url"],
            "required",
        ),
    ],
)
def test_bad_input_is_422(
    http: httpx.Client, path: str, body: dict[str, Any], loc: list[str] | None, needle: str
) -> None:
    body = {**SD, **body} if "model_name" not in body else body
    response = http.post(path, json=body)
    assert response.status_code == 422, response.text[:300]
    assert response.headers["x-fal-request-id"]
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    if loc is not None:
        assert detail[0]["loc"] == loc
    assert needle.lower() in " ".join(str(d["msg"]) + str(d.get("ctx", "")) for d in detail).lower()
    assert "base64," not in response.text  # inputs are never echoed back


def test_private_url_refused_by_default(http: httpx.Client, live_server: LiveServer) -> None:
    body = {"prompt": "x", **SD, "image_url": live_server.base_url + "/healthz"}
    response = http.post(f"{TURBO}/image-to-image", json=body)
    assert response.status_code == 422
    assert "--allow-private-urls" in response.json()["detail"][0]["msg"]
    assert response.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_own_file_urls_are_read_locally(http: httpx.Client) -> None:
    stored = run(http, TURBO, {"prompt": "a boat", **SD, "sync_mode": False})
    body = {"prompt": "a boat at night", **SD, "image_url": stored["images"][0]["url"], "strength": 0.5}
    assert size_of(run(http, f"{TURBO}/image-to-image", body)) == (512, 512)


def test_body_that_is_not_json(http: httpx.Client) -> None:
    response = http.post(TURBO, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Key wrong"}, {"Authorization": "Bearer x"}, {"Authorization": "Key"}]
)
def test_missing_or_wrong_key_is_401(live_server: LiveServer, headers: dict[str, str]) -> None:
    response = httpx.post(live_server.base_url + TURBO, json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error_type"] == "unauthorized"
    assert response.headers["x-fal-error-type"] == "unauthorized"


def test_bad_body_without_key_is_401_not_422(live_server: LiveServer) -> None:
    assert httpx.post(live_server.base_url + TURBO, json={}).status_code == 401


def test_unknown_path_is_404_in_fal_shape(http: httpx.Client) -> None:
    response = http.post("/fal-ai/does-not-exist", json={"prompt": "x"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Path /fal-ai/does-not-exist not found"}


def test_the_heap_is_frozen_once_the_engine_is_ready(live_server: LiveServer) -> None:
    """gc.freeze() after start-up (engine.freeze_heap): full collections then skip the objects of
    torch, diffusers and the models. The log says how many it froze: hundreds of thousands."""
    line = next(line for line in live_server.log().splitlines() if "objects frozen after start-up" in line)
    assert int(line.split("gc: ")[1].split()[0]) > 100_000, line


def test_health_ready_and_openapi(live_server: LiveServer) -> None:
    assert httpx.get(live_server.base_url + "/healthz").json() == {"status": "ok"}
    for probe in ("/healthz", "/readyz"):  # load balancers that probe with HEAD
        head = httpx.head(live_server.base_url + probe)
        assert head.status_code == 200 and head.content == b"", probe
    ready = httpx.get(live_server.base_url + "/readyz").json()
    assert ready["status"] == "ready"
    assert ready["models"]["stabilityai/sd-turbo"] == "loaded"
    assert "not loaded" in ready["safety_checker"]
    spec = httpx.get(live_server.base_url + "/openapi.json").json()
    for path in (
        TURBO,
        f"{TURBO}/image-to-image",
        f"{TURBO}/inpainting",
        LCM,
        f"{LCM}/image-to-image",
        f"{LCM}/inpainting",
    ):
        assert "post" in spec["paths"][path]
    schema = spec["components"]["schemas"]["TurboTextToImage"]["properties"]
    assert schema["num_inference_steps"]["maximum"] == 50
    ids = [op["operationId"] for methods in spec["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)  # code generators need them unique
    assert "Duplicate Operation ID" not in live_server.log()


def test_seed_bound_is_exact_in_the_schema_and_enforced(http: httpx.Client, live_server: LiveServer) -> None:
    """/openapi.json writes bounds as JSON doubles: the seed's maximum must be one a double holds
    exactly, and the server must accept exactly up to it."""
    text = httpx.get(live_server.base_url + "/openapi.json").text
    seed = json.loads(text)["components"]["schemas"]["TurboTextToImage"]["properties"]["seed"]["anyOf"][0]
    assert seed["type"] == "integer" and seed["minimum"] == 0
    assert seed["maximum"] == MAX_SEED and float(seed["maximum"]).is_integer() and int(seed["maximum"]) == MAX_SEED
    assert str(MAX_SEED) in text and "e+18" not in text
    small = {"prompt": "x", **SD, "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}
    for path in (TURBO, f"/queue{TURBO}"):
        refused = http.post(path, json={**small, "seed": MAX_SEED + 1})
        assert refused.status_code == 422, refused.text[:300]
        assert refused.json()["detail"][0]["loc"] == ["body", "seed"]
        assert http.post(path, json={**small, "seed": MAX_SEED}).status_code == 200
    # Image i uses seed + i: the largest seed still generates every image, and is echoed.
    largest = run(http, TURBO, {**small, "seed": MAX_SEED, "num_images": 2})
    assert largest["seed"] == MAX_SEED and len(largest["images"]) == 2


def test_server_log_has_no_secrets(live_server: LiveServer, http: httpx.Client) -> None:
    run(http, f"{TURBO}/image-to-image", {"prompt": "x", **SD, "image_url": data_url(png_bytes(64, 64))})
    log = live_server.log()
    assert live_server.key not in log
    assert "base64," not in log


def test_metrics(http: httpx.Client, live_server: LiveServer) -> None:
    run(http, TURBO, {"prompt": "counted", **SD})
    assert http.post(TURBO, json={}).status_code == 422
    text = httpx.get(live_server.base_url + "/metrics").text
    assert 'livegen_http_requests_total{method="POST",route="/fal-ai/fast-turbo-diffusion",status="200"}' in text
    assert 'livegen_http_requests_total{method="POST",route="/fal-ai/fast-turbo-diffusion",status="422"}' in text
    for name in ("livegen_engine_batches_total", "livegen_engine_busy_seconds_total", "livegen_queue_jobs"):
        assert name in text
    # The process and Python's collector: what an operator watches memory and full collections with.
    resident = next(line for line in text.splitlines() if line.startswith("process_resident_memory_bytes "))
    assert float(resident.split()[1]) > 50 * 2**20  # torch and diffusers are loaded
    assert 'python_gc_collections_total{generation="2"}' in text
    assert live_server.key not in text


def test_oversized_body_is_413_before_it_is_read(live_server: LiveServer) -> None:
    import socket

    # Declare 100 MB and send none of it: the answer must come without the body.
    with socket.create_connection(("127.0.0.1", int(live_server.base_url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(
            b"POST /fal-ai/fast-turbo-diffusion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Key {live_server.key}\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n".encode()
        )
        answer = ""
        while "larger than" not in answer and (chunk := s.recv(4096)):  # headers and body may come apart
            answer += chunk.decode()
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "larger than" in answer


def test_oversized_chunked_body_is_413(http: httpx.Client) -> None:
    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * (1024 * 1024)

    response = http.post(TURBO, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error_type"] == "payload_too_large"


# -- GET with the input in the query string (``fal.run(id, {method: "get"})``) --------------


def test_get_with_query_input_runs(http: httpx.Client) -> None:
    params = {"prompt": "a red fox", **SD, "seed": "77", "num_images": "2", "enable_safety_checker": "false"}
    response = http.get(TURBO, params=params, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text[:300]
    result = response.json()
    assert result["seed"] == 77 and len(result["images"]) == 2
    posted = run(http, TURBO, {"prompt": "a red fox", **SD, "seed": 77, "num_images": 2})
    assert image_bytes(result) == image_bytes(posted)


def test_get_with_json_valued_query_parameter(http: httpx.Client) -> None:
    params = {"prompt": "x", **SD, "seed": "1", "image_size": '{"width": 256, "height": 128}'}
    assert size_of(http.get(TURBO, params=params).json()) == (256, 128)


@pytest.mark.parametrize(
    ("params", "loc"),
    [({**SD}, ["query", "prompt"]), ({"prompt": "x", **SD, "num_inference_steps": "many"}, None)],
)
def test_get_with_bad_query_is_422(http: httpx.Client, params: dict[str, str], loc: list[str] | None) -> None:
    response = http.get(TURBO, params=params)
    assert response.status_code == 422, response.text[:300]
    detail = response.json()["detail"]
    assert detail[0]["loc"][0] == "query"
    if loc is not None:
        assert detail[0]["loc"] == loc


def test_get_without_key_is_401(live_server: LiveServer) -> None:
    assert httpx.get(live_server.base_url + TURBO, params={"prompt": "x"}).status_code == 401
