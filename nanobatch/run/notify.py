"""The end-of-run webhook: one JSON object POSTed to the URL in ``$NANOBATCH_NOTIFY_URL`` (``notify.url_env``)
when a run ends, however it ends (docs/observability.md).

Its ``text`` is one line, what chat incoming-webhooks (Slack, Google Chat, Teams) show; the other fields are
for scripts. The URL is a secret, like the API key (a chat webhook's URL is all it takes to post there): it
is never logged, printed or written, and the warning of a webhook that fails calls it "the notify webhook".
A failing webhook is retried within ``notify.timeout_s``, then given up on: it never changes the run's exit
code, nor keeps it waiting longer. No credential goes out in a notice: a reason quoting one (a manifest's value the
key was pasted in) is cut of it before it is shortened, and the whole body again as it is posted.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import anyio
import httpx2
import orjson

from ..api.redaction import SECRETS

__all__ = ["duration_text", "one_line", "post_notice", "reason_line"]

logger = logging.getLogger("nanobatch")

_WORDS = {"skipped": "already done"}  # how a status reads in the text (others: their own name)
_REASON_MAX = 300  # characters of the reason the text carries (the full one is in ``reason``)


def duration_text(seconds: float) -> str:
    """``2 h 11 min``, ``4 min 5 s``, ``12 s``."""
    whole = max(0, round(seconds)) if math.isfinite(seconds) else 0
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def one_line(
    job: str, outcome: str, reason: str | None, statuses: Mapping[str, int], cost_usd: float, duration_s: float
) -> str:
    """``spring-catalog: 9,812 ok, 41 failed, 3 rejected, $412.30, 2 h 11 min``, and why it stopped early
    (``aborted: the budget ...``) when it did. Statuses other than ok are named only when some items have them."""
    counts = [f"{statuses.get('ok', 0):,} ok"]
    counts += [f"{n:,} {_WORDS.get(status, status)}" for status, n in statuses.items() if status != "ok" and n]
    line = f"{job}: {', '.join(counts)}, ${cost_usd:,.2f}, {duration_text(duration_s)}"
    if outcome != "complete":
        line += f"; {outcome}: {reason_line(reason)}"
    return line


def reason_line(reason: str | None) -> str:
    """*reason* on one line, without a credential (cut before the line is shortened: a key at the cut would
    leave its start), shortened for a chat's text."""
    why = " ".join(SECRETS.cut(reason or "no reason given").split())
    return why[:_REASON_MAX] + ("..." if len(why) > _REASON_MAX else "")


async def post_notice(
    url: str, notice: Mapping[str, Any], *, limit_s: float, transport: httpx2.AsyncBaseTransport | None = None
) -> bool:
    """POST *notice* to *url*, retried (no answer, 429, 5xx) until *limit_s* seconds have passed; True once
    it was taken (2xx). A failure is logged as a warning, without the URL, and never raised. No credential
    :data:`~nanobatch.api.redaction.SECRETS` knows is posted, wherever in *notice* it was."""
    problem = "no answer"
    body, headers = SECRETS.cut_json(orjson.dumps(dict(notice))), {"Content-Type": "application/json"}
    with anyio.move_on_after(limit_s), _kept_out_of_logs(url):
        async with httpx2.AsyncClient(transport=transport, timeout=limit_s, follow_redirects=False) as client:
            for attempt in itertools.count():
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx2.HTTPError as exc:
                    problem = f"no answer ({type(exc).__name__})"  # never str(exc): it may hold the URL
                except (httpx2.InvalidURL, ValueError) as exc:
                    problem = f"its URL cannot be used ({type(exc).__name__})"
                    break
                else:
                    if response.is_success:
                        return True
                    problem = f"answered {response.status_code}"
                    if response.status_code != 429 and response.status_code < 500:
                        break  # it will say the same again
                await anyio.sleep(min(0.5 * 2**attempt, 4.0))
    hint = ""
    if problem == "answered 400":
        hint = " (a chat that takes a text field alone, as Google Chat does, needs notify.payload: text)"
    logger.warning("the notify webhook was not told of the run's end: %s%s", problem, hint)
    return False


class _Hide(logging.Filter):
    """Takes *url* out of a log line (httpx2 logs each request's URL at INFO)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        # httpx2 logs the URL as it normalised it (host in lower case, :443 left out), not as it was written
        self.urls = sorted({url, str(httpx2.URL(url))}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(url in message for url in self.urls):
            for url in self.urls:
                message = message.replace(url, "[the notify webhook]")
            record.msg, record.args = message, ()
        return True


@contextmanager
def _kept_out_of_logs(url: str) -> Iterator[None]:
    """While the webhook is posted to, the HTTP library's log lines do not carry its URL."""
    hide = _Hide(url)
    loggers = [logging.getLogger(name) for name in ("httpx2", "httpcore2")]
    for each in loggers:
        each.addFilter(hide)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(hide)
