"""``{BASE}/rest/storage/...`` (fal's rest.fal.ai storage): key-authenticated upload set-up.

* ``POST /rest/storage/auth/token?storage_type=fal-cdn-v3``: a CDN token for Python's
  ``fal_v3`` uploads to ``{BASE}/cdn``.
* ``POST /rest/storage/upload/initiate?storage_type=gcs|fal-cdn-v3``: a one-shot signed upload
  (Python's ``fal`` repository, the JS client).
* ``POST /rest/storage/upload/initiate-multipart?storage_type=fal-cdn-v3``: the JS client's
  multipart upload (files over 90 MB).

The upload targets themselves live under ``/cdn`` (``routes/files.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from livegen.server import deps, tokens
from livegen.server.storage import check_content_type, file_url
from livegen.server.uploads import UploadKind, UploadService

router = APIRouter(prefix="/rest/storage", tags=["storage"])

StorageType = Literal["gcs", "fal-cdn-v3"]


class InitiateRequest(BaseModel):
    file_name: str = Field(default="upload.bin", max_length=10_000)
    content_type: str | None = Field(default=None, max_length=1_000)


@router.post("/auth/token")
async def cdn_token(
    key_id: deps.KeyDep,
    signer: deps.TokensDep,
    settings: deps.SettingsDep,
    base_url: deps.BaseUrlDep,
    storage_type: Literal["fal-cdn-v3"] = "fal-cdn-v3",
) -> dict[str, str]:
    """A token for ``Authorization: Bearer`` on ``{base_url}/files/upload*``.

    ``expires_at`` is ISO 8601 with an offset (fal-client compares it with an aware datetime)
    and a little early, so the client refreshes before the server would refuse the token.
    """
    ttl = settings.max_token_ttl_s
    token, expires = signer.mint(tokens.CDN, key_id, ttl_s=ttl)
    reported = int(expires) - min(60, ttl // 10)
    return {
        "token": token,
        "token_type": "Bearer",
        "base_url": f"{base_url}/cdn",
        "expires_at": datetime.fromtimestamp(reported, tz=UTC).isoformat(),
    }


@router.post("/upload/initiate")
async def initiate(
    body: InitiateRequest,
    key_id: deps.KeyDep,
    uploads: deps.UploadsDep,
    base_url: deps.BaseUrlDep,
    file_ttl_s: deps.FileTtlDep,
    storage_type: StorageType = "gcs",
) -> dict[str, str]:
    """``upload_url`` takes one PUT of the whole file; ``file_url`` serves it afterwards."""
    return _initiate(uploads, UploadKind.SINGLE, body, key_id, base_url, file_ttl_s)


@router.post("/upload/initiate-multipart")
async def initiate_multipart(
    body: InitiateRequest,
    key_id: deps.KeyDep,
    uploads: deps.UploadsDep,
    base_url: deps.BaseUrlDep,
    file_ttl_s: deps.FileTtlDep,
    storage_type: StorageType = "fal-cdn-v3",
) -> dict[str, str]:
    """Parts go to ``{upload_url}/{n}``, then ``POST {upload_url}/complete`` with the parts."""
    return _initiate(uploads, UploadKind.MULTIPART, body, key_id, base_url, file_ttl_s)


def _initiate(
    uploads: UploadService,
    kind: UploadKind,
    body: InitiateRequest,
    key_id: str,
    base_url: str,
    file_ttl_s: float | None,
) -> dict[str, str]:
    upload = uploads.initiate(
        kind,
        key_id=key_id,
        file_name=body.file_name,
        content_type=check_content_type(body.content_type),
        file_ttl_s=file_ttl_s,
    )
    return {
        "upload_url": f"{base_url}/cdn/uploads/{upload.upload_id}",
        "file_url": file_url(base_url, upload.file_id, upload.file_name),
    }
