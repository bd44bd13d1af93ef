"""Where the CLI's log lines and errors go: stderr, as text or one JSON object per event, the key redacted.

One handler writes every line: the ``nanobatch`` loggers' and, on the root logger, every other library's
(gcsfs, botocore, httpx2, PIL, asyncio, ...) and Python's warnings, so that ``--quiet`` and
``--log-format json`` hold for all of them. Left alone, those lines would reach stderr bare, through
Python's last-resort handler.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["hand_over", "install_redaction", "json_logs", "quiet_logs", "setup_logging", "show_error"]

logger = logging.getLogger("nanobatch")

# Other libraries speak at WARNING and above: their INFO lines are their own business.
LIBRARY_LEVEL = logging.WARNING
# Distinct library warnings remembered so that a repeated one is shown once (gcsfs says the same thing for
# every file it opens); past this many, repeats are shown again rather than held in memory.
_SEEN_MAX = 1000


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "nanobatch" or record.name.startswith("nanobatch.")


class _Redact(logging.Filter):
    """Defence in depth: no log line may carry a credential ``api.redaction.SECRETS`` knows (the API key, the
    notify webhook's URL, ...), whoever wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (said := _cut(message)) != message:
            record.msg, record.args = said, ()
        if record.exc_info and not record.exc_text:  # a traceback is written from exc_text
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _cut(record.exc_text)
        if fields := getattr(record, "fields", None):  # a JSON event's structured data (ids, messages) too
            text = json.dumps(fields)
            if (cut := _cut(text)) != text:
                record.fields = json.loads(cut)
        return True


def _cut(text: str) -> str:
    from ..api.redaction import SECRETS

    return SECRETS.cut(text)


class _Libraries(logging.Filter):
    """Other libraries' lines at the root logger's level or above (some set their own loggers' levels lower:
    uvicorn's), each warning once. Without *tracebacks* (below -vv), a line that carries one keeps only its
    last line, the exception itself: gcsfs logs each request it gives up on with a page of aiohttp's frames,
    above the error nanobatch then tells in one line."""

    def __init__(self, *, tracebacks: bool = False) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()
        self._tracebacks = tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        if _ours(record):
            return True
        if record.levelno < logging.getLogger().level:
            return False
        if not self._tracebacks and (record.exc_info or record.exc_text or record.stack_info):
            _without_traceback(record)
        if record.levelno >= logging.ERROR:
            return True
        said = (record.name, record.getMessage())
        if said in self._seen:
            return False
        if len(self._seen) < _SEEN_MAX:
            self._seen.add(said)
        return True


def _without_traceback(record: logging.LogRecord) -> None:
    """*record* told in one line: its message, and the exception's own line (its traceback's last) if the message
    does not already say it; the rest is for -vv."""
    message = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    last = (record.exc_text or "").strip().rsplit("\n", 1)[-1]
    said = last.split(": ", 1)[-1]
    record.msg = f"{message} ({last})" if said and said not in message else message
    record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None


class _TextFormatter(logging.Formatter):
    """``nanobatch: WARNING: message``; another library's line names it: ``nanobatch: WARNING: gcsfs: ...``."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        if _ours(record):
            return super().formatMessage(record)
        return super().formatMessage(
            logging.makeLogRecord({**record.__dict__, "message": f"{record.name}: {record.message}"})
        )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),  # logger.info(..., extra={"fields": {...}}): structured data
        }
        if record.exc_info:  # a library's traceback stays inside its event
            event["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(event)


def json_logs() -> bool:
    """Whether stderr is for JSON lines only (``--log-format json``)."""
    return any(isinstance(h.formatter, _JsonFormatter) for h in logging.getLogger("nanobatch").handlers)


def show_error(text: str, *, prefix: str = "error: ") -> None:
    """Tell the operator of an error on stderr: ``error: ...``, or one JSON event with ``--log-format json``."""
    if json_logs():
        logger.error("%s", text)
    else:  # the log filter's cut, as this bypasses it
        from ..api.redaction import redact_urls

        click.echo(f"{prefix}{redact_urls(_cut(text))}", err=True)


def setup_logging(verbose: int, quiet: bool, log_format: str) -> None:
    """Every log line goes to stderr alone, through one handler: text for people, or one JSON object per event."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("nanobatch: %(levelname)s: %(message)s"))
    # Their tracebacks: at -vv, or inside a JSON event (one line either way), for a collector to keep
    handler.addFilter(_Libraries(tracebacks=verbose > 1 or log_format == "json"))
    # From the first line: a config error may quote a value the key was pasted in. The keys in the environment's
    # usual variables are known before the settings are (which may name another: install_redaction).
    from ..api.redaction import SECRETS

    SECRETS.add(*(os.environ.get(name, "").strip() for name in ("NANOBATCH_API_KEY", "GEMINI_API_KEY")))
    handler.addFilter(_Redact())
    _install(handler)
    logging.captureWarnings(True)  # Python's warnings too: as a "py.warnings" line, not a bare one
    ours = logging.getLogger("nanobatch")
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    ours.setLevel(level)
    logging.getLogger().setLevel(logging.ERROR if quiet else LIBRARY_LEVEL)
    if log_format == "json" and not quiet:
        ours.setLevel(min(level, logging.INFO))  # machines want every event


def quiet_logs() -> None:
    """Errors only, from nanobatch and every library (``--quiet``)."""
    for name in ("nanobatch", ""):
        logging.getLogger(name).setLevel(logging.ERROR)


def hand_over(handler: logging.Handler) -> None:
    """Let *handler* (the live display's) write every line from now on, with the filters of the one it replaces
    (the key redacted, libraries' lines sifted) and libraries' lines named."""
    handler.filters[:] = [f for h in logging.getLogger("nanobatch").handlers for f in h.filters]
    handler.setFormatter(_TextFormatter("%(message)s"))
    _install(handler)


def _install(handler: logging.Handler) -> None:
    """*handler* alone on the nanobatch logger and on the root logger, where every other library's lines go."""
    ours = logging.getLogger("nanobatch")
    ours.handlers[:] = [handler]
    ours.propagate = False  # written once, by the same handler
    logging.getLogger().handlers[:] = [handler]


def install_redaction(settings: Settings) -> None:
    """Take the API key and the notify webhook's URL out of every line written, whoever wrote it (nanobatch
    or another library), and out of every error shown (:func:`show_error`): ``api.redaction.SECRETS`` knows them
    from here on, whatever variable the settings name."""
    from ..api.redaction import SECRETS
    from ..config import read_api_key, read_notify_url

    SECRETS.learn(settings)  # first: reading them may refuse a value, and the refusal is shown
    read_api_key(settings)  # (a value that cannot be used is refused here, before anything is read)
    read_notify_url(settings)
