"""The playground's JavaScript outside the browser: ``node --test tests/web/`` (the msgpack codec
against @msgpack/msgpack, the realtime client with fakes), and the codec against Python's msgpack
and the server's input schema, so browser frames and server results agree byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest

from livegen.protocol.schemas import TurboRealtime

ROOT = Path(__file__).resolve().parents[2]
CODEC = ROOT / "src" / "livegen" / "web" / "msgpack.js"
REFERENCE = ROOT / "tests" / "js" / "node_modules" / "@msgpack" / "msgpack" / "package.json"


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("node (>= 20) is not on PATH; the playground's JS tests need it")
    return path


def run_node_module(code: str, stdin: str = "") -> str:
    proc = subprocess.run(
        [node(), "--input-type=module", "-e", code], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_node_unit_tests() -> None:
    if not REFERENCE.is_file():
        pytest.fail(
            "tests/js/node_modules is missing: run scripts/test, which installs it (or: npm ci --prefix tests/js)"
        )
    proc = subprocess.run(
        [node(), "--test", "--test-reporter=spec", "tests/web/"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-20000:]


def tagged(value: Any) -> Any:
    """JSON for a msgpack value, bytes as {"$bin": hex} (the Node side writes the same)."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: tagged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [tagged(v) for v in value]
    return value


TAG_JS = """
const tag = (v) => v instanceof Uint8Array ? { $bin: Buffer.from(v).toString("hex") }
  : Array.isArray(v) ? v.map(tag)
  : v && typeof v === "object" ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, tag(x)]))
  : typeof v === "bigint" ? { $big: v.toString() } : v;
"""


def test_browser_decodes_what_the_server_sends() -> None:
    output = {  # a realtime result as sessions.py packs it (as_bytes: images[].content)
        "images": [{"content": bytes(range(256)) * 40, "width": 512, "height": 512, "content_type": "image/jpeg"}],
        "timings": {"inference": 0.123456789, "queue": 0.0},
        "seed": 2**62 + 3,
        "has_nsfw_concepts": [False],
        "prompt": "a fox in the snow — ünïcode ✓",
        "request_id": "17",
        "empty": None,
    }
    code = f'import {{ decode }} from "{CODEC.as_uri()}";{TAG_JS}'
    code += (
        'let input = ""; process.stdin.on("data", (d) => (input += d)); process.stdin.on("end", () => '
        'console.log(JSON.stringify(tag(decode(Buffer.from(input, "hex"))))));'
    )
    decoded = json.loads(run_node_module(code, msgpack.packb(output, use_bin_type=True).hex()))
    expected = tagged(output)
    expected["seed"] = {"$big": str(2**62 + 3)}  # beyond 2**53: a BigInt, not a rounded Number
    assert decoded == expected


def test_server_accepts_what_the_browser_sends() -> None:
    code = (
        f'import {{ encode }} from "{CODEC.as_uri()}";'
        "const frame = { prompt: 'a fox ✓', model_name: 'stabilityai/sd-turbo',"
        " image_size: { width: 512, height: 512 }, num_inference_steps: 2, guidance_scale: 1.5,"
        " seed: 4294967296, sync_mode: true, strength: 0.6, request_id: '3',"
        " image_bytes: new Uint8Array([0xff, 0xd8, 0xff, 0xe0]), unset: undefined };"
        'process.stdout.write(Buffer.from(encode(frame)).toString("hex"));'
    )
    payload = msgpack.unpackb(bytes.fromhex(run_node_module(code)), raw=False)
    assert payload == {
        "prompt": "a fox ✓",
        "model_name": "stabilityai/sd-turbo",
        "image_size": {"width": 512, "height": 512},
        "num_inference_steps": 2,
        "guidance_scale": 1.5,
        "seed": 2**32,
        "sync_mode": True,
        "strength": 0.6,
        "request_id": "3",
        "image_bytes": b"\xff\xd8\xff\xe0",
    }
    body = TurboRealtime.model_validate(payload)
    assert body.image_bytes == b"\xff\xd8\xff\xe0" and body.has_image and body.seed == 2**32
