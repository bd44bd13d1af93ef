"""``nanobatch status``: what an output folder holds, from its results and summary."""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ManifestError, UsageError
from ..names import JOURNAL_FILE, LOCK_FILE, RESULTS_FILE, SUMMARY_FILE
from ..output.lock import current_holder
from ..output.results import ResultsIndex, orphaned_requests
from ..run.batch.ledger import answers_kept, open_chunks
from ..run.summary import STARTED

__all__ = ["folder_status"]

# What a run leaves in its output folder: a folder with none of them is not one (an empty folder, a typo, /).
# summary.json is a common name: it counts only as nanobatch writes it (an object with "last_run").
_RUN_FILES = (RESULTS_FILE, JOURNAL_FILE, LOCK_FILE)


def folder_status(out_dir: Path) -> dict[str, Any]:
    """Counts, tokens, cost and failures by kind from ``results.jsonl``; the last run from ``summary.json``;
    with the manifest the last run named still there, how many of its items are not done.

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
    with ResultsIndex.load(out_dir) as index:
        info = index.totals()
        orphans = orphaned_requests(out_dir, index)
        info["batch_answers_kept"] = answers_kept(out_dir, functools.partial(_written, index))
        manifest = summary.get("manifest") if isinstance(summary, dict) else None
        manifest = manifest if isinstance(manifest, str) and os.path.isfile(manifest) else None
        info["manifest"] = manifest
        info["left"], info["manifest_items"] = _left(Path(manifest), out_dir, index) if manifest else (None, None)
    info["batch_jobs"] = [
        {"chunk": c.id, "job": c.job, "state": c.state, "requests": len(c.keys), **c.counts}
        for c in open_chunks(out_dir)
    ]
    info["running"] = current_holder(out_dir)
    info["last_run"] = _last_run(summary.get("last_run") if isinstance(summary, dict) else None, info["running"])
    # While a run holds the folder, its unanswered requests are simply in flight, not lost.
    info["in_flight"] = len(orphans) if info["running"] else 0
    info["possibly_charged"] = 0 if info["running"] else len(orphans)
    info["possibly_charged_ids"] = [] if info["running"] else sorted({o["id"] for o in orphans})
    return info


def _written(index: ResultsIndex, item: str, work_key: str | None) -> bool:
    """Whether *item*'s latest record is of the work *work_key* (a batch answer for it is landed)."""
    entry = index.get(item)
    return entry is not None and entry.key == work_key


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


def _left(path: Path, out_dir: Path, index: ResultsIndex) -> tuple[int | None, int | None]:
    """How many items of the manifest at *path* have no ``ok`` record whose files are all there (new, failed,
    blocked, output deleted, or no longer valid), and how many it has; Nones if it cannot be read now."""
    from ..config import Settings, load_settings
    from ..job.manifest import load_manifest

    try:
        model = load_settings().api.model  # the same search as a run's, for items that name no model
    except ConfigError:
        model = Settings().api.model
    left = total = 0

    def bad(_problems: object) -> None:
        nonlocal left, total
        left += 1
        total += 1

    try:
        manifest = load_manifest(path, default_model=model).skipping(out_dir)
        for item in manifest.items(check_files=False, on_problem=bad):
            total += 1
            entry = index.get(item.id)
            if (
                entry is None
                or entry.status != "ok"
                or not all(os.path.isfile(os.path.join(out_dir, name)) for name in entry.outputs)
            ):
                left += 1
    except ManifestError:
        return None, None
    return left, total
