"""Fuzzing: schemathesis against a live server's ``/openapi.json``, and hypothesis on the parsers
that see untrusted input first (data URLs, URLs, images, request models, sizes).

Schemathesis: every operation, valid (positive) and invalid (negative) cases, with a valid key
and without one. Checks: no 5xx, every status documented (fal's error body is documented as
every operation's ``default`` response), content types and bodies as documented. The server
caps sizes, steps and images low, so valid generation requests stay cheap on a CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from pydantic import ValidationError

from livegen.engine.imaging import decode_image, parse_data_url, to_data_url
from livegen.protocol.errors import InvalidImage, InvalidInput, LivegenError, PayloadTooLarge
from livegen.protocol.schemas import (
    IMAGE_SIZE_PRESETS,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    ImageSize,
    LcmImageToImage,
    LcmRealtime,
    TurboTextToImage,
    resolve_image_size,
)
from livegen.server.generation import output_size
from livegen.server.storage import LIFECYCLE_HEADERS, requested_ttl
from livegen.server.urlfetch import FetchPolicy, fetch_bytes
from tests.conftest import LiveServer, start_server, stop_server
from tests.reliability.conftest import SERVER_ENV, record

# Multiplies every example count here, for longer hunts by hand (LIVEGEN_FUZZ_SCALE=20).
SCALE = max(1, int(os.environ.get("LIVEGEN_FUZZ_SCALE", "1")))

FUZZ_ENV = {
    **SERVER_ENV,
    "LIVEGEN_MAX_IMAGE_SIDE": "128",
    "LIVEGEN_MAX_NUM_IMAGES": "2",
    "LIVEGEN_MAX_INFERENCE_STEPS": "2",
    "LIVEGEN_FETCH_TIMEOUT_S": "2",
}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("fuzz-server"),
        "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo",
        env=FUZZ_ENV,
        synth_from=shared_data_dir,
    )  # fmt: skip
    yield server
    stop_server(server)


# -- schemathesis ------------------------------------------------------------------------------


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_failure_text(e) for e in exc.exceptions)
    title = getattr(exc, "title", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"{title}: {message}" if title else message


@pytest.mark.parametrize("authenticated", [True, False], ids=["with-key", "without-key"])
def test_openapi_fuzz(fuzz_server: LiveServer, authenticated: bool) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    headers = {"Authorization": f"Key {fuzz_server.key}"} if authenticated else {}
    examples = (12 if authenticated else 6) * SCALE
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    cases: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    failures: list[str] = []

    def fuzz(operation: Any, mode: GenerationMode) -> None:
        label = operation.label

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            cases[label] += 1
            try:
                response = case.call(headers=headers, timeout=60)
            except Exception as exc:  # noqa: BLE001 - a reset or a crash: recorded as a failure
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                return
            statuses[str(response.status_code)] += 1
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (AssertionError, BaseExceptionGroup) as exc:
                curl = case.as_curl_command(headers=headers)
                failures.append(f"{label} -> {response.status_code}: {_failure_text(exc)[:600]}\n    {curl[:600]}")

        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, label  # nothing in this operation can be made invalid

    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode)

    record(
        f"fuzz-{'with' if authenticated else 'without'}-key",
        {
            "operations": len(cases),
            "cases_total": sum(cases.values()),
            "cases_per_operation": dict(sorted(cases.items())),
            "statuses": dict(sorted(statuses.items())),
            "failure_kinds": dict(Counter(f.split("\n", 1)[0][:200] for f in failures).most_common(40)),
            "failures": failures[:20],
        },
    )
    assert not failures, "\n".join(failures[:20])
    assert fuzz_server.process.poll() is None


# -- the parsers, with hypothesis -----------------------------------------------------------------

FAST = settings(max_examples=300 * SCALE, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
B64 = string.ascii_letters + string.digits + "+/="


def data_urls() -> st.SearchStrategy[str]:
    mime = st.sampled_from(["", "image/png", "IMAGE/JPEG", "text/plain;charset=utf-8", "a/b;x=y", ";"])
    flags = st.sampled_from(["", ";base64", ";BASE64", "; base64 ", ";base64;base64", ";charset=x;base64"])
    payload = st.one_of(
        st.text(max_size=60),
        st.text(alphabet=B64 + "% \n\t-_.", max_size=60),
        st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()),
        st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode().rstrip("=")),
        st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode().replace("+", "%2B").replace("=", "%3D")),
    )
    scheme = st.sampled_from(["data:", "DATA:", "Data:", "data", "dat:", ""])
    comma = st.sampled_from([",", ",", ""])
    return st.builds(lambda s, m, f, c, p: s + m + f + c + p, scheme, mime, flags, comma, payload)


@FAST
@given(url=st.one_of(st.text(max_size=80), data_urls()), max_bytes=st.integers(0, 64))
def test_data_url_parser_returns_bytes_or_raises_its_own_errors(url: str, max_bytes: int) -> None:
    try:
        mime, data = parse_data_url(url, max_bytes=max_bytes)
    except (InvalidInput, PayloadTooLarge) as exc:
        assert exc.http_status in (413, 422)
        return
    assert isinstance(mime, str) and mime == mime.lower()
    assert isinstance(data, bytes) and len(data) <= max_bytes


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)


@FAST
@given(
    value=st.one_of(
        st.text(max_size=60),
        JSON_VALUES.map(json.dumps),
        st.dictionaries(st.sampled_from(["expiration_duration_seconds", "initial_acl"]), JSON_VALUES).map(json.dumps),
        st.integers(min_value=-(10**400), max_value=10**400).map(lambda n: f'{{"expiration_duration_seconds": {n}}}'),
    ),
    name=st.sampled_from(LIFECYCLE_HEADERS),
)
def test_lifecycle_headers_give_a_lifetime_or_invalid_input(value: str, name: str) -> None:
    try:
        ttl = requested_ttl({name: value})
    except InvalidInput as exc:
        assert exc.loc == ("header", name)
        return
    assert ttl is None or (isinstance(ttl, float) and 0 < ttl < float("inf"))


@FAST
@given(data=st.binary(max_size=200), mime=st.sampled_from(["image/png", "image/jpeg", "application/octet-stream"]))
def test_data_url_round_trip(data: bytes, mime: str) -> None:
    assert parse_data_url(to_data_url(data, mime), max_bytes=len(data)) == (mime, data)


@FAST
@given(url=st.one_of(st.text(max_size=60), st.builds(lambda h: f"http://{h}/x.png", st.text(max_size=30)), data_urls()))
def test_url_inputs_never_fetch_private_addresses_or_crash(url: str) -> None:
    """Any string as ``image_url``: bytes (data URLs only, here) or one of our errors. Every
    host resolves to loopback and private addresses are not allowed, so nothing is fetched."""
    import asyncio

    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    def no_network(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"fetched {request.url}")

    async def go() -> bytes:
        return await fetch_bytes(
            url,
            FetchPolicy(allow_private=False, max_bytes=1024, timeout_s=5),
            resolver=loopback,
            transport=httpx.MockTransport(no_network),
        )

    try:
        data = asyncio.run(go())
    except LivegenError as exc:
        assert exc.http_status in (413, 422), exc
        return
    assert url[:5].lower() == "data:" and isinstance(data, bytes)


def _image_bytes(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size, 128 if mode in ("L", "I;16") else (10, 200, 30, 128)[: len(mode)])
    img.save(buf, fmt)
    return buf.getvalue()


SEEDS = [
    _image_bytes("PNG", (7, 5), "RGB"),
    _image_bytes("PNG", (9, 3), "RGBA"),
    _image_bytes("PNG", (4, 4), "L"),
    _image_bytes("JPEG", (16, 8), "RGB"),
    _image_bytes("WEBP", (8, 8), "RGB"),
    _image_bytes("GIF", (4, 4), "L"),
    _image_bytes("BMP", (4, 4), "RGB"),
]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[i:i] = data[i : i + draw(st.integers(1, 32))]
    return bytes(data)


@settings(max_examples=400 * SCALE, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated_images(), st.binary(max_size=64)))
def test_image_decoder_returns_rgb_or_raises_invalid_image(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=64 * 64)
    except InvalidImage as exc:
        assert exc.http_status == 422 and exc.loc == ("body", "image_url")
        return
    assert img.mode == "RGB" and img.width * img.height <= 64 * 64


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = ["prompt", "image_size", "seed", "num_images", "num_inference_steps", "guidance_scale", "image_url"]
FIELDS += ["strength", "format", "sync_mode", "model_name", "image_bytes", "request_id", "preserve_aspect_ratio"]
SIZES = st.one_of(
    st.sampled_from(sorted(IMAGE_SIZE_PRESETS)),
    st.fixed_dictionaries({"width": json_values, "height": json_values}),
    st.fixed_dictionaries({"width": st.integers(-10, 5000), "height": st.integers(-10, 5000)}),
)


@FAST
@given(
    payload=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8),
    size=st.one_of(st.none(), SIZES, json_values),
    seed=st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70), json_values),
    model=st.sampled_from([TurboTextToImage, LcmImageToImage, LcmRealtime]),
)
def test_input_models_validate_or_raise_validation_errors(
    payload: dict[str, Any], size: Any, seed: Any, model: Any
) -> None:
    payload = {"prompt": "p", "image_url": "data:,", **payload}
    if size is not None:
        payload["image_size"] = size
    if seed is not None:
        payload["seed"] = seed
    try:
        body = model.model_validate(payload)
    except ValidationError:
        return
    if body.seed is not None:
        assert 0 <= body.seed <= MAX_SEED
    if body.image_size is not None:
        w, h = resolve_image_size(body.image_size)
        assert MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE and w % 8 == 0 and h % 8 == 0


@FAST
@given(
    input_size=st.tuples(st.integers(1, 100_000), st.integers(1, 100_000)),
    image_size=st.one_of(
        st.none(),
        st.sampled_from(sorted(IMAGE_SIZE_PRESETS)),
        st.builds(
            lambda w, h: ImageSize(width=w * 8, height=h * 8),
            st.integers(MIN_SIDE // 8, MAX_SIDE // 8),
            st.integers(MIN_SIDE // 8, MAX_SIDE // 8),
        ),
    ),
    preserve=st.booleans(),
    crop=st.booleans(),
)
def test_output_size_is_a_servable_size_or_invalid_input(
    input_size: tuple[int, int], image_size: Any, preserve: bool, crop: bool
) -> None:
    try:
        w, h, crop_to = output_size(input_size, image_size, preserve_aspect_ratio=preserve, crop_output=crop)
    except InvalidInput as exc:
        assert exc.http_status == 422
        return
    assert MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE, (w, h)
    assert w % 8 == 0 and h % 8 == 0, (w, h)
    if crop_to is not None:
        assert 0 < crop_to[0] <= w and 0 < crop_to[1] <= h, (crop_to, w, h)


def test_largest_seed_with_several_images(fuzz_server: LiveServer) -> None:
    """Image i uses seed + i: the largest seed the schema admits must still work."""
    body = {
        "prompt": "seed",
        "model_name": "stabilityai/sd-turbo",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 1,
        "num_images": 2,
        "seed": MAX_SEED,
    }
    with fuzz_server.client() as client:
        r = client.post("/fal-ai/fast-turbo-diffusion", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["seed"] == MAX_SEED and len(r.json()["images"]) == 2
        queued = client.post("/queue/fal-ai/fast-turbo-diffusion", json=body)
        assert queued.status_code == 200, queued.text


# -- realtime frames ------------------------------------------------------------------------------

BASE_FRAME = {
    "prompt": "fuzz",
    "model_name": "stabilityai/sd-turbo",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 2,  # image-to-image runs int(steps * strength) steps: at least 1
}
FRAME_VALUES = st.recursive(  # what msgpack can carry (integers from -2**63 to 2**64 - 1)
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
VALID_OVERRIDES = st.fixed_dictionaries(
    {},
    optional={
        "seed": st.integers(0, MAX_SEED),
        "num_images": st.integers(1, 2),
        "format": st.sampled_from(["jpeg", "png"]),
        "strength": st.floats(0.5, 1.0),
        "image_size": st.sampled_from([{"width": 64, "height": 64}, {"width": 128, "height": 64}]),
        "image_url": st.sampled_from([to_data_url(s, "image/png") for s in SEEDS[:3]]),
        "image_bytes": st.sampled_from(SEEDS[3:5]),
        "preserve_aspect_ratio": st.booleans(),
        "crop_output": st.booleans(),
        "request_id": st.text(max_size=20),
        "negative_prompt": st.text(max_size=20),
    },
)
FRAME_OVERRIDES = st.one_of(
    VALID_OVERRIDES,
    st.dictionaries(st.sampled_from(FIELDS + ["strength", "crop_output", "negative_prompt"]), FRAME_VALUES, max_size=3),
    st.fixed_dictionaries({"image_url": st.one_of(data_urls(), st.just(to_data_url(SEEDS[0], "image/png")))}),
    st.fixed_dictionaries({"image_bytes": st.one_of(mutated_images(), st.sampled_from(SEEDS))}),
)


def test_realtime_frames_fuzz(fuzz_server: LiveServer) -> None:
    """Random frames, one at a time: each gets a result or an ``x-fal-error`` other than
    ``INTERNAL_ERROR``, and the session stays open throughout."""
    import json

    import msgpack
    from websockets.sync.client import connect

    r = httpx.post(
        fuzz_server.base_url + "/rest/tokens/",
        json={"allowed_apps": ["fast-turbo-diffusion"], "token_expiration": 600},
        headers={"Authorization": f"Key {fuzz_server.key}"},
    )
    ws_url = f"{fuzz_server.base_url.replace('http', 'ws', 1)}/fal-ai/fast-turbo-diffusion/realtime"
    answers: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    with connect(f"{ws_url}?fal_jwt_token={r.json()}", max_size=None) as ws:

        def answer() -> str:
            while True:
                message = ws.recv(timeout=120)
                if isinstance(message, bytes):
                    return "result"
                control = json.loads(message)
                if control.get("type") == "x-fal-error":
                    reasons[f"{control['error']}: {control.get('reason', '')[:100]}"] += 1
                    return f"{control['error']}"

        @settings(max_examples=60 * SCALE, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(
            frame=st.one_of(
                FRAME_OVERRIDES.map(lambda o: msgpack.packb({**BASE_FRAME, **o}, use_bin_type=True)),
                st.dictionaries(st.text(max_size=8), FRAME_VALUES, max_size=4).map(msgpack.packb),
                FRAME_VALUES.map(msgpack.packb),
                st.binary(max_size=32),
                st.text(max_size=32),
            )
        )
        def one(frame: bytes | str) -> None:
            ws.send(frame)
            got = answer()
            answers[got] += 1
            assert got in ("result", "INVALID_INPUT", "PAYLOAD_TOO_LARGE"), (got, frame[:200])

        one()
        ws.send(msgpack.packb({**BASE_FRAME, "request_id": "last"}, use_bin_type=True))
        assert answer() == "result"
    record("fuzz-realtime", {"answers": dict(answers), "error_reasons": dict(reasons.most_common(15))})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
JSON_OVERRIDES = st.one_of(
    VALID_OVERRIDES.map(lambda o: {k: v for k, v in o.items() if k != "image_bytes"}),  # bytes are not JSON
    st.dictionaries(st.sampled_from(FIELDS + ["strength", "image_url", "sync_mode"]), JSON_VALUES, max_size=3),
    st.fixed_dictionaries({"image_url": st.one_of(data_urls(), st.just(to_data_url(SEEDS[0], "image/png")))}),
)


@pytest.mark.parametrize("endpoint", ["fal-ai/fast-turbo-diffusion", "fal-ai/fast-turbo-diffusion/image-to-image"])
def test_http_over_websocket_fuzz(fuzz_server: LiveServer, endpoint: str) -> None:
    """Random messages on one HTTP-over-WebSocket connection (``WS /{endpoint}``): each gets a
    whole answer (start, body, end, one request id) with a status below 500, and the connection
    stays open throughout."""
    from websockets.sync.client import connect

    statuses: Counter[int] = Counter()
    url = f"{fuzz_server.base_url.replace('http', 'ws', 1)}/{endpoint}"
    with connect(url, additional_headers={"Authorization": f"Key {fuzz_server.key}"}, max_size=None) as ws:

        def answer() -> tuple[int, Any]:
            start, body, end = (json.loads(ws.recv(timeout=120)) for _ in range(3))
            assert (start["type"], end["type"]) == ("start", "end") and start["request_id"] == end["request_id"]
            assert start["status"] == end["status"]
            return start["status"], body

        @settings(max_examples=40 * SCALE, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(
            message=st.one_of(
                JSON_OVERRIDES.map(lambda o: json.dumps({**BASE_FRAME, **o})),
                st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4).map(json.dumps),
                JSON_VALUES.map(json.dumps),
                st.binary(max_size=32),
                st.text(max_size=32),
            )
        )
        def one(message: bytes | str) -> None:
            ws.send(message)
            status, body = answer()
            statuses[status] += 1
            assert 200 <= status < 500, (status, body, message[:200])
            assert ("images" in body) if status == 200 else ("detail" in body), body

        one()
        ws.send(json.dumps({**BASE_FRAME, "image_url": to_data_url(SEEDS[0], "image/png")}))
        assert answer()[0] == 200
    record(f"fuzz-http-over-ws-{endpoint.count('/')}", {"statuses": dict(statuses)})
