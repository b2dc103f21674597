"""Webhook delivery: fal's payload, signed with Ed25519, retried with backoff, durable.

Deliveries are rows in SQLite (written with the job's terminal state), so they survive
restarts. Each attempt re-checks the target against the SSRF policy, connects to the address it
checked, never follows redirects and has a short timeout. Signature headers follow fal's
scheme: Ed25519 over ``request_id \\n user_id \\n timestamp \\n sha256hex(body)``; the public key
is published as a JWKS at ``/rest/.well-known/jwks.json``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from livegen.protocol.errors import LivegenError
from livegen.server.jobs.store import Delivery, SqliteJobStore
from livegen.server.urlfetch import Resolver, check_target

logger = logging.getLogger(__name__)


class WebhookSigner:
    """The server's Ed25519 key, kept (0600, PEM) in the data dir."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_raw = raw
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load(cls, path: Path) -> WebhookSigner:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            assert isinstance(key, Ed25519PrivateKey)
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key)

    def headers(self, request_id: str, user_id: str, body: bytes, timestamp: int) -> dict[str, str]:
        message = f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": str(timestamp),
            "X-Fal-Webhook-Signature": self._key.sign(message).hex(),
        }

    def jwks(self) -> dict[str, Any]:
        x = base64.urlsafe_b64encode(self.public_raw).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}]}


class WebhookSender:
    """Delivers due webhook rows; wakes on new ones, sleeps until the next retry otherwise.

    Retry n (1-based) waits ``backoff_base_s * 2**(n-1)`` ±20 %: at the default 15 s, ten
    attempts span about two hours, as fal's do.
    """

    def __init__(
        self,
        store: SqliteJobStore,
        signer: WebhookSigner,
        *,
        allow_private: bool,
        max_attempts: int = 10,
        backoff_base_s: float = 15.0,
        timeout_s: float = 10.0,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.time,
        on_attempt: Callable[[bool], None] | None = None,
    ) -> None:
        self._store = store
        self._signer = signer
        self._allow_private = allow_private
        self._max_attempts = max_attempts
        self._base = backoff_base_s
        self._timeout = timeout_s
        self._resolver = resolver
        self._clock = clock
        self._on_attempt = on_attempt
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("webhook sender already started")
        self._task = asyncio.create_task(self._loop(), name="livegen-webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self._timeout) as client:
            while True:
                self._wake.clear()
                try:
                    for delivery in self._store.due_deliveries(self._clock()):
                        await self._attempt(client, delivery)
                    next_at = self._store.next_delivery_at()
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: deliveries wait, the sender lives
                    logger.error("webhook delivery round failed (%s: %s); retrying in 5 s", type(exc).__name__, exc)
                    next_at = self._clock() + 5.0
                wait = 60.0 if next_at is None else max(0.0, min(60.0, next_at - self._clock()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # not wait_for, which can swallow stop()'s cancel on 3.11
                        await self._wake.wait()

    async def _attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        error = await self._post(client, delivery)
        ok = error is None
        now = self._clock()
        next_at = None
        if not ok and delivery.attempts + 1 < self._max_attempts:
            delay = self._base * 2**delivery.attempts
            next_at = now + delay * random.uniform(0.8, 1.2)
        self._store.delivery_attempted(delivery, now=now, ok=ok, error=error, next_at=next_at)
        if self._on_attempt is not None:
            self._on_attempt(ok)
        if ok:
            logger.info("webhook delivered request_id=%s attempt=%d", delivery.request_id, delivery.attempts + 1)
        else:
            outcome = "retrying" if next_at is not None else "giving up"
            logger.warning(
                "webhook failed request_id=%s attempt=%d (%s); %s",
                delivery.request_id,
                delivery.attempts + 1,
                error,
                outcome,
            )

    async def _post(self, client: httpx.AsyncClient, delivery: Delivery) -> str | None:
        """None on a 2xx, else what went wrong (never the URL's query or the body)."""
        try:
            target, addresses = await check_target(
                delivery.url, allow_private=self._allow_private, field="fal_webhook", resolver=self._resolver
            )
        except LivegenError as exc:
            return exc.message
        headers = {
            "Content-Type": "application/json",
            "Host": target.netloc.decode("ascii"),
            "User-Agent": "livegen-webhook",
            **self._signer.headers(delivery.request_id, delivery.user_id, delivery.body, int(self._clock())),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            response = await client.post(
                target.copy_with(host=addresses[0]),
                content=delivery.body,
                headers=headers,
                extensions=extensions,
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
