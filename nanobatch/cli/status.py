"""``nanobatch status``: what an output folder holds, from its results and summary."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ManifestError, UsageError
from ..names import JOURNAL_FILE, LOCK_FILE, RESULTS_FILE, STEPS_FOLDER, SUMMARY_FILE
from ..output.files import is_ours
from ..output.index_cache import prefix_digest
from ..output.journal import orphaned_requests
from ..output.lock import current_holder
from ..output.results import IndexEntry, ResultsIndex
from ..output.resume import outputs_there
from ..output.writer import UNSAVED_KINDS
from ..run.batch.ledger import answers_kept, open_chunks
from ..run.summary import CHECK, STARTED, STATE, file_stamp, folder_entries

if TYPE_CHECKING:
    from ..config import Settings
    from ..output.upload import Uploads

__all__ = ["folder_status"]

# What a run leaves in its output folder: a folder with none of them is not one (an empty folder, a typo, /).
# summary.json is a common name: it counts only as nanobatch writes it (an object with "last_run").
_RUN_FILES = (RESULTS_FILE, JOURNAL_FILE, LOCK_FILE)


def folder_status(out_dir: Path) -> dict[str, Any]:
    """Counts, tokens, cost and failures by kind; the last run from ``summary.json``; with the manifest the last
    run named still there, how many of its items are not done.

    At scale this reads no record and no item: the counts are the summary's while results.jsonl and the
    manifest's files are as the last run left them (their sizes and mtimes), and the output folder holds no
    fewer entries; otherwise they are counted again from the records and the manifest.

    Raises :class:`UsageError` for a folder no run has written into.
    """
    if not _is_output_folder(out_dir):
        inside = _output_folders_in(out_dir)
        hint = f"; did you mean {' or '.join(inside)}?" if inside else ""
        raise UsageError(
            f"{out_dir} is not a nanobatch output folder (no {RESULTS_FILE}, {SUMMARY_FILE} or {JOURNAL_FILE}); "
            f"give the folder a run wrote into (--out, the manifest's output_dir, or <output.dir>/<name>){hint}"
        )
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}
    summary = summary if isinstance(summary, dict) else {}
    running = current_holder(out_dir)
    info, orphans = _counts(out_dir, summary, running)
    info["batch_jobs"] = [
        {"chunk": c.id, "job": c.job, "state": c.state, "requests": len(c.keys), **c.counts}
        for c in open_chunks(out_dir)
    ]
    info["running"] = running
    info["last_run"] = _last_run(summary.get("last_run"), info["running"])
    # While a run holds the folder, its unanswered requests are simply in flight, not lost.
    info["in_flight"] = len(orphans) if info["running"] else 0
    info["possibly_charged"] = 0 if info["running"] else len(orphans)
    info["possibly_charged_ids"] = [] if info["running"] else sorted({o["id"] for o in orphans})
    return info


def _steps_kept(out_dir: Path, index: _Index) -> int:
    """How many items go on from a step's image kept for them (:mod:`nanobatch.output.carried`): their latest
    record names it, and it is as nanobatch left it (not one a retouch left behind)."""
    items: set[str] = set()
    for folder, _, files in os.walk(out_dir / STEPS_FOLDER):
        for name in files:
            path = os.path.join(folder, name)
            kept = os.path.relpath(path, out_dir).replace(os.sep, "/")
            if (owner := index.loaded.owner(kept)) is not None and is_ours({kept: owner[1]}, kept, path):
                entry = index.get(owner[0])
                if entry is not None and entry.status != "ok" and kept in entry.files:
                    items.add(owner[0])
    return len(items)


def _written(index: _Index, item: str, work_key: str | None) -> bool:
    """Whether *item*'s latest record is of the work *work_key* and wrote its answer (a batch answer for it is
    landed): not one whose images could not be saved (a file of yours at its name), which keeps the answer."""
    entry = index.get(item)
    unsaved = entry is not None and entry.status == "failed" and entry.error_kind in UNSAVED_KINDS
    return entry is not None and entry.key == work_key and not unsaved


class _Index:
    """The folder's resume index, loaded at the first question: while the summary's figures hold, none is asked."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._index: ResultsIndex | None = None

    @property
    def loaded(self) -> ResultsIndex:
        if self._index is None:
            self._index = ResultsIndex.load(self.out_dir)
        return self._index

    def get(self, item_id: str) -> IndexEntry | None:
        return self.loaded.get(item_id)

    def close(self) -> None:
        if self._index is not None:
            self._index.close()


