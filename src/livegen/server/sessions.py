"""A realtime session: latest frame wins, output is bounded, one task writes.

Three tasks per WebSocket:

- the reader decodes msgpack frames into the inbox, a ``deque(maxlen=max_buffering)``: when it
  is full the oldest frame falls off (counted as dropped), so a client sending faster than the
  device renders gets the newest frames, never a growing backlog;
- the worker takes frames from the inbox one at a time (so results keep their order), at most
  ``max_fps`` per second, validates them, hands them to the engine at realtime priority (the
  engine batches them with other sessions' frames) and puts the results in the outbox. A frame
  handed to the engine still counts as waiting until the engine puts it in a batch: when a frame
  arrives and the inbox and that frame together already hold ``max_buffering``, the frame in the
  engine is the oldest and is superseded there, by the inbox's oldest, which takes its place in
  the engine's line. So a busy engine's batches carry each session's newest frames, not the ones
  that were newest when the engine last had room;
- the writer is the only task that sends. The outbox holds ``2 * max_buffering`` messages; when
  a client stops reading, the writer blocks, the outbox fills, the worker waits and the inbox
  keeps only the newest frames: memory stays bounded and other sessions are unaffected.

Control messages follow fal: ``x-fal-message`` timings after each result, ``x-fal-error`` for
bad frames (the session stays open), ``TIMEOUT`` after ``session_timeout_s`` without input and
then a normal close (1000). When the server shuts down (SIGTERM) each session is closed at once
with 1012 (service restart) and a reason; the client reconnects to a server that is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgpack
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from livegen.engine import GenerationRequest, GenerationResult, Priority
from livegen.protocol.apps import Endpoint
from livegen.protocol.errors import (
    InvalidInput,
    LivegenError,
    ModelUnavailable,
    PayloadTooLarge,
    QueueFull,
)
from livegen.server.generation import GenerationService, abandon
from livegen.server.metrics import Metrics
from livegen.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    payload: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class _Prepared:
    """A validated frame and its engine request."""

    frame: Frame
    body: BaseModel
    request: GenerationRequest


@dataclass(frozen=True)
class Outgoing:
    data: bytes | str | None  # None: close the connection after what came before (1000, or stop()'s code)


def error_code(exc: LivegenError) -> str:
    if isinstance(exc, InvalidInput):
        return "INVALID_INPUT"
    if isinstance(exc, PayloadTooLarge):
        return "PAYLOAD_TOO_LARGE"
    if isinstance(exc, ModelUnavailable):
        return "MODEL_UNAVAILABLE"
    if isinstance(exc, QueueFull):
        return "OVERLOADED"
    return "INTERNAL_ERROR"


def error_message(code: str, reason: str) -> str:
    return json.dumps({"type": "x-fal-error", "error": code, "reason": reason})


def validation_reason(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "input"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


class Session:
    def __init__(
        self,
        websocket: WebSocket,
        endpoint: Endpoint,
        input_model: type[BaseModel],
        service: GenerationService,
        settings: Settings,
        metrics: Metrics,
        *,
        max_buffering: int,
        base_url: str,
    ) -> None:
        self._ws = websocket
        self._endpoint = endpoint
        self._input_model = input_model
        self._service = service
        self._settings = settings
        self._metrics = metrics
        self._base_url = base_url
        # Frames, and frames already prepared (a swap that lost its race to a batch, see
        # _generate_newest): those are not validated and decoded a second time.
        self._inbox: deque[Frame | _Prepared] = deque(maxlen=max_buffering)
        self._inbox_ready = asyncio.Event()
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=2 * max_buffering)
        self.received = self.dropped = self.results = self.errors = 0
        self._busy = False
        self._frame_done = asyncio.Event()  # set each time the worker finishes a frame
        # The engine's future for the frame handed to it, while it may still wait for a batch;
        # set by the reader when a newer frame supersedes it (see _accept).
        self._waiting: Future[GenerationResult] | None = None
        self._supersede = asyncio.Event()
        self._last_activity = time.monotonic()
        self._close_code, self._close_reason = 1000, ""
        self._stopped = asyncio.Event()
        self._finishing: asyncio.Task[None] | None = None

    def stop(self, code: int, reason: str, *, finish_frame_s: float = 0.0) -> None:
        """Close from outside with ``code`` and why. At once (shutdown, revocation: the frame in
        flight is dropped), or with ``finish_frame_s`` (token expiry): frames still waiting are
        dropped and new ones refused, but the frame being rendered gets its result (and timings)
        sent first, if it is done within that many seconds."""
        self._close_code, self._close_reason = code, reason
        if finish_frame_s <= 0 or not self._busy:
            self._stopped.set()
        elif self._finishing is None:
            self._finishing = asyncio.create_task(self._finish_then_close(finish_frame_s))

    async def _finish_then_close(self, grace_s: float) -> None:
        self.dropped += len(self._inbox)
        self._metrics.realtime_frames.labels("dropped").inc(len(self._inbox))
        self._inbox.clear()
        if self._busy:
            self._frame_done.clear()
            try:
                await asyncio.wait_for(self._frame_done.wait(), grace_s)
            except TimeoutError:
                self._stopped.set()  # out of time: as an immediate stop
                return
        await self._outbox.put(Outgoing(None))  # the writer sends what came before, then closes

    async def run(self) -> None:
        await self._ws.accept()
        started = time.monotonic()
        tasks = [
            asyncio.create_task(self._read_loop(), name="realtime-reader"),
            asyncio.create_task(self._work_loop(), name="realtime-worker"),
            asyncio.create_task(self._write_loop(), name="realtime-writer"),
            asyncio.create_task(self._stopped.wait(), name="realtime-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    logger.error("realtime session task failed", exc_info=task.exception())
        finally:
            if self._finishing is not None:
                tasks.append(self._finishing)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._ws.close(self._close_code, self._close_reason or None)
            logger.info(
                "realtime session closed endpoint=%s s=%.1f frames=%d dropped=%d results=%d errors=%d",
                self._endpoint.endpoint_id,
                time.monotonic() - started,
                self.received,
                self.dropped,
                self.results,
                self.errors,
            )

    # -- reader -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Returns when the client goes away, or after the idle timeout has been announced."""
        while True:
            try:
                async with asyncio.timeout(max(0.05, self._idle_left())):  # not wait_for: it can swallow a cancel
                    message = await self._ws.receive()
            except TimeoutError:
                if self._busy or self._idle_left() > 0:
                    continue  # a frame is still being rendered: the session is not idle
                await self._send_error("TIMEOUT", "no inputs, reconnect when needed!", close=True)
                await asyncio.Event().wait()  # the writer closes; wait to be cancelled
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                await self._send_error("INVALID_INPUT", "send each input as one binary msgpack frame")
                continue
            if len(data) > self._settings.max_ws_message_bytes:
                limit = self._settings.max_ws_message_bytes
                await self._send_error("PAYLOAD_TOO_LARGE", f"a frame may hold at most {limit} bytes, got {len(data)}")
                continue
            try:
                payload = msgpack.unpackb(data, raw=False)
            except Exception:  # noqa: BLE001 - msgpack raises several unrelated types
                await self._send_error("INVALID_INPUT", "the frame is not valid msgpack")
                continue
            if not isinstance(payload, dict):
                await self._send_error("INVALID_INPUT", "the frame must be a msgpack map of input fields")
                continue
            self._accept(Frame(payload, time.perf_counter()))

    def _idle_left(self) -> float:
        """Seconds until the session counts as idle: ``session_timeout_s`` after the last input
        or result, whichever came later."""
        return self._last_activity + self._settings.session_timeout_s - time.monotonic()

    def _accept(self, frame: Frame) -> None:
        self._last_activity = time.monotonic()
        self.received += 1
        self._metrics.realtime_frames.labels("received").inc()
        if self._finishing is not None:  # closing: only the frame in flight is still answered
            self._count_dropped()
            return
        if len(self._inbox) == self._inbox.maxlen:
            self._count_dropped()  # the oldest waiting frame is superseded
        elif len(self._inbox) + 1 == self._inbox.maxlen and self._waiting_in_engine():
            self._supersede.set()  # the frame waiting in the engine is the oldest: the worker swaps it
        self._inbox.append(frame)
        self._inbox_ready.set()

    def _count_dropped(self) -> None:
        self.dropped += 1
        self._metrics.realtime_frames.labels("dropped").inc()

    def _waiting_in_engine(self) -> bool:
        waiting = self._waiting
        return waiting is not None and not waiting.running() and not waiting.done()

    # -- worker -------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        min_interval = 1.0 / self._settings.max_session_fps
        next_start = 0.0
        while True:
            while not self._inbox:
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            wait = next_start - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the frame rate cap; newer frames may replace this one
                if not self._inbox:
                    continue
            next_start = time.monotonic() + min_interval
            self._busy = True
            try:
                await self._process(self._inbox.popleft())
            finally:
                self._busy = False
                self._frame_done.set()
                self._last_activity = time.monotonic()

    async def _process(self, item: Frame | _Prepared) -> None:
        prepared = await self._prepare(item)
        if prepared is None:
            return
        try:
            prepared, result = await self._generate_newest(prepared)
            output = await self._service.render(
                result,
                prepared.body,
                base_url=self._base_url,
                as_bytes=getattr(prepared.body, "image_bytes", None) is not None,
            )
        except LivegenError as exc:
            await self._send_failure(exc)
            return
        frame = prepared.frame
        request_id = frame.payload.get("request_id")
        if request_id:
            output["request_id"] = request_id
        self.results += 1
        self._metrics.realtime_frames.labels("result").inc()
        await self._outbox.put(Outgoing(msgpack.packb(output, use_bin_type=True)))
        timing = time.perf_counter() - frame.received_at
        await self._outbox.put(Outgoing(json.dumps({"type": "x-fal-message", "action": "timings", "timing": timing})))

    async def _prepare(self, item: Frame | _Prepared) -> _Prepared | None:
        """Validate a frame and build its engine request; None when it was bad (its error sent)."""
        if isinstance(item, _Prepared):
            return item
        frame = item
        try:
            body = self._input_model.model_validate(frame.payload)
        except ValidationError as exc:
            await self._send_error("INVALID_INPUT", validation_reason(exc))
            return None
        try:
            request = await self._service.prepare(
                self._endpoint, body, base_url=self._base_url, priority=Priority.REALTIME
            )
        except LivegenError as exc:
            await self._send_failure(exc)
            return None
        return _Prepared(frame, body, request)

    async def _generate_newest(self, prepared: _Prepared) -> tuple[_Prepared, GenerationResult]:
        """Hand ``prepared`` to the engine and wait for its result. While it waits for a batch, a
        newer frame the buffer has no room for (``_accept``) takes its place in the engine: the
        result returned is the frame that was rendered."""
        future = self._service.submit(prepared.request)
        try:
            while True:
                self._waiting = future
                if len(self._inbox) < (self._inbox.maxlen or 1):
                    self._supersede.clear()
                else:  # frames came while the last swap was made: the buffer is over again
                    self._supersede.set()
                result = asyncio.wrap_future(future)
                swap = asyncio.ensure_future(self._supersede.wait())
                try:
                    await asyncio.wait((result, swap), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    swap.cancel()
                if result.done() or not self._inbox:
                    break
                newer = await self._prepare(self._inbox.popleft())
                if newer is None:
                    continue  # a bad frame supersedes nothing
                replaced = self._service.replace(future, newer.request)
                if replaced is None:  # in a batch meanwhile: the newer frame waits its turn
                    if len(self._inbox) == self._inbox.maxlen:
                        self._count_dropped()  # newer frames came meanwhile: it is the oldest
                    else:
                        self._inbox.appendleft(newer)  # as prepared: its input is not decoded again
                    break
                self._count_dropped()  # the frame that waited in the engine is superseded
                prepared, future = newer, replaced
            self._waiting = None  # started or done: nothing more supersedes it
            return prepared, await result
        except asyncio.CancelledError:
            abandon(future, prepared.request)  # the session is closing
            raise
        finally:
            self._waiting = None

    async def _send_failure(self, exc: LivegenError) -> None:
        """A frame's failure as ``x-fal-error``; an internal one also closes the session."""
        await self._send_error(error_code(exc), exc.wire_message, close=error_code(exc) == "INTERNAL_ERROR")

    async def _send_error(self, code: str, reason: str, *, close: bool = False) -> None:
        self.errors += 1
        self._metrics.realtime_frames.labels("error").inc()
        await self._outbox.put(Outgoing(error_message(code, reason)))
        if close:
            await self._outbox.put(Outgoing(None))

    # -- writer -------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            if item.data is None:
                await self._ws.close(self._close_code, self._close_reason or None)
                return
            try:
                if isinstance(item.data, bytes):
                    await self._ws.send_bytes(item.data)
                else:
                    await self._ws.send_text(item.data)
            except (WebSocketDisconnect, RuntimeError):
                return
