"""Stored files never leave the data dir, whatever names and paths a client sends.

Canary files are planted beside the data dir and inside it (outside ``files/``). Traversal
attempts (``../``, absolute paths, NUL, ``%2e%2e``, double encoding, backslashes, very long
names) go into upload names (signed uploads, multipart, the CDN ``X-Fal-File-Name`` header)
and into the raw request targets of ``GET /cdn/...``, ``PUT /cdn/uploads/...`` and
``/static/...``, sent byte for byte over a socket so no client normalises them first. Then:
no answer is a 5xx or carries a canary's or the server's secrets' bytes, the canaries are
unchanged, nothing new appears beside the data dir, and every file the server created inside
it has a name the server chose. Served files carry their exact content type, ``nosniff`` and
a sandboxing Content-Security-Policy (they share an origin with the playground).
"""

from __future__ import annotations

import re
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.conftest import LiveServer, data_url, png_bytes

SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
TOKEN = secrets.token_hex(16)  # written into every canary; must never come back


@dataclass(frozen=True)
class Canary:
    path: Path
    content: bytes
    mtime_ns: int


@pytest.fixture(scope="module")
def canaries(live_server: LiveServer) -> Iterator[list[Canary]]:
    planted = []
    for path in (
        live_server.data_dir.parent / "canary.txt",
        live_server.data_dir / "canary.txt",
        live_server.data_dir / "files" / ".." / "canary-files.txt",
    ):
        content = f"canary {TOKEN}\n".encode()
        path.write_bytes(content)
        planted.append(Canary(path.resolve(), content, path.stat().st_mtime_ns))
    yield planted
    for canary in planted:
        canary.path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def secrets_on_disk(live_server: LiveServer) -> list[bytes]:
    """Bytes of files the server keeps for itself, which must never be served."""
    found = [live_server.data_dir / "secret.key", live_server.data_dir / "webhook-ed25519.pem"]
    return [p.read_bytes() for p in found if p.is_file() and p.stat().st_size >= 16]


def beside(server: LiveServer) -> set[str]:
    """The entries next to the data dir (not recursive: sibling test dirs are not ours to read)."""
    return {p.name for p in server.data_dir.parent.iterdir()}


def top_level(server: LiveServer) -> set[str]:
    return {p.name for p in server.data_dir.iterdir()}


