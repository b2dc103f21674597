"""The errors livegen raises on purpose, each with its wire identity.

    LivegenError                      500 internal_error (never shown verbatim)
     ├── InvalidInput (ValueError)    422 a field's value is wrong; carries ``loc``
     │    ├── InvalidImage            422 an image input cannot be used
     │    └── FetchRefused            422 a URL input may not or could not be fetched
     ├── BadRequest                   400 a request livegen cannot route (e.g. a bad x-fal-target-url)
     ├── PayloadTooLarge              413 a body or an inline file over its cap
     ├── Unauthorized                 401 no key, or a key we do not know
     ├── Forbidden                    403 a key or token without the right to this app
     ├── NotFound                     404 unknown path, request id or file
     ├── QueueFull                    429 admission refused; retry later
     ├── RequestCancelled             499 the caller cancelled the request
     ├── StartTimeout                 504 the request could not start within X-Fal-Request-Timeout
     ├── InvalidTransition (RuntimeError)  a job state change the table does not allow (a bug)
     ├── ModelUnavailable             503 a model that cannot be loaded or is not served
     ├── ServerFull                   503 more realtime sessions than the server takes
     ├── Overloaded                   503 more sync requests in flight than the server admits
     ├── GpuOutOfMemory               503 the device ran out of memory for this work
     ├── ShuttingDown                 503 the server is draining (SIGTERM); retry the request
     └── StorageUnavailable           503 the data dir cannot be written (read-only, I/O error)
          └── StorageFull             507 the data dir's disk (or a file size limit) is full

Every class declares ``http_status`` and ``error_type``. ``server/errors.py`` renders them in
fal's shapes (``error_body``): 422 as ``{"detail": [{"loc", "msg", "type"}]}`` so both clients
raise their validation errors, everything else as ``{"detail": str, "error_type": str}``.
For 401, 403 and 5xx the class's fixed ``public_message`` goes on the wire unless the raiser
gave a message meant for users (``public=True``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class LivegenError(Exception):
    http_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    public_message: ClassVar[str] = "Internal Server Error"
    # Whether str(exc) may go on the wire. True for 4xx below 500 except 401/403 by default.
    message_is_public: ClassVar[bool] = False

    def __init__(self, message: str | None = None, *, public: bool | None = None) -> None:
        super().__init__(message or self.public_message)
        self.message = message or self.public_message
        self._public = self.message_is_public if public is None else public

    @property
    def wire_message(self) -> str:
        return self.message if self._public else self.public_message

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(LivegenError, ValueError):
    http_status = 422
    error_type = "invalid_input"
    public_message = "Invalid input"
    message_is_public = True
    validation_type: ClassVar[str] = "value_error"

    def __init__(self, message: str, *, loc: tuple[str | int, ...] = ("body",)) -> None:
        super().__init__(message)
        self.loc = loc

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": list(self.loc), "msg": self.message, "type": self.validation_type}]


class InvalidImage(InvalidInput):
    error_type = "invalid_image"
    validation_type = "image_load_error"


class FetchRefused(InvalidInput):
    error_type = "file_download_error"
    validation_type = "file_download_error"


class BadRequest(LivegenError):
    http_status = 400
    error_type = "bad_request"
    public_message = "Bad request"
    message_is_public = True


class PayloadTooLarge(LivegenError):
    http_status = 413
    error_type = "payload_too_large"
    public_message = "Payload too large"
    message_is_public = True


class Unauthorized(LivegenError):
    http_status = 401
    error_type = "unauthorized"
    public_message = "Unauthorized: pass 'Authorization: Key <your livegen API key>'"


class Forbidden(LivegenError):
    http_status = 403
    error_type = "forbidden"
    public_message = "Forbidden"


class NotFound(LivegenError):
    http_status = 404
    error_type = "not_found"
    public_message = "Not found"
    message_is_public = True


class QueueFull(LivegenError):
    http_status = 429
    error_type = "queue_full"
    public_message = "Too many requests queued; retry later"
    message_is_public = True

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class RequestCancelled(LivegenError):
    http_status = 499
    error_type = "request_cancelled"
    public_message = "The request was cancelled"
    message_is_public = True


class StartTimeout(LivegenError):
    """fal's ``startup_timeout``: the caller's ``X-Fal-Request-Timeout`` passed before it started."""

    http_status = 504
    error_type = "startup_timeout"
    public_message = "The request did not start within the requested timeout"
    message_is_public = True

    def headers(self) -> dict[str, str]:
        return {"X-Fal-Request-Timeout-Type": "user"}


class InvalidTransition(LivegenError, RuntimeError):
    error_type = "internal_error"


class ModelUnavailable(LivegenError):
    """A model that is not served here, or that failed to load. Its message names the model."""

    http_status = 503
    error_type = "model_unavailable"
    public_message = "Model unavailable"
    message_is_public = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "30"}


class ServerFull(LivegenError):
    """More realtime sessions than ``max_sessions``: refused at the handshake."""

    http_status = 503
    error_type = "too_many_sessions"
    public_message = "The server is at its realtime session limit; retry later"
    message_is_public = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class Overloaded(LivegenError):
    """More sync requests (run, stream) admitted and unfinished than ``max_pending_sync``:
    refused at once, so overload costs callers a quick retry instead of an ever longer wait."""

    http_status = 503
    error_type = "server_overloaded"
    public_message = "The server is at its limit of requests in flight; retry later"
    message_is_public = True

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class GpuOutOfMemory(LivegenError):
    http_status = 503
    error_type = "gpu_out_of_memory"
    public_message = "The device ran out of memory for this request; retry with fewer or smaller images"
    message_is_public = False

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class ShuttingDown(LivegenError):
    """The server is draining after SIGTERM: new realtime sessions are refused, and a request
    the drain timeout cuts off gets this instead of a bare 500."""

    http_status = 503
    error_type = "shutting_down"
    public_message = "The server is shutting down; retry the request"
    message_is_public = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class StorageUnavailable(LivegenError):
    """The data dir cannot be written (read-only filesystem, I/O error): nothing was stored."""

    http_status = 503
    error_type = "storage_unavailable"
    public_message = "The server's storage cannot be written right now; nothing was stored"
    message_is_public = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "60"}


class StorageFull(StorageUnavailable):
    """The data dir's disk (or a file size limit) is full: nothing was stored."""

    http_status = 507
    error_type = "storage_full"
    public_message = "The server's disk is full; nothing was stored"


def error_body(exc: LivegenError) -> dict[str, Any]:
    """fal's error body for ``exc`` (see the module docstring)."""
    if isinstance(exc, InvalidInput):
        return {"detail": exc.detail()}
    return {"detail": exc.wire_message, "error_type": exc.error_type}
