"""Authentication under attack: API keys missing, wrong or revoked on every route; forged,
expired and misdirected realtime/CDN tokens; and sessions that outlive their token.

One dedicated server whose tokens live at most ``TOKEN_TTL_S`` seconds, so the token-expiry
close (1000, "token expired…") happens inside a test, and the official clients are shown to
carry a long session across it: fal-client by reconnecting when ``recv()`` returns None,
@fal-ai/client by itself (a new token and a new socket on its next send, no ``onError``).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import inspect
import itertools
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client as fcc
import httpx
import jwt
import msgpack
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import SecretStr
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

import livegen.server.auth as auth_module
from livegen.cli import main
from livegen.client import point_fal_client
from livegen.protocol.errors import Unauthorized
from livegen.server.auth import KeyStore
from livegen.server.db import Database
from livegen.server.tokens import CDN, REALTIME
from tests.conftest import LiveServer, start_server, stop_server
from tests.server.routes.test_realtime import recv_result

TURBO = "fal-ai/fast-turbo-diffusion"
LCM = "fal-ai/fast-lcm-diffusion"
SMALL = {"model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}
TOKEN_TTL_S = 8  # the server's cap; clients ask for 120 s and get this (long enough for a frame on a busy CPU)
ROOT = Path(__file__).resolve().parents[2]


def _create_key(data_dir: Path, name: str) -> str:
    created = CliRunner().invoke(main, ["keys", "create", "--name", name, "--data-dir", str(data_dir)])
    assert created.exit_code == 0, created.output
    return created.stdout.strip().splitlines()[0]


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth-server")


@pytest.fixture(scope="module")
def managed(keys_dir: Path) -> dict[str, str]:
    """Managed keys made before the server starts: ``kept`` stays valid, the others get revoked."""
    return {name: _create_key(keys_dir, name) for name in ("kept", "revoked", "revoked-with-tokens")}


@pytest.fixture(scope="module")
def server(keys_dir: Path, managed: dict[str, str], shared_data_dir: Path) -> Iterator[LiveServer]:
    srv = start_server(
        keys_dir,
        "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo",
        # One torch thread: on a shared, busy CPU an oversubscribed thread pool makes frame times erratic.
        env={"LIVEGEN_MAX_TOKEN_TTL_S": str(TOKEN_TTL_S), "LIVEGEN_SESSION_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"},
        synth_from=shared_data_dir,
    )  # fmt: skip
    # Warm up (the first frame of a size is slow), so the first session does not spend its token on it.
    warm = httpx.post(
        srv.base_url + f"/{TURBO}",
        json={"prompt": "warm", **SMALL},
        headers={"Authorization": f"Key {srv.key}"},
        timeout=120,
    )
    assert warm.status_code == 200, warm.text
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def revoked_key(server: LiveServer, keys_dir: Path, managed: dict[str, str]) -> str:
    """Revoked with ``livegen keys revoke`` while the server runs (it shares the database)."""
    key = managed["revoked"]
    headers = {"Authorization": f"Key {key}"}
    assert httpx.post(server.base_url + f"/{TURBO}", json={}, headers=headers).status_code == 422  # works now
    result = CliRunner().invoke(main, ["keys", "revoke", key.split(":")[0], "--data-dir", str(keys_dir)])
    assert result.exit_code == 0, result.output
    return key


def ws_url(server: LiveServer, app: str = TURBO, **query: str) -> str:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{server.base_url.replace('http', 'ws', 1)}/{app}/realtime" + (f"?{qs}" if qs else "")


def realtime_token(server: LiveServer, key: str, *apps: str) -> str:
    r = httpx.post(
        server.base_url + "/rest/tokens/",
        json={"allowed_apps": list(apps) or ["fast-turbo-diffusion"], "token_expiration": 120},
        headers={"Authorization": f"Key {key}"},
    )
    assert r.status_code == 200, r.text
    token: str = r.json()
    return token


def cdn_token(server: LiveServer, key: str) -> str:
    r = httpx.post(
        server.base_url + "/rest/storage/auth/token?storage_type=fal-cdn-v3",
        json={},
        headers={"Authorization": f"Key {key}"},
    )
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    return token


def refusal(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """The HTTP answer to a WebSocket handshake that must not be accepted."""
    with pytest.raises(InvalidStatus) as info:
        connect(url, **kwargs).close()
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}")


# --- API keys on every route ---------------------------------------------------------------------


def _routes(request_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    queued = f"/queue/{TURBO}/requests/{request_id}"
    return [
        ("POST", f"/{TURBO}", {"prompt": "x", **SMALL}),
        ("POST", f"/{TURBO}/image-to-image", {"prompt": "x", **SMALL}),
        ("POST", f"/{TURBO}/stream", {"prompt": "x", **SMALL}),
        ("POST", f"/queue/{TURBO}", {"prompt": "x", **SMALL}),
        ("GET", f"{queued}/status", None),
        ("GET", f"{queued}/status/stream", None),
        ("GET", queued, None),
        ("PUT", f"{queued}/cancel", None),
        ("POST", "/rest/tokens/", {"allowed_apps": ["fast-turbo-diffusion"]}),
        ("POST", "/rest/storage/auth/token?storage_type=fal-cdn-v3", {}),
        ("POST", "/rest/storage/upload/initiate", {"file_name": "a.png", "content_type": "image/png"}),
        ("POST", "/rest/storage/upload/initiate-multipart", {"file_name": "a.png", "content_type": "image/png"}),
    ]


def _bad_credentials(server: LiveServer, managed: dict[str, str], revoked: str) -> dict[str, dict[str, str]]:
    kept = managed["kept"]
    key_id = kept.split(":")[0]
    return {
        "missing": {},
        "empty": {"Authorization": ""},
        "scheme only": {"Authorization": "Key"},
        "wrong key": {"Authorization": "Key wrong"},
        "static key plus a character": {"Authorization": f"Key {server.key}x"},
        "static key minus a character": {"Authorization": f"Key {server.key[:-1]}"},
        "right id, wrong secret": {"Authorization": f"Key {key_id}:{secrets.token_urlsafe(32)}"},
        "right id, no secret": {"Authorization": f"Key {key_id}:"},
        "revoked key": {"Authorization": f"Key {revoked}"},
        "valid key as Bearer": {"Authorization": f"Bearer {kept}"},
        "valid key without scheme": {"Authorization": kept},
        "realtime token as key": {"Authorization": f"Key {realtime_token(server, kept)}"},
        "CDN token as Bearer on the API": {"Authorization": f"Bearer {cdn_token(server, kept)}"},
    }


def test_bad_api_keys_are_401_in_fals_shape_on_every_route(
    server: LiveServer, managed: dict[str, str], revoked_key: str
) -> None:
    # A real job, so the queue routes would have something to show a wrong key.
    good = {"Authorization": f"Key {managed['kept']}"}
    submitted = httpx.post(server.base_url + f"/queue/{TURBO}", json={"prompt": "x", **SMALL}, headers=good)
    assert submitted.status_code == 200, submitted.text
    routes = _routes(submitted.json()["request_id"])
    checked = 0
    for case, headers in _bad_credentials(server, managed, revoked_key).items():
        for method, path, body in routes:
            r = httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=30)
            where = f"{case}: {method} {path}"
            assert r.status_code == 401, f"{where} -> {r.status_code} {r.text[:200]}"
            assert r.json()["error_type"] == "unauthorized", where
            assert isinstance(r.json()["detail"], str) and r.json()["detail"], where
            assert r.headers["x-fal-error-type"] == "unauthorized", where
            assert r.headers["x-fal-request-id"], where
            checked += 1
        status, body = refusal(ws_url(server), additional_headers=headers) if headers else refusal(ws_url(server))
        assert status == 403 and body["error_type"] == "unauthorized", case
        checked += 1
    assert checked == 13 * (len(routes) + 1)
    # The same routes with valid keys (static and managed) are not refused.
    for headers in (good, {"Authorization": f"Key {server.key}"}):
        for method, path, body in routes[:4] + routes[8:]:
            r = httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=120)
            assert r.status_code != 401, f"{method} {path}: {r.text[:200]}"


def test_fal_client_with_key_id_and_secret(
    server: LiveServer, managed: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fal's other way to give the key: ``FAL_KEY_ID`` and ``FAL_KEY_SECRET``, which fal-client
    joins with ``:``. A key from ``livegen keys create`` is ``id:secret``, so its two halves work."""
    key_id, secret = managed["kept"].split(":", 1)
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.setenv("FAL_KEY_ID", key_id)
    monkeypatch.setenv("FAL_KEY_SECRET", secret)
    point_fal_client(server.base_url)
    result = fal_client.SyncClient().run(TURBO, {"prompt": "a fox", **SMALL})
    assert result["images"][0]["url"].startswith("data:image/jpeg;base64,")
    monkeypatch.setenv("FAL_KEY_SECRET", secret[:-1])
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.SyncClient().run(TURBO, {"prompt": "a fox", **SMALL})
    assert info.value.status_code == 401


