"""FastAPI dependencies shared by the routes: the services on app.state, the caller's key,
and the public base URL that returned file URLs start with.

FastAPI runs a plain ``def`` dependency in its thread pool, one hop per dependency per request
(about 60 us each on a small CPU, BENCHMARKS.md session 20): the ones that only read
``app.state`` or headers are ``async def`` and run inline; the ones that query SQLite (keys,
jobs) stay ``def``, so a slow disk never stalls the event loop."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from livegen.protocol.errors import Unauthorized
from livegen.server.auth import KeyStore, parse_authorization
from livegen.server.generation import GenerationService
from livegen.server.jobs.service import JobService
from livegen.server.storage import FileStore, requested_ttl
from livegen.server.tokens import CDN, REALTIME, TokenSigner
from livegen.server.uploads import UploadService
from livegen.settings import Settings


async def settings(request: Request) -> Settings:
    s: Settings = request.app.state.settings
    return s


async def generation(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.generation
    return service


async def files(request: Request) -> FileStore:
    store: FileStore = request.app.state.files
    return store


async def jobs(request: Request) -> JobService:
    service: JobService = request.app.state.jobs
    return service


async def token_signer(request: Request) -> TokenSigner:
    signer: TokenSigner = request.app.state.tokens
    return signer


def require_key(request: Request) -> str:
    """The id of the caller's API key (``Authorization: Key <key>``), else 401."""
    keys: KeyStore = request.app.state.keys
    return keys.verify(parse_authorization(request.headers.get("authorization")))


def key_or_token(state: Any, token: str | None, authorization: str | None, *, app: str) -> tuple[str, float | None]:
    """The caller's API key id, from a realtime token valid for ``app`` (an alias: what fal's
    clients send as ``?fal_jwt_token=``) or else from ``Authorization: Key``; and how many
    seconds the credentials stay valid (a token's remaining lifetime; None for a key)."""
    keys: KeyStore = state.keys
    if token:
        signer: TokenSigner = state.tokens
        claims = signer.verify(token, REALTIME, app=app)
        if not keys.is_active(claims.key_id):
            raise Unauthorized("the API key this token was issued for has been revoked", public=True)
        return claims.key_id, signer.seconds_left(claims)
    if authorization:
        return keys.verify(parse_authorization(authorization)), None
    raise Unauthorized("pass ?fal_jwt_token= (from POST /rest/tokens/) or an 'Authorization: Key' header", public=True)


async def uploads(request: Request) -> UploadService:
    service: UploadService = request.app.state.uploads
    return service


def require_cdn_token(request: Request) -> str:
    """The key id behind a CDN upload token (``Authorization: Bearer <token>``), else 401."""
    scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("pass 'Authorization: Bearer <token from /rest/storage/auth/token>'", public=True)
    signer: TokenSigner = request.app.state.tokens
    key_id = signer.verify(token.strip(), CDN).key_id
    keys: KeyStore = request.app.state.keys
    if not keys.is_active(key_id):
        raise Unauthorized("the API key this token was issued for has been revoked", public=True)
    return key_id


def rate_limited_key(request: Request) -> str:
    """``require_key``, then the key's rate limit (429 with Retry-After beyond it)."""
    key_id = require_key(request)
    request.app.state.rate_limiter.check(key_id)
    return key_id


async def file_ttl(request: Request) -> float | None:
    """The lifetime the request asks for the files it stores (fal's lifecycle headers), or None."""
    return requested_ttl(request.headers)


async def base_url(request: Request) -> str:
    configured: str = request.app.state.settings.public_url
    if configured:
        return configured.rstrip("/")
    return str(request.base_url).rstrip("/")


GenerationDep = Annotated[GenerationService, Depends(generation)]
FilesDep = Annotated[FileStore, Depends(files)]
BaseUrlDep = Annotated[str, Depends(base_url)]
FileTtlDep = Annotated[float | None, Depends(file_ttl)]
SettingsDep = Annotated[Settings, Depends(settings)]
TokensDep = Annotated[TokenSigner, Depends(token_signer)]
JobsDep = Annotated[JobService, Depends(jobs)]
KeyDep = Annotated[str, Depends(require_key)]
UploadsDep = Annotated[UploadService, Depends(uploads)]
CdnKeyDep = Annotated[str, Depends(require_cdn_token)]
RateLimitedKeyDep = Annotated[str, Depends(rate_limited_key)]
