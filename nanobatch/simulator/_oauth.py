"""A minimal OAuth2 token endpoint, so google-auth's service-account credentials can get a real token.

``POST /token`` takes the JWT-bearer grant google-auth sends (``grant_type=urn:ietf:params:oauth:grant-type:
jwt-bearer&assertion=<JWT>``) and answers ``{"access_token", "expires_in", "token_type"}``. The assertion's
signature is not checked (the simulator knows no public keys); its shape and claims are.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import urllib.parse
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["JWT_BEARER", "TokenIssuer"]

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME_S = 3600


class TokenIssuer:
    """Issues access tokens and tells whether one it issued is still valid (by the app's clock)."""

    def __init__(self, clock: Callable[[], float], lifetime_s: float = TOKEN_LIFETIME_S) -> None:
        self._clock = clock
        self._lifetime_s = lifetime_s
        self._expiry: dict[str, float] = {}
        self.issued = 0

    def valid(self, token: str) -> bool:
        expiry = self._expiry.get(token)
        return expiry is not None and self._clock() < expiry

    async def handle(self, request: Request) -> Response:
        # application/x-www-form-urlencoded, parsed here: starlette's form() would need python-multipart
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        if form.get("grant_type") != [JWT_BEARER]:
            return _oauth_error("unsupported_grant_type", "Only the JWT-bearer grant is supported.")
        claims = _claims(form.get("assertion", [""])[0])
        if claims is None or not claims.get("iss") or not claims.get("scope"):
            return _oauth_error("invalid_grant", "Invalid JWT: expected iss and scope claims.")
        token = "ya29.sim-" + secrets.token_urlsafe(24)
        self._expiry[token] = self._clock() + self._lifetime_s
        self.issued += 1
        return JSONResponse({"access_token": token, "expires_in": int(self._lifetime_s), "token_type": "Bearer"})


def _claims(assertion: str) -> dict[str, object] | None:
    parts = assertion.split(".")
    if len(parts) != 3 or not parts[2]:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _oauth_error(error: str, description: str) -> Response:
    return JSONResponse({"error": error, "error_description": description}, status_code=400)
