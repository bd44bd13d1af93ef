"""What an error answer says went wrong, and what to do about it (pure, no I/O): the hint for each fatal
kind, and the causes read from a body's words: money (a spend cap, the spend-based rate limit, no credit),
a refused ``store`` field, Vertex AI's marks; and :func:`classify_error`, which turns any answer but a 200 into an
:class:`~nanobatch.errors.ApiError` with them, deciding whether it is worth retrying and whether it stops the run.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ..errors import ApiError, FatalApiError

__all__ = [
    "HINTS",
    "STORE_REFUSED",
    "VERTEX_HINTS",
    "classify_error",
    "detail",
    "from_vertex",
    "money_kind",
    "plain_message",
    "violations",
]

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
    "redirect": "api.base_url answers with a redirect: set it to the address it points to (nanobatch follows "
    "none, as that would carry the key elsewhere)",
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


# (kind, retryable) for statuses that need no reading of the body.
_BY_STATUS: dict[int, tuple[str, bool]] = {
    408: ("timeout", True),
    429: ("rate_limited", True),
    500: ("server_error", True),
    502: ("bad_gateway", True),
    503: ("overloaded", True),
    504: ("timeout", True),
}
_FATAL_STATUS = {401: "auth", 402: "billing", 403: "permission", 404: "not_found"}


def classify_error(
    status_code: int, headers: Mapping[str, str], body: bytes, *, now: float | None = None, one_request: bool = False
) -> ApiError:
    """The error for a non-200 answer: Google's body, APIYI's body, or a proxy's HTML page. *one_request*: the
    error of one request inside a batch job (a results line), which says nothing of the others: never fatal."""
    data = _json_or_none(body)
    message, status, details = _error_fields(data)
    if message is None:
        message = plain_message(body)
    retry_after = _retry_delay(details)
    if retry_after is None:
        retry_after = _retry_after_header(headers.get("retry-after"), now=now)

    fatal_kind = _FATAL_STATUS.get(status_code)
    if 300 <= status_code < 400:  # every request is sent there, and none is followed: it would take the key along
        fatal_kind, message = "redirect", f"{message}; it points to {_where(headers.get('location'))}"
    elif _code(data) in ("model_not_found", "invalid_model"):  # an OpenAI-style proxy's 400 for a model it lacks
        fatal_kind = "not_found"
    elif status_code == 400 and _mentions_invalid_key(message, details):
        fatal_kind = "auth"
    elif status_code == 400 and status == "FAILED_PRECONDITION":
        fatal_kind = "location"
    elif status_code == 400 and STORE_REFUSED.search(" ".join((message, *violations(details)))):
        fatal_kind = "store_refused"  # every request carries it: none can succeed
    elif status_code in (402, 403, 429) and (money := money_kind(message, data)) is not None:
        fatal_kind = money
    elif status_code == 429 and _daily_quota(details):
        fatal_kind = "quota_exhausted"
    if fatal_kind is not None and one_request:
        return ApiError(f"HTTP {status_code}: {message}", kind=fatal_kind, status_code=status_code)
    if fatal_kind is not None:
        hints = VERTEX_HINTS if from_vertex(message, details) else HINTS
        return FatalApiError(
            f"HTTP {status_code}: {message} (hint: {hints[fatal_kind]})", kind=fatal_kind, status_code=status_code
        )
    kind, retryable = _BY_STATUS.get(status_code, ("bad_request", False))
    if status_code >= 500 and status_code not in (501, 505):
        kind, retryable = _BY_STATUS.get(status_code, ("server_error", True))
    return ApiError(
        f"HTTP {status_code}: {message}",
        kind=kind,
        status_code=status_code,
        retryable=retryable,
        retry_after=retry_after if retryable else None,
    )


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _error_fields(data: Any) -> tuple[str | None, str | None, list[dict[str, Any]]]:
    """(message, status, details) from Google's ``{"error": {...}}`` or APIYI's ``{"status_code", "error"}``."""
    if isinstance(data, list) and data:  # some Google endpoints wrap the error in a list
        data = data[0]
    if not isinstance(data, dict):
        return None, None, []
    error = data.get("error")
    if isinstance(error, str):
        return error, None, []
    if not isinstance(error, dict):
        message = data.get("message")
        return (str(message) if message else None), None, []
    details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    status = error.get("status") or error.get("type") or error.get("code")
    message = error.get("message")
    return (str(message) if message else None), (str(status) if status else None), details


def _code(data: Any) -> str | None:
    """An OpenAI-style error body's ``error.code`` (``model_not_found``), if it has one."""
    error = data.get("error") if isinstance(data, dict) else None
    return str(error["code"]) if isinstance(error, dict) and error.get("code") is not None else None


def _where(location: str | None) -> str:
    """A redirect's target without its query (where a key may ride), or that it names none."""
    if not location:
        return "no address"
    parts = urllib.parse.urlsplit(location)
    return f"{parts.scheme}://{parts.hostname}{parts.path}" if parts.hostname else parts.path or "no address"


def plain_message(body: bytes) -> str:
    """A short readable message from a non-JSON body (a proxy's HTML page, say)."""
    text = body.decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title:
        text = title.group(1)
    text = " ".join(re.sub(r"<[^>]+>", " ", text).split())
    return (text[:200] + "...") if len(text) > 200 else (text or "empty response body")


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    for info in detail(details, "google.rpc.RetryInfo"):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", str(info.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


def _retry_after_header(value: str | None, *, now: float | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _daily_quota(details: list[dict[str, Any]]) -> bool:
    for failure in detail(details, "google.rpc.QuotaFailure"):
        for violation in failure.get("violations") or []:
            names = " ".join(str(violation.get(k, "")) for k in ("quotaId", "quotaMetric", "subject"))
            if re.search(r"per.?day|daily", names, re.IGNORECASE):
                return True
    return False


def _mentions_invalid_key(message: str, details: list[dict[str, Any]]) -> bool:
    reasons = {str(d.get("reason")) for d in detail(details, "google.rpc.ErrorInfo")}
    return "API_KEY_INVALID" in reasons or "api key not valid" in message.lower()