def raw(
    server: LiveServer, method: str, target: bytes, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, bytes]:
    """One request with ``target`` sent exactly as given; (status, whole answer)."""
    u = urlsplit(server.base_url)
    assert u.hostname is not None and u.port is not None
    lines = [f"Host: {u.netloc}", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = method.encode() + b" " + target + b" HTTP/1.1\r\n" + "\r\n".join(lines).encode() + b"\r\n\r\n" + body
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def initiate(
    http: httpx.Client, file_name: str, content_type: str = "text/plain", multipart: bool = False
) -> dict[str, Any]:
    path = "/rest/storage/upload/initiate-multipart" if multipart else "/rest/storage/upload/initiate"
    response = http.post(
        path, params={"storage_type": "fal-cdn-v3"}, json={"file_name": file_name, "content_type": content_type}
    )
    assert response.status_code == 200, response.text[:300]
    target: dict[str, Any] = response.json()
    return target


def cdn_token(http: httpx.Client) -> str:
    token = http.post("/rest/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}).json()
    return f"{token['token_type']} {token['token']}"


def check_untouched(server: LiveServer, canaries: list[Canary], before: tuple[set[str], set[str]]) -> None:
    """The canaries are as planted, nothing appeared beside the data dir, and nothing but
    SQLite's own side files appeared at its top level."""
    for canary in canaries:
        assert canary.path.read_bytes() == canary.content, canary.path
        assert canary.path.stat().st_mtime_ns == canary.mtime_ns, canary.path
    assert beside(server) <= before[0], beside(server) - before[0]
    new = {n for n in top_level(server) - before[1] if not re.fullmatch(r"livegen\.sqlite3-(wal|shm|journal)", n)}
    assert new == set(), new


def snapshot(server: LiveServer) -> tuple[set[str], set[str]]:
    return beside(server), top_level(server)


def check_created_names(server: LiveServer) -> list[str]:
    """Everything under files/ and uploads/ has a name the server made; the list of them."""
    created = []
    for entry in (server.data_dir / "files").iterdir():
        assert re.fullmatch(r"[0-9a-f]{32}(\.tmp)?", entry.name), entry
        created.append(f"files/{entry.name}")
    staging = server.data_dir / "uploads"
    for entry in staging.rglob("*"):
        name = str(entry.relative_to(staging))
        upload = r"(direct-[0-9a-f]{16}|[A-Za-z0-9_-]{32}(\.[0-9a-f]{16})?)(\.tmp)?"
        assert re.fullmatch(upload + r"(/\d+\.[0-9a-f]+(\.tmp)?)?", name), name
        created.append(f"uploads/{name}")
    return created


# -- names in uploads ------------------------------------------------------------------------------------

NAMES = [
    "../canary.txt",
    "../../canary.txt",
    "../files/../../canary.txt",
    "/etc/passwd",
    "ABSOLUTE",  # replaced by the canary's absolute path
    "..\\..\\canary.txt",
    "C:\\Windows\\win.ini",
    "%2e%2e%2fcanary.txt",
    "%252e%252e%252fcanary.txt",
    "..%c0%afcanary.txt",
    "x\x00y.png",
    ".",
    "..",
    "./.",
    "…/‥/canary.txt",
    "n" * 5000 + ".png",
    "",
]


@pytest.mark.parametrize("name", NAMES, ids=[repr(n[:30]) for n in NAMES])
def test_upload_names_never_escape(
    http: httpx.Client, live_server: LiveServer, canaries: list[Canary], secrets_on_disk: list[bytes], name: str
) -> None:
    if name == "ABSOLUTE":
        name = str(canaries[0].path)
    before = snapshot(live_server)
    payload = f"PWNED {TOKEN} {name[:40]!r}".encode()
    anon = httpx.Client(base_url=live_server.base_url, timeout=60)

    single = initiate(http, name)
    assert anon.put(single["upload_url"], content=payload).status_code == 200
    multi = initiate(http, name, multipart=True)
    part = anon.put(multi["upload_url"] + "/1", content=payload)
    assert part.status_code == 200
    done = anon.post(
        multi["upload_url"] + "/complete", json={"parts": [{"partNumber": 1, "etag": part.json()["etag"]}]}
    )
    assert done.status_code == 200
    urls = [single["file_url"], multi["file_url"]]
    if "\x00" not in name:  # a NUL cannot travel in a header
        # As UTF-8 bytes: httpx would refuse a non-ASCII str header value.
        headers = {
            b"Authorization": cdn_token(http).encode(),
            b"Content-Type": b"text/plain",
            b"X-Fal-File-Name": name.encode(),
        }
        direct = anon.post("/cdn/files/upload", content=payload, headers=headers)
        assert direct.status_code == 200, direct.text[:300]
        urls.append(direct.json()["access_url"])

    for url in urls:
        assert SAFE_NAME.match(url.rsplit("/", 1)[1]), url
        served = anon.get(url)
        assert served.status_code == 200 and served.content == payload
        assert served.headers["content-type"] == "text/plain"
    anon.close()
    check_untouched(live_server, canaries, before)
    check_created_names(live_server)


# -- paths in requests ---------------------------------------------------------------------------------------


def traversal_targets(canary: Path, file_id: str) -> list[bytes]:
    absolute = str(canary).encode()
    return [
        b"/cdn/files/../../canary.txt",
        b"/cdn/files/../canary.txt",
        b"/cdn/files/..%2f..%2fcanary.txt/x",
        b"/cdn/files/..%2F..%2Fsecret.key/x",
        b"/cdn/files/%2e%2e/%2e%2e/canary.txt",
        b"/cdn/files/%2e%2e%2f%2e%2e%2fcanary.txt/x",
        b"/cdn/files/%252e%252e%252fcanary.txt/x",
        b"/cdn/files/..\\..\\canary.txt/x",
        b"/cdn/files/..%5c..%5ccanary.txt/x",
        b"/cdn/files/" + file_id.encode() + b"/..%2f..%2f..%2fsecret.key",
        b"/cdn/files/" + file_id.encode() + b"/../../secret.key",
        b"/cdn/files/" + file_id.encode() + b"%00/x",
        b"/cdn/files/" + file_id.encode() + b"%2500/x",
        b"/cdn/files/" + file_id.encode() + b"/x%00.png",
        b"/cdn/files/" + quote(str(canary), safe="").encode() + b"/x",
        b"/cdn/files/" + absolute + b"/x",
        b"/cdn/files//etc/passwd",
        b"/cdn/files/%2fetc%2fpasswd/x",
        b"/cdn/files/" + b"a" * 5000 + b"/x",
        b"/cdn/files/" + b"%2e%2e%2f" * 500 + b"canary.txt/x",
        b"/cdn/files/livegen.sqlite3/x",
        b"/cdn/files/" + file_id.encode().upper() + b"/x",
        b"/cdn/..%2fsecret.key",
        b"/cdn/uploads/..%2f..%2fcanary.txt",
        b"/static/..%2f..%2fsecret.key",
        b"/static/%2e%2e%2fcli.py",
        b"/static/../settings.py",
        b"/static/..\\cli.py",
        b"/../../canary.txt",
        b"/%2e%2e/%2e%2e/canary.txt",
        b"//canary.txt",
        b"http://127.0.0.1/../canary.txt",
    ]


def test_paths_never_escape(
    http: httpx.Client, live_server: LiveServer, canaries: list[Canary], secrets_on_disk: list[bytes]
) -> None:
    png = png_bytes(64, 64)
    stored = http.post(
        "/fal-ai/fast-turbo-diffusion/image-to-image",
        json={"prompt": "x", "model_name": "stabilityai/sd-turbo", "num_inference_steps": 1, "strength": 1.0,
              "image_url": data_url(png), "sync_mode": False},
    )  # fmt: skip
    assert stored.status_code == 200, stored.text[:300]
    file_url = stored.json()["images"][0]["url"]
    file_id = urlsplit(file_url).path.split("/")[3]
    genuine = httpx.get(file_url).content
    legit_prefix = f"/cdn/files/{file_id}/".encode()
    before = snapshot(live_server)
    statuses: dict[int, int] = {}
    for target in traversal_targets(canaries[0].path, file_id):
        for method in ("GET", "HEAD"):
            status, answer = raw(live_server, method, target)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200 and target.startswith(legit_prefix):  # the name only decorates the URL
                assert answer.partition(b"\r\n\r\n")[2] in (genuine, b""), target[:80]
            else:
                assert 400 <= status < 500, (method, target[:80], answer[:300])
            assert TOKEN.encode() not in answer, target[:80]
            assert not any(secret in answer for secret in secrets_on_disk), target[:80]
        # Writes: a PUT or POST to the same path must not create or overwrite anything.
        for method in ("PUT", "POST"):
            status, answer = raw(live_server, method, target, {"Content-Type": "text/plain"}, f"PWNED {TOKEN}".encode())
            statuses[status] = statuses.get(status, 0) + 1
            assert 400 <= status < 500, (method, target[:80], answer[:300])
    check_untouched(live_server, canaries, before)
    created = check_created_names(live_server)
    print(f"\ntraversal targets: {len(traversal_targets(canaries[0].path, file_id))} × GET/HEAD/PUT/POST; "
          f"statuses {dict(sorted(statuses.items()))}; server-created entries: {len(created)}")  # fmt: skip


# -- what served files look like ------------------------------------------------------------------------------

CONTENT_TYPES = [
    "image/png",
    "image/jpeg",
    "text/plain",
    "text/html",
    "image/svg+xml",
    "application/json",
    "text/plain; charset=iso-8859-1",
    "application/octet-stream",
    "application/x-custom+weird",
]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_served_files_have_the_exact_type_nosniff_and_a_sandbox(http: httpx.Client, content_type: str) -> None:
    body = b"<html><script>alert(document.domain)</script></html>"
    target = initiate(http, "f.bin", content_type=content_type)
    assert httpx.put(target["upload_url"], content=body).status_code == 200
    for method in ("GET", "HEAD"):
        served = httpx.request(method, target["file_url"])
        assert served.status_code == 200
        assert served.headers["content-type"] == content_type
        assert served.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in served.headers["content-security-policy"]
        assert served.headers["content-length"] == str(len(body))
        if method == "GET":
            assert served.content == body


def test_generated_files_have_the_exact_type_nosniff_and_a_sandbox(http: httpx.Client) -> None:
    for fmt, content_type in (("jpeg", "image/jpeg"), ("png", "image/png")):
        result = http.post(
            "/fal-ai/fast-turbo-diffusion",
            json={"prompt": "x", "model_name": "stabilityai/sd-turbo", "num_inference_steps": 1,
                  "image_size": {"width": 64, "height": 64}, "sync_mode": False, "format": fmt},
        )  # fmt: skip
        assert result.status_code == 200, result.text[:300]
        image = result.json()["images"][0]
        served = httpx.get(image["url"])
        assert served.headers["content-type"] == content_type == image["content_type"]
        assert served.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in served.headers["content-security-policy"]
        assert len(served.content) == image["file_size"]
