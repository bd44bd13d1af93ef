"""``validate`` of a done folder that nothing has changed in since its last run, without resolving every item;
and of one whose CSV or JSONL catalog has only had rows appended since, resolving only those.

A run ends by writing into ``summary.json`` (its ``state``) how many of the manifest's items were not done, and,
from the check it began with, what that check rested on (:func:`check_basis`: the stamps and contents of the
files the items come from, a digest of the settings that shape them and their checks), how many items and
requests it found and the models they use. While every item was done, that basis is the same now (the files'
bytes, whatever their stamps say), results.jsonl is as the run left it, and the folder holds a record of those
items only, a check of the manifest would find what the run's found: no problem, every item done. What may have
changed since is what a run looks at again: each input (its size and mtime, as its record stamped it; a regular
file, not in the output folder), each output (there, a regular file, in the folder), and the models' retirement
dates. :func:`held_check` looks at those alone, and at anything else says None: the whole check then runs as
before.

A catalog that grows each night keeps its old rows byte for byte and adds rows at its end. Where a CSV or JSONL
source's first bytes are still those the run's check read, and those ended a row (a line end, and in a CSV
outside any quotes), the check holds for the items they give, and :class:`Held` says where each source's new
rows start: only those are resolved and checked (``Manifest.since``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Settings
from ..job.manifest import Manifest
from ..job.sources import TableSource
from ..names import RESULTS_FILE, FoldersIn
from .summary import CHECK, file_stamp, last_state

__all__ = ["Held", "check_basis", "held_check", "rows_since"]

_BLOCK = 1 << 20  # bytes of a source read at a time for its digest


@dataclass(frozen=True, slots=True)
class Held:
    """The manifest as the last run into a folder checked it, every item done then and still done: its *items*,
    *requests* and the *models* they use; *starts*, for each source with rows appended since (by absolute path),
    the byte and the line its new rows start at (none: nothing new, the whole check holds)."""

    items: int
    requests: int
    models: list[str]
    starts: dict[str, tuple[int, int]] = field(default_factory=dict)


def check_basis(manifest: Manifest, settings: Settings, out_dir: Path) -> dict[str, Any] | None:
    """What a check of *manifest* into *out_dir* rests on beside the inputs, the outputs and the day: the stamps
    of the files its items come from, and a digest of what else shapes them and their checks (the settings'
    ``api``, ``qa`` and ``output``, the manifest's default model, defaults and ``qa:`` layers, the output folder,
    the home folder ``~`` names, this version). None when a glob or a bucket gives items (no stamp tells what
    they give). Taken before the check reads the files."""
    files = manifest.files()
    if files is None:
        return None
    shaping = {
        "api": settings.api.model_dump(mode="json"),
        "qa": settings.qa.model_dump(mode="json"),
        "output": settings.output.model_dump(mode="json"),  # where a run puts what is done, and what it uploads
        "model": manifest.model,
        # as loaded from those files, unless a caller handed in a manifest changed since (run_job takes one)
        "defaults": manifest.defaults.model_dump(mode="json", exclude_none=True),
        "qa_layers": [layer.model_dump(mode="json", exclude_none=True) for layer in manifest.qa_layers],
        "out_dir": os.path.abspath(out_dir),
        "home": os.path.expanduser("~"),
        "version": _version(),
    }
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
    stamps = [(path, file_stamp(path)) for path in files]
    tables = {os.path.abspath(each.path): each.kind for each in manifest.sources if isinstance(each, TableSource)}
    contents = [_contents(path, stamp[0], tables.get(path)) if stamp else None for path, stamp in stamps]
    return {"sources": [list(each) for each in stamps], "contents": contents, "settings": digest}


def _contents(path: str, size: int, kind: str | None) -> list[Any] | None:
    """[size, lines, digest, whether rows may be appended after them] of the first *size* bytes of the file at
    *path* (its size when stamped: bytes written since are not counted); None if it cannot be read. Rows may
    follow a CSV or JSONL (*kind*) that ends a line, and in a CSV, outside quotes (an even number of them)."""
    digest, lines, quotes, last, left = hashlib.sha256(), 0, 0, b"", size
    try:
        with open(path, "rb") as f:
            while left > 0 and (block := f.read(min(_BLOCK, left))):
                digest.update(block)
                lines += block.count(b"\n")
                quotes += block.count(b'"') if kind == "csv" else 0
                last, left = block[-1:], left - len(block)
    except OSError:
        return None
    return [size - left, lines, digest.hexdigest(), kind is not None and last == b"\n" and quotes % 2 == 0]


def held_check(
    out_dir: Path, basis: Mapping[str, Any], entries: Iterable[tuple[str, tuple[str, ...], Mapping[str, Any]]]
) -> Held | None:
    """The manifest as the last run into *out_dir* checked it, if every item was done then and nothing but what
    is looked at here could have changed since, or rows appended to its CSV and JSONL sources (see the module);
    else None. *basis*: :func:`check_basis` now; *entries*: (status, outputs, input stamps) of every record in
    the folder's index, read only once the rest holds."""
    state = last_state(out_dir)
    if state is None or not isinstance(held := state.get(CHECK), dict) or state.get("left") != 0:
        return None
    if held.get("settings") != basis["settings"] or not basis["sources"]:
        return None
    # The files as the run's check read them are as the run left them, and now the same, or grown
    if held.get("sources") != state.get("sources"):
        return None
    starts = {} if held["sources"] == basis["sources"] else _starts(held, basis)
    if starts is None:
        return None
    items, requests, models = held.get("items"), held.get("requests"), held.get("models")
    if state.get("items") != items or not isinstance(requests, int) or not isinstance(models, list):
        return None
    if state.get("results") != file_stamp(str(out_dir / RESULTS_FILE)):
        return None
    if not isinstance(items, int) or not _all_still_done(out_dir, entries, items):
        return None
    return Held(items, requests, [str(model) for model in models], starts)


