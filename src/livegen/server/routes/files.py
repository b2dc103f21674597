"""Files served back unauthenticated at ``/cdn/files/{file_id}/{file_name}`` (fal's v3 CDN)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from livegen.server import deps

router = APIRouter(prefix="/cdn", tags=["files"])


@router.get("/files/{file_id}/{file_name}")
async def get_file(file_id: str, file_name: str, store: deps.FilesDep) -> FileResponse:
    stored = store.get(file_id)
    return FileResponse(
        stored.path,
        media_type=stored.content_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=86400, immutable"},
    )
