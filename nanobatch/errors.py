"""The exceptions nanobatch raises.

Their hierarchy::

    NanobatchError
    ├── UsageError            bad command-line use                    (exit 2)
    ├── ConfigError           bad config file or setting              (exit 2)
    ├── ManifestError         bad manifest: file, item, field         (exit 2)
    ├── ApiError              one request failed (kind, status, retryable)
    │   ├── FatalApiError     no request can succeed: stop the run    (exit 3)
    │   └── InputError        an input picture cannot be loaded: the item fails
    ├── RunAborted            budget reached, circuit open, fatal API (exit 3)
    │   └── TimeLimitReached  limits.max_duration_s ran out           (exit 3)
    ├── StorageError          a bucket URL cannot be used: url, kind  (exit 2)
    ├── LockHeld              another run holds the output folder     (exit 4)
    └── Interrupted           SIGINT / SIGTERM                        (exit 130)

Errors of other libraries (yaml, pydantic, OSError, csv, httpx2, Pillow, fsspec,
google-auth) are translated where they are caught, into these or into a
:class:`Problem`, in the modules that meet them, chiefly ``config``, ``safe_yaml``,
``job.manifest``, ``job.sources`` (and ``job.lines``), ``job.build``, ``output.lock``, ``output.outdir``,
``output.writer``, ``output.upload``, ``run.runner``, ``inputs.load`` (and ``inputs.stamps``,
``pictures``), ``api.client``, ``api.gemini``, ``api.batch_api``, ``api.storage`` and ``api.vertex``;
nothing above the module that caught one sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ApiError",
    "ConfigError",
    "FatalApiError",
    "InputError",
    "Interrupted",
    "LockHeld",
    "ManifestError",
    "NanobatchError",
    "Problem",
    "RunAborted",
    "StorageError",
    "TimeLimitReached",
    "has_userinfo",
    "without_userinfo",
    "UsageError",
    "not_utf8",
    "sole_error",
]


class NanobatchError(Exception):
    """Base class of every error nanobatch raises on purpose."""

    exit_code = 1


def sole_error(group: BaseExceptionGroup[BaseException]) -> NanobatchError | None:
    """The first of *group*'s errors (nested groups flattened) if every one is a :class:`NanobatchError`.

    Task groups wrap what stopped a run; callers want that error itself. A group holding anything
    else (a bug) gives None: it must propagate whole, traceback and all.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            leaves.append(exc)
    if leaves and all(isinstance(exc, NanobatchError) for exc in leaves):
        first = leaves[0]
        assert isinstance(first, NanobatchError)
        return first
    return None


def not_utf8(exc: UnicodeDecodeError) -> str:
    """What to tell of a file that is not UTF-8 text, by the first byte that is not."""
    return f"not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start}; save it as UTF-8"


class UsageError(NanobatchError):
    exit_code = 2


class ConfigError(NanobatchError):
    """A config file or setting is wrong. The message names the file and the setting."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest: where it is, and what is wrong. ``bad_input``: the item's input picture
    cannot be decoded (the manifest itself is fine), which ``--skip-bad-inputs`` lets a check leave out."""

    file: str
    item: str | None
    field: str | None
    message: str
    bad_input: bool = False

    def __str__(self) -> str:
        where = self.file
        if self.item is not None:
            where += f": item {self.item!r}"
        if self.field:
            where += f", field {self.field!r}"
        return f"{where}: {self.message}"


class ManifestError(NanobatchError):
    """The manifest has one or more problems; ``problems`` lists every one found."""

    exit_code = 2

    def __init__(self, problems: list[Problem], *, hint: str | None = None) -> None:
        self.problems = problems
        lines = _problem_lines(problems)
        if hint:
            lines.append(f"hint: {hint}")
        super().__init__("\n".join(lines))


def _problem_lines(problems: list[Problem], *, most: int = 50, same: int = 3) -> list[str]:
    """A line per problem, up to *most*; the same problem (field and message) of many items (a setting that every
    row of a source shares, from ``defaults:`` or its ``items_from:`` entry) shown *same* times, then counted."""
    times: dict[tuple[str | None, str], int] = {}
    shown = []
    for problem in problems:
        key = (problem.field, problem.message)
        times[key] = times.get(key, 0) + 1
        if times[key] <= same:
            shown.append(str(problem))
    lines = shown[:most] + ([f"... and {len(shown) - most} more problems"] if len(shown) > most else [])
    return lines + [f"... and {n - same} more items with the same problem in field {field!r}: {message[:100]}"
                    for (field, message), n in times.items() if n > same][:most]  # fmt: skip


class ApiError(NanobatchError):
    """A request failed.

    ``kind`` is a short stable word for scripts and reports (``rate_limited``,
    ``overloaded``, ``server_error``, ``timeout``, ``connection``,
    ``bad_response``, ``bad_request``, ``blocked``, ``no_image``, ...).
    ``retry_after`` is the wait the server asked for, in seconds, if it said.
    ``sent`` is False when the request never left (no connection could be made):
    the server never saw it, so it cannot have been charged.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status_code: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        reply: Any = None,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.sent = sent
        self.reply = reply  # the gemini.Reply of a 200 that was blocked or had no image
        self.message = message
        self.kind = kind
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after

    @property
    def shed(self) -> bool:
        """Whether the server turned the request away for load (a 429 that is not the daily quota, a 503), not
        for anything in it: how Google sheds flex traffic, so the same request may go through at standard."""
        return self.kind in _SHED_KINDS


_SHED_KINDS = frozenset({"rate_limited", "overloaded"})


class FatalApiError(ApiError):
    """An answer that means no other request can succeed either (bad key, no such model, daily quota)."""

    exit_code = 3


class InputError(ApiError):
    """An input image could not be loaded: the item fails (kind ``input``), nothing is sent."""

    def __init__(
        self, message: str, *, retryable: bool = False, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, kind="input", retryable=retryable, status_code=status_code, retry_after=retry_after)


class RunAborted(NanobatchError):
    """The run stopped early on purpose; finished work is kept, unsent items are left for the next run."""

    exit_code = 3


class TimeLimitReached(RunAborted):
    """``limits.max_duration_s`` ran out: nothing new was sent after it."""


class StorageError(NanobatchError):
    """An object in a bucket (``s3://``, ``gs://``, ``az://``) cannot be read or written.

    ``kind`` is a short stable word: ``missing_extra``, ``no_bucket``, ``not_found``, ``denied``,
    ``unsupported``, ``unreachable``, ``exists`` (a conditional create found an object there). The message
    names the URL, never a credential.
    """

    exit_code = 2

    def __init__(self, url: str, kind: str, message: str) -> None:
        url = without_userinfo(url)
        super().__init__(f"{url}: {message}")
        self.url = url
        self.kind = kind


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@]*)@")


def without_userinfo(url: str) -> str:
    """*url* without the user name and password it may carry (``s3://id:secret@bucket/...``): fit for a message.
    An ``abfs://container@account...`` URL keeps its container (no password has no colon).

    >>> without_userinfo("s3://AKIA:s3cret@bucket/a.jpg")
    's3://bucket/a.jpg'
    """
    if "@" not in url or (match := _USERINFO.match(url)) is None:
        return url
    if match[1].lower().startswith("abfs") and ":" not in match[2]:
        return url
    return url[: match.end(1)] + url[match.end() :]


def has_userinfo(url: str) -> bool:
    """Whether *url* carries a user name or password (see :func:`without_userinfo`)."""
    return without_userinfo(url) != url


class LockHeld(NanobatchError):
    exit_code = 4


class Interrupted(NanobatchError):
    exit_code = 130
