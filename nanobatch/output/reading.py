"""Reading the fields of a ``results.jsonl`` line as any nanobatch version wrote them, or a hand edited them: what
:meth:`~nanobatch.output.record.ItemRecord.from_json` and the resume index (:mod:`nanobatch.output.results`) read
a line with. A value that is not what the field holds reads as its default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["UploadStamp", "is_int", "read_float", "read_file_stamps", "read_stamps", "read_strs", "read_upload_stamps"]

T = TypeVar("T")
UploadStamp = tuple[int, str]  # an object's (size, ETag or generation) as nanobatch PUT it (api.storage.ObjectStamp)


def is_int(value: Any) -> bool:
    """Whether *value* is a whole number (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_strs(value: Any) -> tuple[str, ...]:
    """Strings from a list of them (or one string, as a hand-edited line may have it)."""
    if type(value) is list:  # as nearly every line has it: one test (read for every field of every record)
        return tuple(map(str, value))
    if isinstance(value, str):
        return (value,)
    return tuple(map(str, value)) if isinstance(value, list | tuple) else ()


def read_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_stamps(value: Any) -> tuple[tuple[int, int, str], ...] | None:
    """Input stamps as written; None if unreadable (the files will simply be read again)."""
    try:
        return tuple((int(s[0]), int(s[1]), str(s[2])) for s in value)
    except (TypeError, ValueError, IndexError, KeyError):
        return None


def read_file_stamps(value: Any, files: int) -> tuple[tuple[int, int] | None, ...] | None:
    """A record's ``file_stamps`` (one per file it names, each [size, mtime_ns] or null); None if there are none,
    or not one per file (an old or hand-edited line: its files are then taken on their names)."""
    return _read_pairs(value, files, int)


def read_upload_stamps(value: Any, uploads: int) -> tuple[UploadStamp | None, ...] | None:
    """A record's ``upload_stamps`` (one per URL in ``uploads``, each [size, version] or null); None if there are
    none, or not one per URL (an old or hand-edited line: its objects are then taken on their URLs)."""
    return _read_pairs(value, uploads, str)


def _read_pairs(value: Any, count: int, second: Callable[[Any], T]) -> tuple[tuple[int, T] | None, ...] | None:
    """*count* [size, *second*] pairs (or nulls), as ``file_stamps`` and ``upload_stamps`` hold them; else None."""
    if not isinstance(value, list) or len(value) != count:
        return None
    try:
        return tuple(None if s is None else (int(s[0]), second(s[1])) for s in value)
    except (TypeError, ValueError, IndexError, KeyError):
        return None
