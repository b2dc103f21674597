"""server/jobs/store.py on a real SQLite file: a poll reads a job without its (large) input."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

from livegen.protocol.status import JobState
from livegen.server.db import Database
from livegen.server.jobs.store import Job, SqliteJobStore

APP = "fal-ai/fast-turbo-diffusion"
BIG = 5_000_000  # characters of input: a large data URL, as queue submissions carry


def test_a_poll_leaves_the_input_unread(tmp_path: Path) -> None:
    big_input = {"prompt": "x", "image_url": "data:image/png;base64," + "A" * BIG}
    with Database.open(tmp_path / "jobs.sqlite3") as db:
        store = SqliteJobStore(db)
        store.insert(Job("r", APP, APP, "k", big_input, JobState.QUEUED, 0, time.time(), "http://x"))
        statements: list[str] = []
        db._require().set_trace_callback(statements.append)

        tracemalloc.start()
        try:
            polled = store.get("r", with_input=False)
            _, poll_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            full = store.get("r")
            _, full_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert polled.input is None
        assert full.input == big_input
        assert polled == replace(full, input=None)  # every other field is read
        poll_sql, full_sql = statements
        assert "input_json" not in poll_sql and "input_json" in full_sql
        assert poll_peak < BIG // 10 < BIG < full_peak  # the input's bytes never reach Python on a poll

        # A job moved on from a poll (cancel, a state change) keeps its stored input for the dispatcher.
        store.transition(polled, JobState.CANCELED, completed_at=time.time())
        assert store.get("r").input == big_input
        # The dispatch paths still read it.
        store.insert(Job("q", APP, APP, "k", {"prompt": "y"}, JobState.QUEUED, 0, time.time(), "http://x"))
        assert [j.input for j in store.queued(10)] == [{"prompt": "y"}]
