"""``{BASE}/cdn/...`` (fal's v3 CDN): files served back, and the routes that receive bytes.

* ``GET /cdn/files/{file_id}/{file_name}``: unauthenticated, byte-identical, with the exact
  content type given at upload, ``nosniff`` and a sandboxing Content-Security-Policy.
* Python ``fal_v3`` (CDN token, ``Authorization: Bearer``): ``POST /cdn/files/upload``; for
  files over 100 MB ``POST /cdn/files/upload/multipart``, then part PUTs and ``/complete``
  below the returned ``access_url`` (the file's own URL).
* Signed-upload targets handed out by ``/rest/storage/upload/initiate*``:
  ``PUT /cdn/uploads/{upload_id}`` (the whole body), or, for a multipart upload,
  ``PUT /cdn/uploads/{upload_id}/{part_number}`` and ``POST /cdn/uploads/{upload_id}/complete``.
  No auth: the random upload id is the credential (the JS client sends none; Python sends its
  key, which is ignored). Query strings are ignored, so a client may re-append one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from livegen.protocol.errors import InvalidInput, NotFound
from livegen.server import deps
from livegen.server.storage import check_content_type, file_url
from livegen.server.uploads import MAX_PARTS, PartRef, UploadKind, UploadService

router = APIRouter(prefix="/cdn", tags=["files"])

# Images and media still display when opened directly; nothing in a file can script or load.
FILE_CSP = "default-src 'none'; img-src 'self' data:; media-src 'self'; style-src 'unsafe-inline'; sandbox"


class Part(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    part_number: int = Field(alias="partNumber", ge=1, le=MAX_PARTS)
    etag: str = Field(max_length=100)


class CompleteRequest(BaseModel):
    parts: list[Part] = Field(min_length=1, max_length=MAX_PARTS)

    def refs(self) -> list[PartRef]:
        return [PartRef(p.part_number, p.etag) for p in self.parts]


# GET and HEAD as two routes: one route with both methods gives both the same OpenAPI operationId.
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file, with the content type given at upload", "content": {"*/*": {}}}
}


@router.get("/files/{file_id}/{file_name}", response_class=Response, responses=FILE_RESPONSES)
@router.head("/files/{file_id}/{file_name}", response_class=Response, responses=FILE_RESPONSES)
async def get_file(file_id: str, file_name: str, store: deps.FilesDep) -> FileResponse:
    stored = await anyio.to_thread.run_sync(store.get, file_id)
    cacheable_s = max(0, min(86400, int(stored.expires_at - time.time())))  # no cache keeps it past its time
    # content-type as a header, not media_type: Starlette would append "; charset=utf-8" to text/*.
    return FileResponse(
        stored.path,
        headers={
            "Content-Type": stored.content_type,
            "X-Content-Type-Options": "nosniff",
            # Uploads share an origin with the playground (unlike fal's separate CDN host): an
            # uploaded HTML or SVG file opened in a browser must not run scripts as this origin.
            "Content-Security-Policy": FILE_CSP,
            "Cache-Control": f"public, max-age={cacheable_s}, immutable",
        },
    )


# -- Python fal_v3 ------------------------------------------------------------------------------


@router.post("/files/upload")
async def cdn_upload(
    request: Request,
    key_id: deps.CdnKeyDep,
    uploads: deps.UploadsDep,
    base_url: deps.BaseUrlDep,
    file_ttl_s: deps.FileTtlDep,
) -> dict[str, str]:
    stored = await uploads.receive_file(
        _body(request),
        declared_length=request.headers.get("content-length"),
        content_type=_content_type(request),
        file_name=request.headers.get("x-fal-file-name"),
        file_ttl_s=file_ttl_s,
    )
    return {"access_url": stored.url(base_url)}


@router.post("/files/upload/multipart")
async def cdn_multipart_create(
    request: Request,
    key_id: deps.CdnKeyDep,
    uploads: deps.UploadsDep,
    base_url: deps.BaseUrlDep,
    file_ttl_s: deps.FileTtlDep,
) -> dict[str, str]:
    upload = uploads.initiate(
        UploadKind.MULTIPART,
        key_id=key_id,
        file_name=request.headers.get("x-fal-file-name"),
        content_type=_content_type(request),
        file_ttl_s=file_ttl_s,
    )
    return {"access_url": file_url(base_url, upload.file_id, upload.file_name), "uploadId": upload.upload_id}


@router.put("/files/{file_id}/{file_name}/multipart/{upload_id}/{part_number}")
async def cdn_multipart_part(
    request: Request, file_id: str, upload_id: str, part_number: int, key_id: deps.CdnKeyDep, uploads: deps.UploadsDep
) -> JSONResponse:
    _check_owner(uploads, upload_id, file_id, key_id)
    return await _put_part(request, uploads, upload_id, part_number)


@router.post("/files/{file_id}/{file_name}/multipart/{upload_id}/complete")
async def cdn_multipart_complete(
    file_id: str,
    upload_id: str,
    body: CompleteRequest,
    key_id: deps.CdnKeyDep,
    uploads: deps.UploadsDep,
    base_url: deps.BaseUrlDep,
) -> dict[str, str]:
    _check_owner(uploads, upload_id, file_id, key_id)
    stored = await uploads.complete(upload_id, body.refs())
    return {"access_url": stored.url(base_url)}


# -- signed-upload targets (JS, and Python's "fal" repository) ---------------------------------


@router.put("/uploads/{upload_id}")
async def put_upload(
    request: Request, upload_id: str, uploads: deps.UploadsDep, base_url: deps.BaseUrlDep
) -> dict[str, str]:
    stored = await uploads.put_single(upload_id, _body(request), declared_length=request.headers.get("content-length"))
    return {"file_url": stored.url(base_url)}


@router.put("/uploads/{upload_id}/{part_number}")
async def put_upload_part(request: Request, upload_id: str, part_number: int, uploads: deps.UploadsDep) -> JSONResponse:
    return await _put_part(request, uploads, upload_id, part_number)


@router.post("/uploads/{upload_id}/complete")
async def complete_upload(
    upload_id: str, body: CompleteRequest, uploads: deps.UploadsDep, base_url: deps.BaseUrlDep
) -> dict[str, str]:
    stored = await uploads.complete(upload_id, body.refs())
    return {"file_url": stored.url(base_url)}


# -- helpers ------------------------------------------------------------------------------------


async def _put_part(request: Request, uploads: UploadService, upload_id: str, part_number: int) -> JSONResponse:
    etag = await uploads.put_part(
        upload_id, part_number, _body(request), declared_length=request.headers.get("content-length")
    )
    # fal-client reads the ETag header; the JS client reads the JSON body.
    return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": f'"{etag}"'})


def _check_owner(uploads: UploadService, upload_id: str, file_id: str, key_id: str) -> None:
    upload = uploads.get(upload_id, UploadKind.MULTIPART)
    if upload.file_id != file_id or upload.key_id != key_id:
        raise NotFound(f"no multipart upload {upload_id!r} for this file")


def _content_type(request: Request) -> str:
    return check_content_type(request.headers.get("content-type"), loc=("header", "content-type"))


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect as exc:
        raise InvalidInput("the client went away before the upload ended") from exc
