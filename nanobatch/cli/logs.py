"""Where the CLI's log lines and errors go: stderr, as text or one JSON object per event, the key redacted."""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["install_redaction", "json_logs", "setup_logging", "show_error"]

logger = logging.getLogger("nanobatch")


class _Redact(logging.Filter):
    """Defence in depth: no log line may carry the API key, whoever wrote it."""

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secret and self.secret in record.getMessage():
            record.msg = record.getMessage().replace(self.secret, "[redacted]")
            record.args = ()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
                **getattr(record, "fields", {}),  # logger.info(..., extra={"fields": {...}}): structured data
            }
        )


def json_logs() -> bool:
    """Whether stderr is for JSON lines only (``--log-format json``)."""
    return any(isinstance(h.formatter, _JsonFormatter) for h in logging.getLogger("nanobatch").handlers)


def show_error(text: str, *, prefix: str = "error: ") -> None:
    """Tell the operator of an error on stderr: ``error: ...``, or one JSON event with ``--log-format json``."""
    if json_logs():
        logger.error("%s", text)
    else:
        click.echo(f"{prefix}{text}", err=True)


def setup_logging(verbose: int, quiet: bool, log_format: str) -> None:
    """The nanobatch loggers write to stderr alone: text for people, or one JSON object per event."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("nanobatch: %(levelname)s: %(message)s"))
    root = logging.getLogger("nanobatch")
    root.handlers[:] = [handler]
    root.propagate = False
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    root.setLevel(level)
    if log_format == "json" and not quiet:
        root.setLevel(min(level, logging.INFO))  # machines want every event


def install_redaction(settings: Settings) -> None:
    """Take the API key out of every line the nanobatch loggers write, whoever wrote it."""
    from ..config import read_api_key

    secret = read_api_key(settings)
    for handler in logging.getLogger("nanobatch").handlers:
        handler.filters[:] = [_Redact(secret)]
