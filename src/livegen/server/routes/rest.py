"""``{BASE}/rest/...`` (fal's rest.fal.ai): realtime tokens and the webhook JWKS."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from livegen.protocol.apps import ENDPOINTS
from livegen.protocol.errors import InvalidInput
from livegen.server import deps, tokens

router = APIRouter(prefix="/rest", tags=["rest"])

KNOWN_ALIASES = sorted({e.alias for e in ENDPOINTS})


class TokenRequest(BaseModel):
    allowed_apps: list[str] = Field(min_length=1, max_length=16)
    token_expiration: int = Field(default=120, ge=1, description="Seconds; capped by the server's setting")


@router.post("/tokens/")
async def create_token(
    body: TokenRequest,
    key_id: Annotated[str, Depends(deps.require_key)],
    signer: deps.TokensDep,
    settings: deps.SettingsDep,
) -> str:
    """A short-lived token for the realtime WebSocket, scoped to ``allowed_apps`` (aliases).

    Answered as a bare JSON string, which is what both official clients expect.
    """
    unknown = [a for a in body.allowed_apps if a.split("/")[-1] not in KNOWN_ALIASES]
    if unknown:
        raise InvalidInput(f"unknown app(s) {unknown}; known: {KNOWN_ALIASES}", loc=("body", "allowed_apps"))
    apps = tuple(a.split("/")[-1] for a in body.allowed_apps)
    ttl = min(body.token_expiration, settings.max_token_ttl_s)
    token, _ = signer.mint(tokens.REALTIME, key_id, ttl_s=ttl, apps=apps)
    return token


@router.get("/.well-known/jwks.json")
async def jwks(request: Request) -> dict[str, Any]:
    """The Ed25519 keys webhook signatures verify against (public, no key needed)."""
    keys: dict[str, Any] = request.app.state.webhook_signer.jwks()
    return keys
