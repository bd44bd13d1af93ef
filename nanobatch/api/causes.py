"""What an error answer says went wrong, and what to do about it (pure, no I/O): the hint for each fatal
kind, and the causes read from a body's words: money (a spend cap, the spend-based rate limit, no credit),
a refused ``store`` field, Vertex AI's marks. :func:`nanobatch.api.gemini.classify_error` uses them.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["HINTS", "STORE_REFUSED", "VERTEX_HINTS", "detail", "from_vertex", "money_kind", "violations"]

HINTS = {
    "auth": "check the API key and api.auth (bearer for APIYI, x-goog-api-key for Google)",
    "permission": "check that the key may use this model and api.auth matches the endpoint",
    "billing": "add credit or billing to the account",
    "not_found": "check the model id and api.base_url / api.api_version",
    "quota_exhausted": "the daily quota will not recover by waiting; run again tomorrow or raise the quota",
    "location": "the API is not available from this location",
    "spend_cap": "the project's spend cap is reached, and waiting will not lift it: raise the cap in AI Studio "
    "(https://ai.studio/spend) or run again once it resets",
    "spend_rate": "Google's spend-based rate limit for the account's usage tier (money spent in a rolling "
    "10-minute window) is reached: run again later with a lower limits.requests_per_minute (--rpm), or move up "
    "a usage tier",
    "no_credit": "the account's prepaid credit is used up: top it up (AI Studio's Billing page, or the proxy's "
    "console), then run again",
    "store_refused": 'this endpoint refuses the request body\'s "store" field: set api.store: null (or '
    "NANOBATCH_API_STORE=null) to leave it out; the project's own logging setting then applies",
}
# Answers that say money, not speed, stopped the request (the shapes, with sources, in models.MONEY_ERRORS):
# Google's 429s (and 402s) and a one-api/new-api proxy's 403 (the APIYI body shape). Each stops the run.
_MONEY = (
    ("spend_cap", re.compile(r"spend(?:ing)?[ _-]cap", re.IGNORECASE)),
    ("spend_rate", re.compile(r"spend-based rate limit|spending rate has exceeded", re.IGNORECASE)),
    (
        "no_credit",
        re.compile(
            r"prepayment credits|credits? (?:are|is) depleted|insufficient[_ ](?:user[_ ])?(?:quota|balance)|"
            r"pre_consume_token_quota_failed|quota is not enough|余额不足|额度不足",
            re.IGNORECASE,
        ),
    ),
)
# A 400 naming the request's "store" field: Google's "Unknown name \"store\"", a proxy's "unknown field 'store'",
# an OpenAI-style relay's "Unrecognized request argument supplied: store", pydantic's "store: Extra inputs are not
# permitted". The field named, or the word store after (or just before) the words that refuse a field.
_REFUSING = r"unknown|unrecogni[sz]ed|unsupported|unexpected|extra|additional|not (?:allowed|permitted|supported)"
STORE_REFUSED = re.compile(
    r"[\"'`]store[\"'`]|\b(?:field|parameter|property|argument|name|key)s?\W{0,3}store\b"
    r"|\bstore\W{0,3}(?:field|parameter|argument)"
    rf"|\b(?:{_REFUSING})\b[^.\n]{{0,60}}\bstore\b|\bstore\b\W{{0,3}}(?:{_REFUSING})\b",
    re.IGNORECASE,
)
# Vertex AI's answers (its messages name aiplatform, its models "Publisher Model"): the same body shape,
# but the fix is in Google Cloud credentials and settings, not in an API key.
VERTEX_HINTS = {
    **HINTS,
    "auth": "check api.credentials_file, or the Application Default Credentials (gcloud auth application-default "
    "login, GOOGLE_APPLICATION_CREDENTIALS)",
    "permission": "the credentials need the Vertex AI User role (roles/aiplatform.user) in api.project, and the "
    "Vertex AI API enabled there",
    "not_found": "check the model id, api.project and api.location (not every model is served in every location)",
    "location": "check that billing and the Vertex AI API are enabled in api.project, and api.location",
}
_VERTEX_MARKS = re.compile(r"aiplatform|Publisher Model|vertex-ai", re.IGNORECASE)


def money_kind(message: str, data: Any) -> str | None:
    """``spend_cap``, ``spend_rate`` or ``no_credit`` if the answer says money stopped it (its message, or a
    proxy's error ``code`` such as ``insufficient_user_quota``), else None."""
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    text = f"{message} {code}" if isinstance(code, str) else message
    return next((kind for kind, pattern in _MONEY if pattern.search(text)), None)


def violations(details: list[dict[str, Any]]) -> list[str]:
    """The field violations' descriptions of a ``google.rpc.BadRequest`` detail."""
    return [
        str(violation.get("description", ""))
        for bad in detail(details, "google.rpc.BadRequest")
        for violation in bad.get("fieldViolations") or []
        if isinstance(violation, dict)
    ]


def from_vertex(message: str, details: list[dict[str, Any]]) -> bool:
    """Whether an error body is Vertex AI's: its message or an ErrorInfo's domain names aiplatform."""
    domains = " ".join(str(d.get("domain", "")) for d in detail(details, "google.rpc.ErrorInfo"))
    return bool(_VERTEX_MARKS.search(message) or _VERTEX_MARKS.search(domains))


def detail(details: list[dict[str, Any]], type_suffix: str) -> list[dict[str, Any]]:
    return [d for d in details if str(d.get("@type", "")).endswith(type_suffix)]
