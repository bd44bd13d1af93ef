"""Google-style error bodies: ``{"error": {"code", "message", "status", "details"}}``."""

from __future__ import annotations

from typing import Any

import httpx2
from starlette.responses import JSONResponse

__all__ = [
    "RATE_LIMITS_URL",
    "UNPROCESSABLE_IMAGE",
    "InvalidRequest",
    "SimulatedDrop",
    "duration",
    "google_error",
    "quota_failure",
    "retry_info",
]

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

RATE_LIMITS_URL = "https://ai.google.dev/gemini-api/docs/rate-limits"
UNPROCESSABLE_IMAGE = (
    "Unable to process input image. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)


class InvalidRequest(Exception):
    """A request the real API would refuse; becomes a Google error response."""

    def __init__(self, message: str, *, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class SimulatedDrop(httpx2.RemoteProtocolError):
    """Raised in-process (ASGITransport) where a real server would drop the connection.

    It subclasses httpx2's own error, so a client sees the same exception type
    in-process as over a socket.
    """

    def __init__(self) -> None:
        super().__init__("Server disconnected without sending a response.")


def google_error(
    code: int, message: str, details: list[dict[str, Any]] | None = None, *, status: str | None = None
) -> JSONResponse:
    """A response in Google's error format (*status*: the word, when not the usual one for *code*)."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status or _STATUS.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=code)


def duration(seconds: float) -> str:
    """A protobuf Duration in JSON form: 0, 3, 6 or 9 fractional digits.

    >>> duration(2), duration(12.345), duration(45.837906927)
    ('2s', '12.345s', '45.837906927s')
    """
    nanos = max(0, round(seconds * 1e9))
    whole, frac = divmod(nanos, 1_000_000_000)
    if frac == 0:
        return f"{whole}s"
    for digits in (3, 6, 9):
        step = 10 ** (9 - digits)
        if frac % step == 0:
            return f"{whole}.{frac // step:0{digits}d}s"
    raise AssertionError("unreachable")  # pragma: no cover


def retry_info(seconds: float) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": duration(seconds)}


def quota_failure(*, quota_id: str, metric: str, model: str, limit: int) -> list[dict[str, Any]]:
    """QuotaFailure + Help details, as Google sends them on a quota 429."""
    return [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": metric,
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": str(limit),
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Learn more about Gemini API quotas", "url": RATE_LIMITS_URL}],
        },
    ]
