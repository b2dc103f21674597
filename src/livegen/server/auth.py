"""API keys: static ones from ``LIVEGEN_API_KEYS`` and managed ones stored hashed in SQLite.

A managed key reads ``<key_id>:<secret>`` (fal's ``id:secret`` shape). Only its SHA-256 is
stored; comparison is constant-time. Keys are high-entropy random strings, so a fast hash is
the right tool (no password stretching needed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from pydantic import SecretStr

from livegen.protocol.errors import NotFound, Unauthorized
from livegen.server.db import Database


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    name: str
    created_at: float
    revoked_at: float | None = None


SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_sha256  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS static_keys (
    key_sha256  TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL UNIQUE,
    first_seen  REAL NOT NULL
);
"""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, db: Database, static_keys: list[SecretStr] | None = None) -> None:
        self._db = db
        db.migrate(SCHEMA)
        self._static = self._static_ids([_digest(k.get_secret_value()) for k in static_keys or []])

    def _static_ids(self, digests: list[str]) -> list[tuple[str, str]]:
        """(key id, digest) of each static key. A static key's id is bound to the key (by its
        digest, kept in the data dir), not to its place in ``LIVEGEN_API_KEYS``: reordering the
        list changes nothing, and a key taken out of it takes its id along (its tokens stop
        working, its jobs stay its own) instead of handing it to the key that moves up.

        The first time (no static key recorded yet) the ids the list's order gave before ids were
        bound, ``static-0``, ``static-1``, …, are kept for the keys listed, so their jobs stay
        theirs; keys added later get a new random id."""
        if not digests:
            return []
        with self._db.transaction() as conn:
            known = dict(conn.execute("SELECT key_sha256, key_id FROM static_keys").fetchall())
            first_time = not known
            for i, digest in enumerate(digests):
                if digest not in known:
                    key_id = f"static-{i}" if first_time else f"static-{secrets.token_hex(6)}"
                    conn.execute(
                        "INSERT INTO static_keys (key_sha256, key_id, first_seen) VALUES (?, ?, ?)",
                        (digest, key_id, time.time()),
                    )
                    known[digest] = key_id
        # A key listed twice is one key.
        return list({digest: (known[digest], digest) for digest in digests}.values())

    def create(self, name: str = "default") -> tuple[KeyInfo, str]:
        """A new key; the full key is returned once and never stored."""
        key_id = secrets.token_hex(6)
        key = f"{key_id}:{secrets.token_urlsafe(32)}"
        now = time.time()
        self._db.execute(
            "INSERT INTO api_keys (key_id, name, key_sha256, created_at) VALUES (?, ?, ?, ?)",
            (key_id, name, _digest(key), now),
        )
        return KeyInfo(key_id, name, now), key

    def list(self) -> list[KeyInfo]:
        rows = self._db.query("SELECT key_id, name, created_at, revoked_at FROM api_keys ORDER BY created_at")
        return [KeyInfo(*row) for row in rows]

    def revoke(self, key_id: str) -> None:
        changed = self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (time.time(), key_id),
        )
        if not changed:
            raise NotFound(f"no active key with id {key_id}")

    def is_active(self, key_id: str) -> bool:
        """Whether ``key_id`` names a key that still works: tokens die with the key they were
        issued for, so revoking a key also ends its outstanding realtime and upload tokens."""
        if any(key_id == static_id for static_id, _ in self._static):
            return True
        return bool(self._db.query("SELECT 1 FROM api_keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)))

    def has_any(self) -> bool:
        return bool(self._static) or bool(self._db.query("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1"))

    def verify(self, key: str) -> str:
        """The key id of a valid key; ``Unauthorized`` otherwise."""
        digest = _digest(key)
        found = None
        for key_id, expected in self._static:
            if hmac.compare_digest(digest, expected):
                found = key_id
        key_id = key.split(":", 1)[0] if ":" in key else ""
        rows = self._db.query("SELECT key_sha256 FROM api_keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,))
        if rows and hmac.compare_digest(digest, rows[0][0]):
            found = key_id
        if found is None:
            raise Unauthorized()
        return found


def parse_authorization(header: str | None) -> str:
    """The credentials of an ``Authorization: Key <credentials>`` header."""
    if not header:
        raise Unauthorized()
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "key" or not credentials.strip():
        raise Unauthorized()
    return credentials.strip()
