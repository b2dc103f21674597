"""JobService: fal's queue (submit, status, result, cancel) over the durable job store.

Admission happens in ``submit`` (``QueueFull`` when the queue is at its cap). A dispatcher
task starts queued jobs in order (normal priority before low, then FIFO), several at a time
so the engine can batch them, and at lower engine priority than realtime and sync work. On
start, jobs a crash left running are queued again, so every accepted job reaches COMPLETED.
Every state change wakes status-stream listeners and, for terminal states, records the
webhook delivery in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from livegen.engine import Priority
from livegen.protocol.apps import BY_ID, Endpoint
from livegen.protocol.errors import (
    InvalidTransition,
    LivegenError,
    NotFound,
    QueueFull,
    RequestCancelled,
    StartTimeout,
    error_body,
)
from livegen.protocol.status import JobState, wire_status
from livegen.server.generation import GenerationService
from livegen.server.jobs.store import Job, SqliteJobStore
from livegen.settings import Settings

logger = logging.getLogger(__name__)

PRIORITIES = {"normal": 0, "low": 1}


def log_entry(message: str, level: str = "INFO") -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).isoformat()
    return {"message": message, "level": level, "source": "USER", "timestamp": now}


@dataclass
class _Running:
    task: asyncio.Task[None]
    cancel: threading.Event
    cancel_requested: bool = False


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: SqliteJobStore,
        generation: GenerationService,
        *,
        on_terminal: Callable[[Job], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._generation = generation
        self._on_terminal = on_terminal
        self._clock = clock
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._orphaned = False  # a job ended but its outcome could not be stored

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._dispatcher is not None:
            raise RuntimeError("job service already started")
        requeued = self._store.requeue_running()
        if requeued:
            logger.warning("requeued %d job(s) left running by a previous process", requeued)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="livegen-jobs")

    async def stop(self) -> None:
        """Stop dispatching; jobs still running go back to the queue for the next start."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for running in list(self._running.values()):
            running.cancel.set()
            running.task.cancel()
        await asyncio.gather(*(r.task for r in self._running.values()), return_exceptions=True)
        self._store.requeue_running()

    # -- the queue API ----------------------------------------------------------------------------

    def submit(
        self,
        endpoint: Endpoint,
        body: BaseModel,
        *,
        key_id: str,
        base_url: str,
        priority: str | None = None,
        start_timeout: float | None = None,
        webhook_url: str | None = None,
        file_ttl_s: float | None = None,
    ) -> Job:
        self._generation.check_limits(endpoint, body)
        queued = self._store.count(JobState.QUEUED)
        if queued >= self._settings.max_queued:
            raise QueueFull(f"the queue holds {queued} requests, its limit", retry_after=5)
        now = self._clock()
        job = Job(
            request_id=str(uuid.uuid4()),
            app_id=endpoint.app_id,
            endpoint_id=endpoint.endpoint_id,
            key_id=key_id,
            input=body.model_dump(mode="json"),
            state=JobState.QUEUED,
            priority=PRIORITIES.get((priority or "normal").lower(), 0),
            created_at=now,
            base_url=base_url,
            deadline_at=now + start_timeout if start_timeout else None,
            webhook_url=webhook_url,
            file_ttl_s=file_ttl_s,
        )
        self._store.insert(job)
        logger.info("queued request_id=%s endpoint=%s", job.request_id, endpoint.endpoint_id)
        self._changed_now()
        return job

    def get(self, app_id: str, request_id: str, *, key_id: str | None = None) -> Job:
        """A job as the queue routes see it (status, result, cancel): everything but its input,
        which can be ~20 MB and is read only to run the job (``_dispatch_loop``). With ``key_id``,
        only a job submitted with that API key: another key's job is not found, as on fal, where
        request ids are private to their owner."""
        job = self._store.get(request_id, with_input=False)
        if job.app_id != app_id or (key_id is not None and job.key_id != key_id):
            raise NotFound(f"Request {request_id} not found")
        return job

    def status(self, job: Job, *, base_url: str, with_logs: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"status": wire_status(job.state), "request_id": job.request_id}
        out.update(urls(base_url, job))
        if job.state is JobState.QUEUED:
            out["queue_position"] = self._store.queue_position(job)
            return out
        out["logs"] = job.logs if with_logs else None
        if job.state.terminal:
            started = job.started_at or job.created_at
            out["metrics"] = {"inference_time": max(0.0, (job.completed_at or started) - started)}
            if job.error is not None:
                out["error"] = _error_message(job.error)
                out["error_type"] = _error_type(job.error)
        return out

    def result(self, job: Job) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status code, body, headers) of a finished request's result."""
        headers = {"x-fal-request-id": job.request_id}
        if job.state is JobState.SUCCEEDED and job.output is not None:
            return 200, job.output, headers
        if job.error is not None:
            error_type = _error_type(job.error)
            headers["X-Fal-Error-Type"] = error_type
            if error_type == StartTimeout.error_type:
                headers.update(StartTimeout().headers())
            return job.error_status or 500, job.error, headers
        return 400, {"detail": f"Request {job.request_id} is {wire_status(job.state)}"}, headers

    def cancel(self, job: Job) -> tuple[int, dict[str, str]]:
        if job.state.terminal:
            return 400, {"status": "ALREADY_COMPLETED"}
        running = self._running.get(job.request_id)
        if running is not None:
            running.cancel_requested = True
            running.cancel.set()  # the engine stops at the next denoising step
            running.task.cancel()
            return 202, {"status": "CANCELLATION_REQUESTED"}
        try:
            self._finish(job, JobState.CANCELED, error=RequestCancelled())
        except InvalidTransition:  # it finished in the meantime
            return 400, {"status": "ALREADY_COMPLETED"}
        return 202, {"status": "CANCELLATION_REQUESTED"}

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait until any job changes (True) or ``timeout`` passes (False)."""
        event = self._changed
        try:
            async with asyncio.timeout(timeout):  # not wait_for: see _dispatch_loop
                await event.wait()
        except TimeoutError:
            return False
        return True

    # -- dispatching --------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        next_expiry = 0.0
        while True:
            self._wake.clear()
            try:
                if self._orphaned:
                    requeued = self._store.requeue_running(exclude=self._running)
                    self._orphaned = False
                    logger.warning("requeued %d job(s) whose end could not be recorded", requeued)
                if self._clock() >= next_expiry:
                    expired = self._store.expire(self._clock() - self._settings.results_ttl_s)
                    if expired:
                        logger.info("expired %d finished job(s)", expired)
                    next_expiry = self._clock() + 600
                self._fail_overdue()
                free = self._settings.max_running_jobs - len(self._running)
                if free > 0:
                    for job in self._store.queued(free, exclude=self._running):
                        self._start(job)
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the queue waits, it does not die
                logger.error("job dispatch failed (%s: %s); retrying in 2 s", type(exc).__name__, exc)
                await asyncio.sleep(2.0)
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
            # arrives as the event is set (a job ending just as stop() cancels this loop), and the
            # loop then ran on and shutdown waited for it forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._wake.wait()

    def _fail_overdue(self) -> None:
        now = self._clock()
        for job in self._store.overdue(now):
            waited = now - job.created_at
            self._finish(job, JobState.FAILED, error=StartTimeout(f"Request did not start within {waited:.1f} s"))

    def _start(self, job: Job) -> None:
        job = self._store.transition(
            job,
            JobState.RUNNING,
            started_at=self._clock(),
            attempts=job.attempts + 1,
            logs=[*job.logs, log_entry("Generation started" + (" (retry)" if job.attempts else ""))],
        )
        cancel = threading.Event()
        task = asyncio.create_task(self._run(job, cancel), name=f"job-{job.request_id}")
        task.add_done_callback(self._check_recorded)
        self._running[job.request_id] = _Running(task, cancel)
        self._changed_now()

    def _check_recorded(self, task: asyncio.Task[None]) -> None:
        """A job whose end could not be stored (e.g. on a full disk) is still RUNNING in the
        store: the dispatcher queues it again, so it is neither lost nor stuck until a restart."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("%s: its outcome could not be recorded (%s); it will run again", task.get_name(), task.exception())
        self._orphaned = True
        self._wake.set()

    async def _run(self, job: Job, cancel: threading.Event) -> None:
        endpoint = BY_ID[job.endpoint_id]
        try:
            if job.input is None:  # never: the dispatcher reads queued jobs with their input
                raise RuntimeError(f"job {job.request_id} was started without its input")
            body = endpoint.input_model.model_validate(job.input)
            output = await self._generation.run(
                endpoint,
                body,
                base_url=job.base_url,
                priority=Priority.QUEUED,
                cancel=cancel,
                file_ttl_s=job.file_ttl_s,
            )
        except asyncio.CancelledError:
            running = self._running.get(job.request_id)
            if running is not None and running.cancel_requested:
                self._finish(job, JobState.CANCELED, error=RequestCancelled())
            raise
        except RequestCancelled as exc:
            self._finish(job, JobState.CANCELED, error=exc)
        except LivegenError as exc:
            self._finish(job, JobState.FAILED, error=exc)
        except ValidationError as exc:  # inputs stored before a schema change
            self._finish(job, JobState.FAILED, error=RequestValidationError(exc.errors()))
        except Exception:
            logger.exception("job failed request_id=%s", job.request_id)
            self._finish(job, JobState.FAILED, error=LivegenError())
        else:
            seconds = self._clock() - (job.started_at or job.created_at)
            self._finish(job, JobState.SUCCEEDED, output=output, message=f"Generated in {seconds:.2f} s")
        finally:
            self._running.pop(job.request_id, None)
            self._wake.set()

    def _finish(
        self,
        job: Job,
        state: JobState,
        *,
        output: dict[str, Any] | None = None,
        error: Exception | None = None,
        message: str | None = None,
    ) -> Job:
        status, body = _error_parts(error) if error is not None else (None, None)
        entry = log_entry(message or _error_message(body or {}), "INFO" if error is None else "ERROR")
        webhook = _webhook_body(job, output, status, body) if job.webhook_url else None
        done = self._store.transition(
            job,
            state,
            completed_at=self._clock(),
            output=output,
            error_status=status,
            error=body,
            logs=[*job.logs, entry],
            webhook_body=webhook,
        )
        logger.info("job %s request_id=%s", state.value, job.request_id)
        self._changed_now()
        if self._on_terminal is not None:
            self._on_terminal(done)
        return done

    def _changed_now(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        self._wake.set()


def urls(base_url: str, job: Job) -> dict[str, str]:
    root = f"{base_url}/queue/{job.app_id}/requests/{job.request_id}"
    return {"response_url": root, "status_url": root + "/status", "cancel_url": root + "/cancel"}


def _error_parts(error: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(error, LivegenError):
        return error.http_status, error_body(error)
    if isinstance(error, RequestValidationError):
        detail = [{"loc": list(e["loc"]), "msg": str(e["msg"]), "type": str(e["type"])} for e in error.errors()]
        return 422, {"detail": detail}
    return 500, {"detail": "Internal Server Error"}


def _error_message(body: dict[str, Any]) -> str:
    detail = body.get("detail")
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail or "")


def _error_type(body: dict[str, Any]) -> str:
    if isinstance(body.get("detail"), list):
        return "validation_error"
    return str(body.get("error_type", "internal_error"))


def _webhook_body(job: Job, output: dict[str, Any] | None, status: int | None, error: dict[str, Any] | None) -> bytes:
    payload: dict[str, Any] = {"request_id": job.request_id, "gateway_request_id": job.request_id}
    if error is None:
        payload.update(status="OK", payload=output)
    else:
        payload.update(status="ERROR", error=f"Invalid status code: {status}", payload=error)
    return json.dumps(payload).encode()
