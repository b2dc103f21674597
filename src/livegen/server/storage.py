"""Files livegen serves back: generated images (``sync_mode: false``), later uploads.

Stored under server-generated ids in the data dir (never a client's name in a path), with
their content type and size in SQLite, and served unauthenticated at
``{base}/cdn/files/{file_id}/{file_name}``.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from livegen.protocol.errors import NotFound
from livegen.server.db import Database

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_FILE_ID = re.compile(r"^[0-9a-f]{32}$")


SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    file_id      TEXT PRIMARY KEY,
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    file_name    TEXT NOT NULL,
    created_at   REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StoredFile:
    file_id: str
    content_type: str
    size: int
    file_name: str
    path: Path


class FileStore:
    def __init__(self, db: Database, root: Path) -> None:
        self._db = db
        db.migrate(SCHEMA)
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, content_type: str, file_name: str) -> StoredFile:
        file_id = secrets.token_hex(16)
        name = _SAFE_NAME.sub("_", file_name)[-100:] or "file"
        path = self._root / file_id
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._db.execute(
            "INSERT INTO files (file_id, content_type, size, file_name, created_at) VALUES (?, ?, ?, ?, ?)",
            (file_id, content_type, len(data), name, time.time()),
        )
        return StoredFile(file_id, content_type, len(data), name, path)

    def get(self, file_id: str) -> StoredFile:
        if not _FILE_ID.match(file_id):
            raise NotFound("file not found")
        rows = self._db.query("SELECT content_type, size, file_name FROM files WHERE file_id = ?", (file_id,))
        path = self._root / file_id
        if not rows or not path.is_file():
            raise NotFound("file not found")
        content_type, size, name = rows[0]
        return StoredFile(file_id, content_type, size, name, path)