def test_revoking_a_key_ends_its_outstanding_tokens(
    server: LiveServer, keys_dir: Path, managed: dict[str, str]
) -> None:
    key = managed["revoked-with-tokens"]
    rt, cdn = realtime_token(server, key), cdn_token(server, key)
    with connect(ws_url(server, fal_jwt_token=rt)):
        pass  # both work before the revocation
    upload = {"Authorization": f"Bearer {cdn}", "Content-Type": "image/png", "X-Fal-File-Name": "a.png"}
    assert httpx.post(server.base_url + "/cdn/files/upload", content=b"x", headers=upload).status_code == 200
    assert CliRunner().invoke(main, ["keys", "revoke", key.split(":")[0], "--data-dir", str(keys_dir)]).exit_code == 0
    status, body = refusal(ws_url(server, fal_jwt_token=rt))
    assert status == 403 and "revoked" in body["detail"]
    r = httpx.post(server.base_url + "/cdn/files/upload", content=b"x", headers=upload)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_a_static_keys_id_is_bound_to_the_key_not_its_place_in_the_list(tmp_path: Path) -> None:
    """Queue jobs and tokens carry the key id. With ids by position, taking key A out of
    ``LIVEGEN_API_KEYS=A,B`` gave B A's id: B could read A's jobs and A's tokens kept working."""
    a, b, c = (SecretStr(f"key-{name}-{secrets.token_hex(8)}") for name in "abc")

    def ids(keys: list[SecretStr]) -> tuple[KeyStore, dict[str, str]]:
        with Database.open(tmp_path / "keys.sqlite3") as db:
            store = KeyStore(db, keys)
            return store, {k.get_secret_value(): store.verify(k.get_secret_value()) for k in keys}

    _, first = ids([a, b])
    assert list(first.values()) == ["static-0", "static-1"]  # the ids positions gave before: kept
    _, reordered = ids([b, a])
    assert reordered == first
    with Database.open(tmp_path / "keys.sqlite3") as db:
        store = KeyStore(db, [b])
        assert store.verify(b.get_secret_value()) == "static-1"
        assert not store.is_active("static-0")  # A's tokens die with A's place in the list
        with pytest.raises(Unauthorized):
            store.verify(a.get_secret_value())
    _, later = ids([c, b, c])  # a new key (listed twice: one key) gets an id no other key had
    c_id = later[c.get_secret_value()]
    assert c_id.startswith("static-") and c_id not in ("static-0", "static-1")
    assert ids([a, b, c])[1] == {**first, c.get_secret_value(): c_id}


