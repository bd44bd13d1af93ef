"""The results file's lines (``results.jsonl``): the records nanobatch wrote, read as the resume index, ``status``
and the report count them (another tool's lines passed over, torn ones skipped, each with a warning)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import orjson

from .index_cache import Restored
from .own import is_own_record
from .record import ItemRecord, is_record

__all__ = ["latest_records", "read_records", "records_at"]

logger = logging.getLogger("nanobatch")


def read_records(path: Path) -> Iterator[ItemRecord]:
    """Item records from a results file, oldest first, as the report shows them: those nanobatch wrote, as
    ``status`` counts them (another tool's lines are passed over with one warning); torn lines are skipped with a
    warning."""
    return map(ItemRecord.from_json, _record_lines(path))


def latest_records(path: Path, ids: Collection[str]) -> dict[str, ItemRecord]:
    """The latest record nanobatch wrote for each of *ids* in a results file (as the resume index counts them:
    another tool's lines are passed over), whole; an id with none is left out."""
    latest: dict[str, dict[str, Any]] = {}
    for line in _record_lines(path):
        if (item_id := str(line["id"])) in ids:
            latest[item_id] = line
    return {item_id: ItemRecord.from_json(line) for item_id, line in latest.items()}


def _record_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The parsed lines of a results file that are item records nanobatch wrote (``own.is_own_record``): another
    tool's lines in a results.jsonl it shares neither count (the index, status, the report) nor make a file
    nanobatch's to replace."""
    return (record for _, record in records_at(path))


def records_at(
    path: Path, *, start: Restored | None = None, end: list[Restored] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`_record_lines`, each with the byte offset its line starts at. From *start* (where an earlier
    reading stopped), if given; where this one stopped is put in *end*."""
    if not path.exists():
        return
    foreign = 0
    with path.open("rb") as f:
        if start is not None:
            f.seek(start.offset)
        number = start.lines if start is not None else 0
        read, line = f.tell(), b"\n"
        for number, line in enumerate(f, number + 1):  # noqa: B020 (number: the last line, once done)
            at, read = read, read + len(line)
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                logger.warning("%s: line %d is not valid JSON (torn by a crash?); ignoring it", path, number)
                continue
            if is_own_record(record):
                yield at, record
            elif is_record(record):
                foreign += 1
        if end is not None and line.endswith(b"\n"):  # a line cut short (torn by a crash) is no place to stop at
            end.append(Restored(offset=read, lines=number, paid_usd=0.0))
    if foreign:
        logger.warning(
            "%s: ignoring %d lines that look like item records but were not written by nanobatch (another "
            "tool's?): they lack the fields nanobatch writes on every record",
            path,
            foreign,
        )