def _counts(out_dir: Path, summary: dict[str, Any], running: str | None) -> tuple[dict[str, Any], list[Any]]:
    """The folder's totals, the manifest and its items left, and the requests in doubt (the journal's)."""
    info = _totals_held(out_dir, summary, running)
    orphans = _orphans_held(out_dir, summary) if info is not None else None
    # The records are read (into the index) only when the summary's figures no longer hold: the results or the
    # journal changed since (a run died, or holds the folder now), or the manifest did (below).
    index = _Index(out_dir)
    with contextlib.closing(index):
        info = index.loaded.totals() if info is None else info
        orphans = orphaned_requests(out_dir, index.loaded) if orphans is None else orphans
        info["batch_answers_kept"] = answers_kept(out_dir, functools.partial(_written, index))
        info["steps_kept"] = _steps_kept(out_dir, index)
        manifest = summary.get("manifest")
        manifest = manifest if isinstance(manifest, str) and os.path.isfile(manifest) else None
        info["manifest"] = manifest
        left = _left_held(summary, out_dir, index) if manifest else None
        if manifest and left is None:
            left = _left(Path(manifest), out_dir, index.loaded, upload_to=_upload_to(summary.get(STATE)))
        info["left"], info["manifest_items"] = left if left is not None else (None, None)
    return info, orphans


# What summary.json holds beside the folder's totals (ResultsIndex.totals()).
_NOT_TOTALS = frozenset({"job", "manifest", "out_dir", "wall_s", "last_run", STATE})


def _totals_held(out_dir: Path, summary: dict[str, Any], running: str | None) -> dict[str, Any] | None:
    """The folder's totals as the last run's summary gives them, if they still hold: no run holds the folder,
    and results.jsonl is as that run left it (its size and mtime); else None."""
    state = summary.get(STATE)
    if running or not isinstance(state, dict) or state.get("results") is None or _outcome(summary) == STARTED:
        return None  # (a run's summary until it ends has no totals, only the state carried from the last one)
    if state["results"] != file_stamp(str(out_dir / RESULTS_FILE)):
        return None
    return {key: value for key, value in summary.items() if key not in _NOT_TOTALS}


def _left_held(summary: dict[str, Any], out_dir: Path, index: _Index) -> tuple[int, int] | None:
    """(items not done, items) of the manifest as the last run's summary counted them, if that still holds: its
    files unchanged (sizes and mtimes; or the same bytes, or rows appended to a CSV or JSONL source since the
    run's check, whose items are counted and added while results.jsonl is as the run left it) and no fewer
    entries in the output folder (a deleted output is work left); with the records appended to results.jsonl
    since (:func:`_left_since`). None: count them again."""
    state = summary.get(STATE)
    if not isinstance(state, dict) or not isinstance(state.get("left"), int) or not state.get("sources"):
        return None
    if state["sources"][0][0] != summary.get("manifest"):
        return None
    starts: dict[str, tuple[int, int]] | None = {}
    if any(stamp != file_stamp(path) for path, stamp in state["sources"]):
        starts = _rows_since(state)
        if starts is None:
            return None
    try:
        if folder_entries(out_dir) < state.get("entries", 0):
            return None
    except OSError:
        return None
    left = state["left"]
    if state.get("results") != file_stamp(str(out_dir / RESULTS_FILE)):
        if starts:  # a record appended since may be of a new row's item, which is counted below
            return None
        left = _left_since(state, out_dir, index)
        if left is None:
            return None
    new = _left(Path(state["sources"][0][0]), out_dir, index.loaded, starts, _upload_to(state)) if starts else (0, 0)
    return (left + new[0], state["items"] + new[1]) if new is not None else None


def _rows_since(state: dict[str, Any]) -> dict[str, tuple[int, int]] | None:
    """Where rows appended to the manifest's sources since the last run's check start (none: the same bytes
    saved again), as :mod:`nanobatch.run.unchanged` finds them; None if its files changed otherwise."""
    from ..run.unchanged import rows_since

    held = state.get(CHECK)
    if not isinstance(held, dict) or held.get("sources") != state["sources"]:  # changed while the run went
        return None
    return rows_since(held)


def _left_since(state: dict[str, Any], out_dir: Path, index: _Index) -> int | None:
    """The state's count of items not done, moved on by the records appended to results.jsonl since it was
    taken: each item with a new record counts as its latest record says now, not as it did then. None when the
    file was not only appended to (its first bytes up to the state's size changed: cut, rewritten), or a record
    since came from a run that was not of the state's manifest (``runs``: of items it may not have)."""
    results, digest = state.get("results"), state.get("results_digest")
    if not isinstance(results, list) or not results or not isinstance(results[0], int) or not isinstance(digest, str):
        return None
    size, path = results[0], out_dir / RESULTS_FILE
    try:
        if prefix_digest(path, size) != digest:  # also when the file is shorter now: fewer bytes read
            return None
    except OSError:
        return None
    runs = state.get("runs")
    if not index.loaded.runs_since(size) <= frozenset(runs if isinstance(runs, list) else ()):
        return None
    left: int = state["left"]
    done = functools.partial(_done, out_dir, index.loaded, _uploads(_upload_to(state)))
    for item_id, before, now in index.loaded.changes_since(size):
        # Done then if its record was ok: the state counted the files there, as the folder holds as many entries.
        left += (before is not None) - done(item_id, now)
    return left