def test_key_comparison_is_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check goes through hmac.compare_digest on SHA-256 digests, and every static key is
    compared whether or not an earlier one matched (no early exit to time)."""
    calls: list[tuple[str, str]] = []
    original = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    static = [SecretStr(f"static-key-{i}") for i in range(3)]
    with Database.open(tmp_path / "keys.sqlite3") as db:
        store = KeyStore(db, static)
        _, managed_key = store.create("m")
        for key, compared in [
            ("static-key-0", 3),  # a match on the first key still compares the other two
            ("static-key-2", 3),
            ("nope", 3),
            (managed_key, 4),  # the managed row, looked up by its (public) id, is compared too
            (managed_key.split(":")[0] + ":wrong", 4),
        ]:
            calls.clear()
            with contextlib.suppress(Unauthorized):
                store.verify(key)
            assert len(calls) == compared, key
            assert all(len(a) == len(b) == 64 for a, b in calls)  # hex SHA-256 digests, never raw keys
    source = inspect.getsource(KeyStore.verify)
    assert "compare_digest" in source and " == " not in source


# --- forged, expired and misdirected tokens --------------------------------------------------------


def _secret(server: LiveServer) -> bytes:
    return (server.data_dir / "secret.key").read_bytes()


def _claims(audience: str = REALTIME, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": audience,
        "sub": "static-0",
        "apps": ["fast-turbo-diffusion"],
        "iat": now,
        "nbf": now - 1,
        "exp": now + 600,
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _with_payload(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return ".".join([header, _b64({**claims, **changes}), signature])


def _with_header(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=="))
    return ".".join([_b64({**fields, **changes}), payload, signature])


def _hs256(claims: dict[str, Any], key: bytes) -> str:
    """By hand: PyJWT refuses to sign with an empty key."""
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(claims)}"
    signature = hmac.new(key, signing_input.encode(), "sha256").digest()
    return f"{signing_input}.{_b64(signature)}"


def _signed_with(server: LiveServer, audience: str, claim: str, value: Any) -> str:
    """A token signed with the real secret whose ``claim`` is ``value``, whatever its JSON type (null included)."""
    return jwt.encode({**_claims(audience), claim: value}, _secret(server))


def _jwks_public_key(server: LiveServer) -> bytes:
    x = httpx.get(server.base_url + "/rest/.well-known/jwks.json").json()["keys"][0]["x"]
    return base64.urlsafe_b64decode(x + "==")


Forger = Callable[[LiveServer, str], str]

FORGERIES: dict[str, tuple[Forger, str]] = {
    # name: (how to make it for an audience, what the refusal says)
    "expired": (lambda s, aud: jwt.encode(_claims(aud, exp=int(time.time()) - 5), _secret(s)), "token expired"),
    "expired long ago": (
        lambda s, aud: jwt.encode(_claims(aud, iat=1, nbf=1, exp=2), _secret(s)),
        "token expired",
    ),
    "nbf in the future": (
        lambda s, aud: jwt.encode(_claims(aud, nbf=int(time.time()) + 300), _secret(s)),
        "token not yet valid",
    ),
    "iat in the future": (
        lambda s, aud: jwt.encode(_claims(aud, iat=int(time.time()) + 300, nbf=None), _secret(s)),
        "invalid token",
    ),
    "no exp": (lambda s, aud: jwt.encode(_claims(aud, exp=None), _secret(s)), "invalid token"),
    "no sub": (lambda s, aud: jwt.encode(_claims(aud, sub=None), _secret(s)), "invalid token"),
    "no aud": (lambda s, aud: jwt.encode(_claims(aud, aud=None), _secret(s)), "invalid token"),
    "other audience": (lambda s, aud: jwt.encode(_claims("fal"), _secret(s)), "invalid token"),
    "the other kind of token": (
        lambda s, aud: jwt.encode(_claims(CDN if aud == REALTIME else REALTIME), _secret(s)),
        "invalid token",
    ),
    "alg none": (lambda s, aud: jwt.encode(_claims(aud), "", algorithm="none"), "invalid token"),
    "alg none, signature kept": (
        lambda s, aud: _with_header(jwt.encode(_claims(aud), _secret(s)), alg="none"),
        "invalid token",
    ),
    "alg NONE": (lambda s, aud: f"{_b64({'alg': 'NONE', 'typ': 'JWT'})}.{_b64(_claims(aud))}.", "invalid token"),
    "HS512 with the real secret": (
        lambda s, aud: jwt.encode(_claims(aud), _secret(s), algorithm="HS512"),
        "invalid token",
    ),
    "HS384 with the real secret": (
        lambda s, aud: jwt.encode(_claims(aud), _secret(s), algorithm="HS384"),
        "invalid token",
    ),
    "header says HS512, HS256 signature": (
        lambda s, aud: _with_header(jwt.encode(_claims(aud), _secret(s)), alg="HS512"),
        "invalid token",
    ),
    "RS256 with an attacker's key": (
        lambda s, aud: jwt.encode(
            _claims(aud), rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256"
        ),
        "invalid token",
    ),
    "ES256 with an attacker's key": (
        lambda s, aud: jwt.encode(_claims(aud), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
        "invalid token",
    ),
    "EdDSA with an attacker's key": (
        lambda s, aud: jwt.encode(_claims(aud), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA"),
        "invalid token",
    ),
    "HS256 keyed with the published webhook public key": (
        lambda s, aud: jwt.encode(_claims(aud), _jwks_public_key(s)),
        "invalid token",
    ),
    "HS256 with another secret": (lambda s, aud: jwt.encode(_claims(aud), os.urandom(32)), "invalid token"),
    "HS256 with an empty secret": (lambda s, aud: _hs256(_claims(aud), b""), "invalid token"),
    "payload tampered: exp extended": (
        lambda s, aud: _with_payload(
            jwt.encode(_claims(aud, exp=int(time.time()) - 5), _secret(s)), exp=int(time.time()) + 600
        ),
        "invalid token",
    ),
    "payload tampered: sub changed": (
        lambda s, aud: _with_payload(jwt.encode(_claims(aud), _secret(s)), sub="someone-else"),
        "invalid token",
    ),
    "signature stripped": (
        lambda s, aud: jwt.encode(_claims(aud), _secret(s)).rsplit(".", 1)[0] + ".",
        "invalid token",
    ),
    "signature truncated": (lambda s, aud: jwt.encode(_claims(aud), _secret(s))[:-3], "invalid token"),
    "not a JWT": (lambda s, aud: "not-a-jwt", "invalid token"),
    "three empty parts": (lambda s, aud: "..", "invalid token"),
    "bad base64": (lambda s, aud: "eyJ!!!.eyJ!!!.sig", "invalid token"),
    "JSON that is not an object": (lambda s, aud: f"{_b64(b'[1]')}.{_b64(b'[2]')}.x", "invalid token"),
    "4 KB of noise": (lambda s, aud: secrets.token_urlsafe(3000), "invalid token"),
    # Correctly signed, but a claim has the wrong type: refused like any invalid token, never a 500.
    **{
        f"{claim} {kind}": (lambda s, aud, c=claim, v=value: _signed_with(s, aud, c, v), "invalid token")
        for claim, kind, value in [
            ("exp", "a word", "soon"),
            ("exp", "a numeric string", "9999999999"),
            ("exp", "a list", [9999999999]),
            ("exp", "an object", {"at": 9999999999}),
            ("exp", "null", None),
            ("exp", "true", True),
            ("exp", "false", False),
            ("exp", "Infinity", float("inf")),
            ("exp", "NaN", float("nan")),
            ("exp", "too big for a float", 10**400),
            ("nbf", "a word", "soon"),
            ("nbf", "null", None),
            ("nbf", "a list", [0]),
            ("nbf", "true", True),
            ("sub", "a number", 1),
            ("sub", "a list", ["static-0"]),
            ("sub", "true", True),
            ("apps", "a string", "fast-turbo-diffusion"),
            ("apps", "an object", {"fast-turbo-diffusion": True}),
            ("apps", "a list of numbers", [1]),
            ("apps", "a list holding null", [None]),
            ("apps", "null", None),
            ("apps", "a number", 1),
        ]
    },
}


@pytest.mark.parametrize("name", FORGERIES)
def test_bad_realtime_tokens_are_refused_at_the_handshake(server: LiveServer, name: str) -> None:
    forge, said = FORGERIES[name]
    status, body = refusal(ws_url(server, fal_jwt_token=forge(server, REALTIME)))
    assert status == 403
    assert body == {"detail": said, "error_type": "unauthorized"}


@pytest.mark.parametrize("name", FORGERIES)
def test_bad_cdn_tokens_are_401(server: LiveServer, name: str) -> None:
    forge, said = FORGERIES[name]
    headers = {"Authorization": f"Bearer {forge(server, CDN)}", "Content-Type": "image/png"}
    r = httpx.post(server.base_url + "/cdn/files/upload", content=b"x", headers=headers)
    assert r.status_code == 401
    assert r.json() == {"detail": said, "error_type": "unauthorized"}


def test_a_token_for_one_app_is_refused_on_another(server: LiveServer) -> None:
    lcm_only = realtime_token(server, server.key, "fast-lcm-diffusion")
    status, body = refusal(ws_url(server, TURBO, fal_jwt_token=lcm_only))
    assert status == 403 and body["error_type"] == "forbidden" and "fast-turbo-diffusion" in body["detail"]
    no_apps = jwt.encode(_claims(apps=[]), _secret(server))
    assert refusal(ws_url(server, TURBO, fal_jwt_token=no_apps))[0] == 403
    with connect(ws_url(server, LCM, fal_jwt_token=lcm_only)):
        pass  # the app it was made for
    # The token wins over a valid key header: a bad token is not rescued by the header.
    status, _ = refusal(
        ws_url(server, TURBO, fal_jwt_token=lcm_only), additional_headers={"Authorization": f"Key {server.key}"}
    )
    assert status == 403


def test_the_real_secret_with_valid_claims_is_accepted(server: LiveServer) -> None:
    """The control for the forgeries above: the same claims, properly signed, work."""
    with connect(ws_url(server, fal_jwt_token=jwt.encode(_claims(), _secret(server)))):
        pass
    headers = {"Authorization": f"Bearer {jwt.encode(_claims(CDN), _secret(server))}", "Content-Type": "image/png"}
    assert httpx.post(server.base_url + "/cdn/files/upload", content=b"x", headers=headers).status_code == 200


# --- a session outliving its token -------------------------------------------------------------


def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    ws.send(msgpack.packb(frame, use_bin_type=True))


def test_token_expiry_closes_the_session_with_1000_and_a_reason(server: LiveServer) -> None:
    started = time.monotonic()
    ws = connect(ws_url(server, fal_jwt_token=realtime_token(server, server.key)), max_size=None)
    results = 0
    with ws, pytest.raises(ConnectionClosed):
        for i in itertools.count():
            assert time.monotonic() - started < TOKEN_TTL_S + 5, "still open"
            send(ws, {**SMALL, "prompt": f"frame {i}", "request_id": str(i)})
            while not isinstance(ws.recv(timeout=30), bytes):
                pass  # skip the timings
            results += 1
    lifetime = time.monotonic() - started
    assert ws.close_code == 1000
    assert ws.close_reason == "token expired; reconnect with a new token"
    assert TOKEN_TTL_S - 1.5 < lifetime < TOKEN_TTL_S + 2, lifetime
    assert results > 0
    assert "realtime session closed" in server.log()


def test_the_frame_in_flight_at_token_expiry_still_gets_its_result(server: LiveServer) -> None:
    """A frame being rendered when the token expires is answered before the close (1000, the
    expiry reason); frames sent after the expiry are not. A frame slow enough to straddle the
    expiry is found first on a key-header session (which does not expire)."""
    headers = {"Authorization": f"Key {server.key}"}
    frame: dict[str, Any] = {
        **SMALL,
        "prompt": "slow",
        "image_size": {"width": 512, "height": 512},
        "num_inference_steps": 2,
    }
    with connect(ws_url(server), additional_headers=headers, max_size=None) as ws:
        while True:
            started = time.monotonic()
            send(ws, {**frame, "request_id": "calibrate"})
            assert recv_result(ws)["request_id"] == "calibrate"
            took = time.monotonic() - started
            if took >= 2.5 or frame["num_inference_steps"] >= 32:
                break
            frame["num_inference_steps"] *= 2
    assert 2.5 <= took < 9, f"no frame between 2.5 and 9 s to straddle the expiry: {took:.1f} s"

    token = realtime_token(server, server.key)
    expires_at = float(jwt.decode(token, options={"verify_signature": False})["exp"])
    with connect(ws_url(server, fal_jwt_token=token), max_size=None) as ws:
        time.sleep(max(0.0, expires_at - 0.3 * took - time.time()))  # mid-render at the expiry
        send(ws, {**frame, "request_id": "straddling"})
        time.sleep(max(0.0, expires_at + 0.2 - time.time()))
        send(ws, {**frame, "request_id": "after expiry"})  # refused: the session is closing
        answer = recv_result(ws, timeout=30)
        answered_at = time.time()
        assert answer["request_id"] == "straddling"
        with pytest.raises(ConnectionClosed):
            recv_result(ws, timeout=30)
    assert answered_at > expires_at, "the frame did not straddle the expiry"
    assert ws.close_code == 1000 and ws.close_reason == "token expired; reconnect with a new token"


def test_a_session_opened_with_the_key_header_does_not_expire(server: LiveServer) -> None:
    headers = {"Authorization": f"Key {server.key}"}
    with connect(ws_url(server), additional_headers=headers, max_size=None) as ws:
        time.sleep(TOKEN_TTL_S + 1)
        send(ws, {**SMALL, "prompt": "still open"})
        while not isinstance(ws.recv(timeout=30), bytes):
            pass


@pytest.fixture
def fal(server: LiveServer) -> Iterator[fal_client.SyncClient]:
    names = ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL")
    saved = {name: getattr(fcc, name) for name in names}
    point_fal_client(server.base_url)
    yield fal_client.SyncClient(key=server.key)
    for name, value in saved.items():
        setattr(fcc, name, value)


def test_fal_client_carries_a_long_session_across_token_expiry(fal: fal_client.SyncClient) -> None:
    """fal-client asks for 120 s tokens and gets TOKEN_TTL_S; recv() returns None at the expiry
    (a 1000 close), and the caller reconnects with ``realtime()``, which fetches a new token."""
    deadline = time.monotonic() + 3 * TOKEN_TTL_S
    results, connections, sent = 0, 0, 0
    while time.monotonic() < deadline:
        connections += 1
        with fal.realtime(TURBO) as connection:
            while time.monotonic() < deadline:
                try:
                    connection.send({**SMALL, "prompt": f"long {sent}", "request_id": str(sent)})
                except ConnectionClosed:
                    break  # closed between our recv and this send
                sent += 1
                result = connection.recv()
                if result is None:
                    break  # the token expired: reconnect
                assert result["request_id"] == str(sent - 1)
                results += 1
    assert connections >= 3, (connections, results)
    assert results >= sent - connections  # at most the frame in flight at each close is lost


# Drives @fal-ai/client through tests/js/harness.mjs (its WebSocket shim and the livegen helper).
JS_LONG_SESSION = """
const { clientFor, installWebSocketShim, server } = await import("./harness.mjs");
await installWebSocketShim(server().baseUrl);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const results = [], errors = [];
const start = Date.now();
const connection = clientFor("middleware").realtime.connect(__APP__, {
  connectionKey: "long-session",
  onResult: (r) => results.push({ id: Number(r.request_id), at: (Date.now() - start) / 1000 }),
  onError: (e) => errors.push(`${e.status} ${e.message}`),
});
const until = Date.now() + __DURATION_MS__;
let sent = 0;
while (Date.now() < until) {
  connection.send({ ...__INPUT__, prompt: `js ${sent}`, request_id: String(sent) });
  sent += 1;
  await sleep(1000);
}
await sleep(2000);
console.log(JSON.stringify({ sent, results, errors }));
process.exit(0);
"""


def test_js_client_carries_a_long_session_across_token_expiry(server: LiveServer) -> None:
    """@fal-ai/client 1.10.1: after the server's 1000 close it drops the token, and its next
    send fetches a new one and opens a new socket; no onError, results keep coming."""
    node = shutil.which("node")
    js = ROOT / "tests" / "js"
    if node is None or not (js / "node_modules" / "@fal-ai" / "client").is_dir():
        pytest.fail("node and tests/js/node_modules are needed (scripts/test installs them)")
    accepted_before = server.log().count("[accepted]")
    duration_ms = 3 * TOKEN_TTL_S * 1000
    substitutions = {"__APP__": json.dumps(TURBO), "__DURATION_MS__": str(duration_ms), "__INPUT__": json.dumps(SMALL)}
    script = JS_LONG_SESSION
    for placeholder, value in substitutions.items():
        script = script.replace(placeholder, value)
    env = {**os.environ, "LIVEGEN_BASE_URL": server.base_url, "FAL_KEY": server.key}
    proc = subprocess.run(
        [node, "--input-type=module", "-e", script], cwd=js, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    connections = server.log().count("[accepted]") - accepted_before
    assert report["errors"] == [], report  # the expiry closes are not errors to the app
    assert connections >= 3, (connections, report)
    # Results before the first expiry and after a reconnect (on a loaded CPU a connection may
    # end before its frame is rendered, so not every token lifetime is required to have one).
    windows = {int(r["at"] // TOKEN_TTL_S) for r in report["results"]}
    assert 0 in windows and max(windows) >= 1, report


def test_sessions_of_one_token_each_end_on_time(server: LiveServer) -> None:
    """Several sessions with tokens of different ages: each closes at its own token's expiry."""
    closed_after: dict[int, float] = {}

    def hold(n: int) -> None:
        time.sleep(n * 0.7)
        opened = time.monotonic()
        with connect(ws_url(server, fal_jwt_token=realtime_token(server, server.key))) as ws:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=TOKEN_TTL_S + 3)
            assert ws.close_code == 1000 and (ws.close_reason or "").startswith("token expired")
        closed_after[n] = time.monotonic() - opened

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(closed_after) == [0, 1, 2]
    assert all(TOKEN_TTL_S - 1.5 < s < TOKEN_TTL_S + 2 for s in closed_after.values()), closed_after
