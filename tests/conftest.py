"""Shared fixtures: one real ``livegen serve --weights tiny-random`` process on loopback.

The server runs as a subprocess exactly as a user starts it, so the tests exercise the CLI,
settings, lifespan, uvicorn, the engine thread and real (tiny, random) diffusers pipelines.
"""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from livegen.bench import free_port

if TYPE_CHECKING:
    import torch

API_KEY = "test-key-0123456789"
ALL_MODELS = (
    "stabilityai/sd-turbo,stabilityai/sdxl-turbo,"
    "runwayml/stable-diffusion-v1-5,stabilityai/stable-diffusion-xl-base-1.0"
)


@dataclass
class LiveServer:
    base_url: str
    key: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Key {self.key}"},
            timeout=120,
            **kwargs,  # type: ignore[arg-type]
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    synth_from: Path | None = None,
    port: int | None = None,
) -> LiveServer:
    """``livegen serve`` on loopback. ``synth_from``: reuse another data dir's synthesized
    checkpoints (a symlink), so each server does not build its own."""
    port = port or free_port()
    log_path = data_dir / f"server-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    if synth_from is not None and not (data_dir / "synth").exists():
        (synth_from / "synth").mkdir(parents=True, exist_ok=True)
        (data_dir / "synth").symlink_to(synth_from / "synth")
    full_env = {**os.environ, "LIVEGEN_API_KEYS": API_KEY, "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "livegen", "serve", "--port", str(port), "--data-dir", str(data_dir), *args]
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = LiveServer(f"http://127.0.0.1:{port}", API_KEY, data_dir, log_path, process)
    if wait_ready:
        wait_until_ready(server)
    return server


def wait_until_ready(server: LiveServer, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"livegen serve exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.base_url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"livegen serve not ready after {timeout} s:\n{server.log()[-4000:]}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("livegen-data")


@pytest.fixture(scope="session")
def live_server(shared_data_dir: Path) -> Iterator[LiveServer]:
    server = start_server(shared_data_dir, "--weights", "tiny-random", "--device", "cpu", "--models", ALL_MODELS)
    yield server
    stop_server(server)


def png_bytes(width: int = 512, height: int = 512, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    img = Image.new("RGB", (width, height), color)
    for x in range(0, width, 16):  # some structure, so image-to-image has something to keep
        for y in range(0, height, 64):
            img.putpixel((x, y), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def decode_data_url(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header[:40]
    return header[5:-7], base64.b64decode(payload)


@pytest.fixture
def counted_compile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch.compile replaced by a wrapper that counts the calls of what it "compiled" (one
    element: the count). Inductor on a CPU takes minutes per shape; tests that use this check
    which code runs, not what inductor makes of it."""
    import torch

    calls = [0]

    def counting_compile(fn: Any, **_: Any) -> Any:
        def compiled(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return fn(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", counting_compile)
    return calls


class Clock:
    """A clock the test sets: ``now`` is what it tells the code under test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ---- checkpoints in the layouts the hub has ----

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def copy_checkpoint(src: Path, dest: Path) -> Path:
    """A copy of a synthesized checkpoint folder, without livegen's completion marker."""
    from livegen.engine import synth

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(synth.MARKER))
    return dest


def write_fp16_files(component: Path, *, keep_plain: bool, offset: float = 0.0) -> dict[str, torch.Tensor]:
    """Save ``component``'s weights as its ``fp16`` variant file (``name.fp16.safetensors``, what
    ``save_pretrained(variant="fp16")`` writes), each shifted by ``offset`` so that a test can tell
    which file was read; drop the plain file unless ``keep_plain``. Returns the fp16 weights."""
    from safetensors.torch import load_file, save_file

    (plain,) = [component / f for f in WEIGHT_FILES if (component / f).exists()]
    weights = {k: (v + offset).half() if v.is_floating_point() else v for k, v in load_file(plain).items()}
    stem = plain.name.removesuffix(".safetensors")
    save_file(weights, component / f"{stem}.fp16.safetensors", metadata={"format": "pt"})
    if not keep_plain:
        plain.unlink()
    return weights


def hub_cache(root: Path, repo_id: str, checkpoint: Path) -> Path:
    """``checkpoint`` as the hub cache holds a downloaded repository (refs/main -> a snapshot)."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    copy_checkpoint(checkpoint, repo / "snapshots" / revision)
    return root


# ---- TLS ----


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "livegen test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def wait_ready_tls(server: LiveServer, base: str, cert: Path) -> None:
    """``wait_until_ready`` for a server started with ``--ssl-certfile``: https, trusting ``cert``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log()[-3000:]
        try:
            if httpx.get(base + "/readyz", verify=str(cert), timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"not ready over https:\n{server.log()[-3000:]}")
