"""Durable queue jobs and webhook deliveries in SQLite.

A job is accepted when its row is committed. State changes are conditional updates checked
against ``protocol.status.TRANSITIONS``; a terminal change and the webhook delivery it causes
are committed in one transaction, so a crash can lose neither.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from livegen.protocol.errors import InvalidTransition, NotFound
from livegen.protocol.status import JobState, check_transition
from livegen.server.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    request_id   TEXT PRIMARY KEY,
    app_id       TEXT NOT NULL,
    endpoint_id  TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    input_json   TEXT NOT NULL,
    state        TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    created_at   REAL NOT NULL,
    base_url     TEXT NOT NULL,
    started_at   REAL,
    completed_at REAL,
    deadline_at  REAL,
    webhook_url  TEXT,
    output_json  TEXT,
    error_status INTEGER,
    error_json   TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    logs_json    TEXT NOT NULL DEFAULT '[]',
    file_ttl_s   REAL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority, created_at);
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs (deadline_at) WHERE state = 'queued' AND deadline_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT NOT NULL,
    url             TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    body            BLOB NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at    REAL,
    gave_up_at      REAL,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries (delivered_at, gave_up_at, next_attempt_at);
"""

_COLUMNS = (
    "request_id, app_id, endpoint_id, key_id, input_json, state, priority, created_at, base_url, started_at, "
    "completed_at, deadline_at, webhook_url, output_json, error_status, error_json, attempts, logs_json, file_ttl_s"
)
# Polls (status, result, cancel) never need the input, which can be ~20 MB: NULL is read in its place.
_COLUMNS_WITHOUT_INPUT = _COLUMNS.replace("input_json", "NULL")


@dataclass(frozen=True)
class Job:
    request_id: str
    app_id: str
    endpoint_id: str
    key_id: str
    input: dict[str, Any] | None  # None: read without it (``SqliteJobStore.get(..., with_input=False)``)
    state: JobState
    priority: int
    created_at: float
    base_url: str
    started_at: float | None = None
    completed_at: float | None = None
    deadline_at: float | None = None
    webhook_url: str | None = None
    output: dict[str, Any] | None = None
    error_status: int | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    logs: list[dict[str, Any]] = field(default_factory=list)
    file_ttl_s: float | None = None  # how long its stored images are served (storage.requested_ttl)


@dataclass(frozen=True)
class Delivery:
    delivery_id: int
    request_id: str
    url: str
    user_id: str
    body: bytes
    attempts: int


def _row_to_job(row: tuple[Any, ...]) -> Job:
    (rid, app, endpoint, key, inp, state, prio, created, base, started, completed, deadline, hook, out,
     err_status, err, attempts, logs, file_ttl_s) = row  # fmt: skip
    return Job(
        rid, app, endpoint, key, json.loads(inp) if inp is not None else None, JobState(state), prio, created, base,
        started, completed, deadline, hook, json.loads(out) if out else None, err_status,
        json.loads(err) if err else None, attempts, json.loads(logs), file_ttl_s,
    )  # fmt: skip


class SqliteJobStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        db.migrate(SCHEMA)
        db.add_column("jobs", "file_ttl_s", "REAL")

    def insert(self, job: Job) -> None:
        self._db.execute(
            f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 19)})",
            (
                job.request_id, job.app_id, job.endpoint_id, job.key_id, json.dumps(job.input),
                job.state.value, job.priority, job.created_at, job.base_url, job.started_at, job.completed_at,
                job.deadline_at, job.webhook_url, None, None, None, job.attempts, json.dumps(job.logs), job.file_ttl_s,
            ),
        )  # fmt: skip

    def get(self, request_id: str, *, with_input: bool = True) -> Job:
        """The stored job; ``with_input=False`` leaves its input unread (``input`` is None), for polls."""
        columns = _COLUMNS if with_input else _COLUMNS_WITHOUT_INPUT
        rows = self._db.query(f"SELECT {columns} FROM jobs WHERE request_id = ?", (request_id,))
        if not rows:
            raise NotFound(f"Request {request_id} not found")
        return _row_to_job(rows[0])

    def transition(
        self,
        job: Job,
        new: JobState,
        *,
        webhook_body: bytes | None = None,
        **changes: Any,
    ) -> Job:
        """Move ``job`` to ``new`` if it is still in ``job.state``; returns the stored job.

        ``changes`` may set started_at, completed_at, output, error_status, error, attempts, logs.
        Raises ``InvalidTransition`` for a change the table forbids, or when the job has moved on.
        """
        check_transition(job.state, new)
        updated = replace(job, state=new, **changes)
        with self._db.transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = ?, started_at = ?, completed_at = ?, output_json = ?, error_status = ?, "
                "error_json = ?, attempts = ?, logs_json = ? WHERE request_id = ? AND state = ?",
                (
                    new.value, updated.started_at, updated.completed_at,
                    json.dumps(updated.output) if updated.output is not None else None, updated.error_status,
                    json.dumps(updated.error) if updated.error is not None else None, updated.attempts,
                    json.dumps(updated.logs), job.request_id, job.state.value,
                ),
            )  # fmt: skip
            if cur.rowcount != 1:
                current = conn.execute("SELECT state FROM jobs WHERE request_id = ?", (job.request_id,)).fetchone()
                raise InvalidTransition(
                    f"job {job.request_id} is {current[0] if current else 'gone'}, not {job.state.value}"
                )
            if webhook_body is not None and job.webhook_url:
                conn.execute(
                    "INSERT INTO webhook_deliveries (request_id, url, user_id, body, next_attempt_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (job.request_id, job.webhook_url, job.key_id, webhook_body, time.time()),
                )
        return updated

    def queued(self, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        """Queued jobs in the order they should start: normal before low priority, then FIFO."""
        skip = list(exclude)
        marks = ", ".join("?" * len(skip))
        where = "state = 'queued'" + (f" AND request_id NOT IN ({marks})" if skip else "")
        rows = self._db.query(
            f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY priority, created_at LIMIT ?", (*skip, limit)
        )
        return [_row_to_job(r) for r in rows]

    def overdue(self, now: float, limit: int = 1000) -> list[Job]:
        """Queued jobs whose start deadline (``X-Fal-Request-Timeout``) has passed (an indexed lookup)."""
        rows = self._db.query(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' AND deadline_at IS NOT NULL AND deadline_at < ? "
            "ORDER BY deadline_at LIMIT ?",
            (now, limit),
        )
        return [_row_to_job(r) for r in rows]

    def queue_position(self, job: Job) -> int:
        rows = self._db.query(
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (priority < ? OR (priority = ? AND created_at < ?))",
            (job.priority, job.priority, job.created_at),
        )
        return int(rows[0][0])

    def count(self, state: JobState) -> int:
        return int(self._db.query("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,))[0][0])

    def counts(self) -> dict[str, int]:
        """Jobs per state (for metrics)."""
        found = dict(self._db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return {state.value: int(found.get(state.value, 0)) for state in JobState}

    def requeue_running(self, exclude: Iterable[str] = ()) -> int:
        """After a crash: jobs that were running start again from the queue (except ``exclude``,
        those this process is still running)."""
        skip = list(exclude)
        marks = ", ".join("?" * len(skip))
        where = "state = 'running'" + (f" AND request_id NOT IN ({marks})" if skip else "")
        return self._db.execute(f"UPDATE jobs SET state = 'queued' WHERE {where}", skip)

    def expire(self, completed_before: float) -> int:
        return self._db.execute(
            "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'canceled') AND completed_at < ?",
            (completed_before,),
        )

    # -- webhook deliveries -------------------------------------------------------------------

    def due_deliveries(self, now: float, limit: int = 16) -> list[Delivery]:
        rows = self._db.query(
            "SELECT delivery_id, request_id, url, user_id, body, attempts FROM webhook_deliveries "
            "WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        )
        return [Delivery(*r) for r in rows]

    def next_delivery_at(self) -> float | None:
        rows = self._db.query(
            "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE delivered_at IS NULL AND gave_up_at IS NULL"
        )
        return rows[0][0]

    def delivery_attempted(
        self, delivery: Delivery, *, now: float, ok: bool, error: str | None, next_at: float | None
    ) -> None:
        if ok:
            sql, params = "delivered_at = ?", [now]
        elif next_at is None:
            sql, params = "gave_up_at = ?", [now]
        else:
            sql, params = "next_attempt_at = ?", [next_at]
        self._db.execute(
            f"UPDATE webhook_deliveries SET {sql}, attempts = attempts + 1, last_error = ? WHERE delivery_id = ?",
            (*params, error, delivery.delivery_id),
        )

    def deliveries(self, request_id: str) -> list[tuple[int, float | None, float | None, str | None]]:
        """(attempts, delivered_at, gave_up_at, last_error) per delivery of a request (for tests)."""
        return [
            (r[0], r[1], r[2], r[3])
            for r in self._db.query(
                "SELECT attempts, delivered_at, gave_up_at, last_error FROM webhook_deliveries WHERE request_id = ?",
                (request_id,),
            )
        ]