def _done(
    out_dir: Path, index: ResultsIndex, uploads: Uploads | None, item_id: str, outputs: tuple[str, ...] | None
) -> bool:
    """Whether an item whose latest record is ok with these *outputs* (None: not ok) is done: its files there, or
    its objects in ``output.upload_to`` (*uploads*), as a run finds it."""
    if outputs is None:
        return False
    return outputs_there(out_dir, outputs) or uploads is not None and uploads.holds(index, item_id, outputs)


def _settings() -> Settings:
    """The settings a run started here would find (its config file search), for the items and the uploads."""
    from ..config import Settings, load_settings

    try:
        return load_settings()
    except ConfigError:
        return Settings()


def _upload_to(state: Any) -> str | None:
    """``output.upload_to`` as the last run had it (its summary's state says, whatever --config it was given),
    else as a run started here would find it."""
    if isinstance(state, dict) and "upload_to" in state:
        return state["upload_to"] if isinstance(state["upload_to"], str) else None
    return _settings().output.upload_to


def _uploads(prefix: str | None) -> Uploads | None:
    from ..output.upload import Uploads

    return Uploads(prefix) if prefix is not None else None


def _orphans_held(out_dir: Path, summary: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The requests in doubt as the last run left them, if the journal is still as it left it; else None."""
    state = summary[STATE]
    if not isinstance(state.get("orphans"), list) or state.get("journal") != file_stamp(str(out_dir / JOURNAL_FILE)):
        return None
    return list(state["orphans"])


def _outcome(summary: dict[str, Any]) -> Any:
    """How the last run ended, as the summary says (``started`` until it ends)."""
    last = summary.get("last_run")
    return last.get("outcome") if isinstance(last, dict) else None


def _last_run(last: Any, running: str | None) -> Any:
    """The last run as ``summary.json`` tells it; one whose summary still says it started, while no run holds
    the folder, never wrote its end: it was killed (SIGKILL, out of memory, a power cut) or crashed."""
    if not isinstance(last, dict) or last.get("outcome") != STARTED:
        return last
    if running:
        return {**last, "outcome": "running"}
    return {**last, "outcome": "crashed", "reason": "ended without a summary: killed or crashed"}


def _is_output_folder(folder: Path) -> bool:
    if any((folder / name).exists() for name in _RUN_FILES):
        return True
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and "last_run" in summary


def _output_folders_in(folder: Path, limit: int = 3) -> list[str]:
    """Up to *limit* output folders directly inside *folder* (``out`` given for ``out/example``)."""
    found: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in itertools.islice(entries, 1000):  # a glance, not a crawl of a huge folder
                if entry.is_dir(follow_symlinks=False) and _is_output_folder(Path(entry.path)):
                    found.append(entry.path)
                    if len(found) == limit:
                        break
    except OSError:
        return []
    return sorted(found)


def _left(
    path: Path, out_dir: Path, index: ResultsIndex, starts: Mapping[str, tuple[int, int]] | None = None,
    upload_to: str | None = None,
) -> tuple[int, int] | None:  # fmt: skip
    """How many items of the manifest at *path* have no ``ok`` record whose files are all there (new, failed,
    blocked, output deleted, or no longer valid), and how many it has; None if it cannot be read now. With
    *starts*, those of the rows appended to its sources since a run's check alone (``Manifest.since``)."""
    from ..job.manifest import load_manifest

    settings = _settings()  # the same search as a run's, for items that name no model
    done = functools.partial(_done, out_dir, index, _uploads(upload_to))
    left = total = 0

    def bad(_problems: object) -> None:
        nonlocal left, total
        left += 1
        total += 1

    try:
        manifest = load_manifest(path, default_model=settings.api.model).skipping(out_dir)
        manifest = manifest.since(starts) if starts else manifest
        for item in index.read_ahead(manifest.items(check_files=False, on_problem=bad)):
            total += 1
            entry = index.get(item.id)
            if not done(item.id, entry.outputs if entry is not None and entry.status == "ok" else None):
                left += 1
    except ManifestError:
        return None
    return left, total