def rows_since(held: Mapping[str, Any]) -> dict[str, tuple[int, int]] | None:
    """Where the rows appended since the *held* check (a summary's ``state.check``) start in each of its files
    grown since (none: none grew), their contents read now; None if a file is not the same, nor grown by rows
    alone (for ``status``, which looks at nothing else the check rested on)."""
    sources = held.get("sources")
    if not isinstance(sources, list) or not all(isinstance(each, list) and len(each) == 2 for each in sources):
        return None
    stamps = [(str(path), file_stamp(str(path))) for path, _ in sources]
    now = [_contents(path, stamp[0], None) if stamp else None for path, stamp in stamps]
    return _starts(held, {"sources": [list(each) for each in stamps], "contents": now})


def _starts(held: Mapping[str, Any], basis: Mapping[str, Any]) -> dict[str, tuple[int, int]] | None:
    """Where each source's rows appended since the *held* check start (byte, line), for those grown; None if a
    file is not the same as then, nor grown by rows alone."""
    paths = [path for path, _ in basis["sources"]]
    then, now = held.get("contents"), basis["contents"]
    if not isinstance(then, list) or len(then) != len(now) or [path for path, _ in held["sources"]] != paths:
        return None
    starts = {}
    for path, before, after in zip(paths, then, now, strict=True):
        if not (isinstance(before, list) and len(before) == 4 and after is not None):
            return None
        if before[:3] == after[:3]:  # the same bytes, though saved again
            continue
        size, lines, digest, appendable = before
        if not (appendable is True and isinstance(size, int) and isinstance(lines, int) and after[0] > size):
            return None
        head = _contents(path, size, None)
        if head is None or head[:3] != [size, lines, digest]:
            return None
        starts[path] = (size, lines)
    return starts


def _all_still_done(
    out_dir: Path, entries: Iterable[tuple[str, tuple[str, ...], Mapping[str, Any]]], items: int
) -> bool:
    """Whether the folder holds exactly *items* records, all ok, each with its inputs as it stamped them (local
    regular files outside the output folder) and its outputs there (regular files inside it)."""
    inside = FoldersIn(out_dir)
    top = os.path.join(out_dir, "")
    count = 0
    try:
        for status, outputs, stamps in entries:
            count += 1
            if status != "ok" or not stamps or count > items:  # no stamps: a URL or bucket input, or an old record
                return False
            for path, stamp in stamps.items():
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):  # where it leads must not be in the output folder either
                    st = os.stat(path)
                    if inside.real(os.path.dirname(os.path.realpath(path))) is not None:
                        return False
                if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != tuple(stamp[:2]):
                    return False
                if inside.real(path.rpartition(os.sep)[0] or os.sep) is not None:
                    return False
            for name in outputs:
                if not stat.S_ISREG(os.stat(top + name).st_mode):
                    return False
                if (folder := os.path.dirname(name)) and inside.real(top + folder) is None:
                    return False
    except (OSError, ValueError):  # gone, or not readable; ValueError: a NUL in a path
        return False
    return count == items


def _version() -> str:
    """nanobatch's installed version (a new one may check items otherwise): from its metadata, not from the
    package's ``__init__``, which this module stands below."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanobatch")
    except PackageNotFoundError:
        return "unknown"
