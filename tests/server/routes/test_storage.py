"""Storage routes over real HTTP (PROTOCOL.md §9): what the JS client sends (it has no Python
test harness here), the CDN token rules, size caps, ids and names. fal-client itself is driven
in ``tests/compat/test_fal_client_storage.py``."""

from __future__ import annotations

import os
import random
import re
import secrets
import select
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import LiveServer, start_server, stop_server

SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
SMALL_CAP = 1_000_000


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def anon(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("small-cap"),
        "--weights",
        "tiny-random",
        "--models",
        "",
        env={"LIVEGEN_MAX_UPLOAD_BYTES": str(SMALL_CAP)},
    )
    yield server
    stop_server(server)


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


def refused(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["x-fal-error-type"] == error_type
    if status != 422:
        assert response.json()["error_type"] == error_type


def initiate(http: httpx.Client, *, multipart: bool = False, **body: Any) -> dict[str, Any]:
    path = "/rest/storage/upload/initiate-multipart" if multipart else "/rest/storage/upload/initiate"
    return ok(http.post(path, params={"storage_type": "fal-cdn-v3"}, json=body))


def js_url(upload_url: str, suffix: str) -> str:
    """What @fal-ai/client 1.10.1 builds: ``{origin}{pathname}/{suffix}{search}``."""
    u = urlsplit(upload_url)
    return f"{u.scheme}://{u.netloc}{u.path}/{suffix}" + (f"?{u.query}" if u.query else "")


def cdn_headers(http: httpx.Client, **extra: str) -> dict[str, str]:
    token = ok(http.post("/rest/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}))
    return {"Authorization": f"{token['token_type']} {token['token']}", **extra}


def download(url: str) -> httpx.Response:
    response = httpx.get(url)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["x-content-type-options"] == "nosniff"
    return response


# -- CDN token and the Python fal_v3 routes ---------------------------------------------------


def test_cdn_token(http: httpx.Client, live_server: LiveServer) -> None:
    body = ok(http.post("/rest/storage/auth/token?storage_type=fal-cdn-v3", json={}))
    assert body["token_type"] == "Bearer"
    assert body["base_url"] == live_server.base_url + "/cdn"
    expires = datetime.fromisoformat(body["expires_at"])
    assert body["expires_at"].endswith("+00:00") and expires.utcoffset() is not None
    assert 0 < (expires - datetime.now(UTC)).total_seconds() <= 3600


def realtime_token(http: httpx.Client) -> str:
    response = http.post("/rest/tokens/", json={"allowed_apps": ["fast-turbo-diffusion"]})
    token: str = ok(response)  # type: ignore[assignment]
    return token


@pytest.mark.parametrize("kind", ["none", "garbage", "api-key", "realtime-token", "key-scheme-with-token"])
def test_cdn_upload_needs_a_cdn_token(
    http: httpx.Client, anon: httpx.Client, live_server: LiveServer, kind: str
) -> None:
    cdn_token = cdn_headers(http)["Authorization"].split(" ", 1)[1]
    authorization = {
        "none": None,
        "garbage": "Bearer not.a.token",
        "api-key": f"Key {live_server.key}",
        "realtime-token": f"Bearer {realtime_token(http)}",  # right scheme, wrong audience
        "key-scheme-with-token": f"Key {cdn_token}",
    }[kind]
    headers = {"Authorization": authorization} if authorization else {}
    refused(anon.post("/cdn/files/upload", content=b"x", headers=headers), 401, "unauthorized")
    refused(anon.post("/cdn/files/upload/multipart", headers=headers), 401, "unauthorized")


@pytest.mark.parametrize(
    "path",
    ["/rest/storage/auth/token", "/rest/storage/upload/initiate", "/rest/storage/upload/initiate-multipart"],
)
@pytest.mark.parametrize("authorization", [None, "Key wrong-key", "Bearer x"])
def test_storage_rest_routes_need_a_key(anon: httpx.Client, path: str, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    body = {"file_name": "a.png", "content_type": "image/png"}
    refused(anon.post(path, json=body, headers=headers), 401, "unauthorized")


def test_python_multipart_by_hand(http: httpx.Client, anon: httpx.Client) -> None:
    headers = cdn_headers(http)
    created = ok(
        anon.post(
            "/cdn/files/upload/multipart",
            headers={**headers, "Content-Type": "audio/wav", "X-Fal-File-Name": "take 1.wav"},
        )
    )
    access_url, upload_id = created["access_url"], created["uploadId"]
    assert access_url.endswith("/take_1.wav")
    refused(anon.get(access_url), 404, "not_found")  # not before complete
    chunks = [os.urandom(300_000), os.urandom(5)]
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        response = anon.put(f"{access_url}/multipart/{upload_id}/{n}", content=chunk, headers=headers)
        assert response.status_code == 200, response.text
        parts.append({"partNumber": n, "etag": response.headers["etag"]})  # what fal-client reads
    refused(anon.put(f"{access_url}/multipart/{upload_id}/3", content=b"x"), 401, "unauthorized")
    other_file = access_url.replace(access_url.split("/")[-2], secrets.token_hex(16))
    refused(
        anon.post(f"{other_file}/multipart/{upload_id}/complete", json={"parts": parts}, headers=headers),
        404,
        "not_found",
    )
    done = ok(anon.post(f"{access_url}/multipart/{upload_id}/complete", json={"parts": parts[::-1]}, headers=headers))
    assert done["access_url"] == access_url
    response = download(access_url)
    assert response.content == b"".join(chunks)
    assert response.headers["content-type"] == "audio/wav"


# -- the JS client's flavours -----------------------------------------------------------------


@pytest.mark.parametrize("authorization", ["none", "key"])
def test_signed_upload(http: httpx.Client, anon: httpx.Client, live_server: LiveServer, authorization: str) -> None:
    # JS: initiate with fal-cdn-v3, then a PUT with no auth. Python's "fal" repository sends its key.
    target = initiate(http, file_name="photo.webp", content_type="image/webp")
    assert target["file_url"].startswith(live_server.base_url + "/cdn/files/")
    assert target["file_url"].endswith("/photo.webp")
    data = os.urandom(100_000)
    headers = {"Content-Type": "image/webp"}
    if authorization == "key":
        headers["Authorization"] = f"Key {live_server.key}"
    assert anon.put(target["upload_url"], content=data, headers=headers).status_code == 200
    response = download(target["file_url"])
    assert response.content == data
    assert response.headers["content-type"] == "image/webp"
    # the upload URL was for one upload: a second PUT is refused (not with 409, which fal-client retries)
    refused(anon.put(target["upload_url"], content=b"other", headers=headers), 404, "not_found")
    assert download(target["file_url"]).content == data


def test_signed_upload_defaults_and_initiate_checks(http: httpx.Client, anon: httpx.Client) -> None:
    target = initiate(http, file_name="blob", content_type=None)  # JS may send null
    assert anon.put(target["upload_url"], content=b"\x00\x01").status_code == 200
    assert download(target["file_url"]).headers["content-type"] == "application/octet-stream"
    refused(
        http.post("/rest/storage/upload/initiate", json={"file_name": "a", "content_type": "text/plain\r\nX-A: 1"}),
        422,
        "invalid_input",
    )
    response = http.post("/rest/storage/upload/initiate?storage_type=s3", json={"file_name": "a"})
    assert response.status_code == 422


@pytest.mark.parametrize("query", ["", "?X-Goog-Signature=abc&expires=123"])
def test_js_multipart_upload(http: httpx.Client, anon: httpx.Client, query: str) -> None:
    target = initiate(http, multipart=True, file_name="movie.mp4", content_type="video/mp4")
    upload_url = target["upload_url"] + query  # a query string on upload_url is re-appended by JS
    chunks = [os.urandom(200_000), os.urandom(200_000), os.urandom(1234)]
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        response = anon.put(js_url(upload_url, str(n)), content=chunk)  # no auth, no content type
        part = ok(response)
        assert part["partNumber"] == n
        assert response.headers["etag"] == f'"{part["etag"]}"'
        parts.append(part)
    random.Random(1).shuffle(parts)
    done = ok(anon.post(js_url(upload_url, "complete"), json={"parts": parts}))
    assert done["file_url"] == target["file_url"]
    response = download(target["file_url"])
    assert response.content == b"".join(chunks)
    assert response.headers["content-type"] == "video/mp4"
    # completing again (a retried request) answers the same file; more parts are refused
    assert ok(anon.post(js_url(upload_url, "complete"), json={"parts": parts}))["file_url"] == target["file_url"]
    refused(anon.put(js_url(upload_url, "4"), content=b"late"), 404, "not_found")


def test_multipart_complete_checks_the_parts(http: httpx.Client, anon: httpx.Client) -> None:
    target = initiate(http, multipart=True, file_name="x.bin", content_type="application/octet-stream")
    url = target["upload_url"]
    first = ok(anon.put(js_url(url, "1"), content=b"one"))
    second = ok(anon.put(js_url(url, "2"), content=b"two"))
    wrong_etag = {"partNumber": 2, "etag": first["etag"]}
    for parts in (
        [first, wrong_etag],  # an ETag of another part
        [first, {"partNumber": 3, "etag": second["etag"]}],  # a part never uploaded
        [first, first],  # listed twice
        [first, {"partNumber": 2, "etag": "../../../etc/passwd"}],  # not an ETag
        [],
    ):
        response = anon.post(js_url(url, "complete"), json={"parts": parts})
        assert response.status_code == 422, (parts, response.text)
    refused(anon.put(js_url(url, "0"), content=b"x"), 422, "invalid_input")
    # a part uploaded again replaces the earlier one; the failures above left the upload open
    again = ok(anon.put(js_url(url, "2"), content=b"TWO"))
    ok(anon.post(js_url(url, "complete"), json={"parts": [first, again]}))
    assert download(target["file_url"]).content == b"oneTWO"


# -- ids and names ----------------------------------------------------------------------------


def test_unknown_ids_are_404(http: httpx.Client, anon: httpx.Client, live_server: LiveServer) -> None:
    unknown = secrets.token_urlsafe(24)
    single = initiate(http, file_name="a")["upload_url"]
    multi = initiate(http, multipart=True, file_name="b")["upload_url"]
    for response in (
        anon.put(f"/cdn/uploads/{unknown}", content=b"x"),
        anon.put("/cdn/uploads/short", content=b"x"),
        anon.put(f"/cdn/uploads/{unknown}/1", content=b"x"),
        anon.post(f"/cdn/uploads/{unknown}/complete", json={"parts": [{"partNumber": 1, "etag": "0" * 32}]}),
        anon.put(js_url(single, "1"), content=b"x"),  # a one-shot upload has no parts
        anon.put(multi, content=b"x"),  # a multipart upload takes parts only
        anon.get(f"/cdn/files/{secrets.token_hex(16)}/a.png"),
        anon.get("/cdn/files/not-an-id/a.png"),
    ):
        refused(response, 404, "not_found")
    # an encoded traversal matches no route at all
    assert anon.get("/cdn/files/..%2F..%2Fsecret.key/x").status_code == 404


NAMES = ["../../etc/passwd", "a/b", "..", ".", ".hidden", "x\x00y.png", "ünïcødé name.txt", "n" * 5000 + ".png", ""]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_names_are_stored_safely(http: httpx.Client, anon: httpx.Client, live_server: LiveServer, name: str) -> None:
    target = initiate(http, file_name=name, content_type="text/plain")
    served_name = target["file_url"].rsplit("/", 1)[1]
    assert SAFE_NAME.match(served_name), served_name
    assert anon.put(target["upload_url"], content=name.encode()).status_code == 200
    response = download(target["file_url"])
    assert response.content == name.encode()
    assert response.headers["content-type"] == "text/plain"
    assert_nothing_named_by_the_client(live_server.data_dir)


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", "%2e%2e%2f"])
def test_cdn_file_name_header_is_stored_safely(http: httpx.Client, anon: httpx.Client, name: str) -> None:
    headers = cdn_headers(http, **{"X-Fal-File-Name": name, "Content-Type": "text/plain"})
    url = ok(anon.post("/cdn/files/upload", content=b"safe", headers=headers))["access_url"]
    assert SAFE_NAME.match(url.rsplit("/", 1)[1])
    assert download(url).content == b"safe"


def assert_nothing_named_by_the_client(data_dir: Path) -> None:
    for entry in (data_dir / "files").iterdir():
        assert re.fullmatch(r"[0-9a-f]{32}(\.tmp)?", entry.name), entry
    assert not list(data_dir.rglob("*passwd*"))


# -- size caps (a server of its own, capped at 1 MB) -------------------------------------------


def test_oversized_bodies_are_413(small_server: LiveServer) -> None:
    with small_server.client() as http, httpx.Client(base_url=small_server.base_url, timeout=60) as anon:
        headers = cdn_headers(http, **{"Content-Type": "application/octet-stream"})
        refused(
            anon.post("/cdn/files/upload", content=b"x" * (SMALL_CAP + 1), headers=headers), 413, "payload_too_large"
        )
        assert anon.post("/cdn/files/upload", content=b"x" * SMALL_CAP, headers=headers).status_code == 200

        target = initiate(http, file_name="big.bin")
        refused(anon.put(target["upload_url"], content=b"x" * (SMALL_CAP + 1)), 413, "payload_too_large")
        assert anon.put(target["upload_url"], content=b"fits").status_code == 200  # still open after a 413

        multi = initiate(http, multipart=True, file_name="parts.bin")["upload_url"]
        refused(anon.put(js_url(multi, "1"), content=b"x" * (SMALL_CAP + 1)), 413, "payload_too_large")
        ok(anon.put(js_url(multi, "1"), content=b"x" * 600_000))
        refused(anon.put(js_url(multi, "2"), content=b"x" * 600_000), 413, "payload_too_large")  # 1.2 MB in all


def raw_put(server: LiveServer, path: str, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, int]:
    """Send a PUT by hand, stopping as soon as the server answers; (status, body bytes sent)."""
    u = urlsplit(server.base_url)
    head = f"PUT {path} HTTP/1.1\r\nHost: {u.netloc}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(head.encode() + b"\r\n")
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0.005)[0]:
                break
            sock.sendall(chunk)
            sent += len(chunk)
        response = sock.recv(65536)
    return int(response.split(b" ", 2)[1]), sent


def test_413_comes_before_the_body_is_read(small_server: LiveServer) -> None:
    with small_server.client() as http:
        one, two = (urlsplit(initiate(http, file_name="x")["upload_url"]).path for _ in range(2))
    # A too-large Content-Length is refused before any of the body is sent.
    status, sent = raw_put(small_server, one, {"Content-Length": str(50 * SMALL_CAP)}, iter(()))
    assert (status, sent) == (413, 0)

    # Without a length (chunked), the answer comes once the cap is passed, long before the end.
    def chunked(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
        for _ in range(total // size):
            yield f"{size:x}\r\n".encode() + b"x" * size + b"\r\n"
        yield b"0\r\n\r\n"

    status, sent = raw_put(small_server, two, {"Transfer-Encoding": "chunked"}, chunked(50 * SMALL_CAP))
    assert status == 413
    assert SMALL_CAP < sent < 10 * SMALL_CAP


def test_an_interrupted_upload_leaves_nothing_behind(small_server: LiveServer) -> None:
    with small_server.client() as http:
        path = urlsplit(initiate(http, file_name="x")["upload_url"]).path
    u = urlsplit(small_server.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: 900000\r\n\r\n".encode())
        sock.sendall(b"x" * 300_000)
        time.sleep(0.3)  # the server has started writing the body to disk
    staging = small_server.data_dir / "uploads"
    deadline = time.monotonic() + 10
    while list(staging.glob("*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(staging.glob("*.tmp"))
    assert "Traceback" not in small_server.log()
    with httpx.Client(base_url=small_server.base_url) as anon:  # the upload is still open
        assert anon.put(path, content=b"complete").status_code == 200
