"""``nanobatch status``: what an output folder holds, from its results and summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .lock import current_holder
from .results import SUMMARY_FILE, ResultsIndex, orphaned_requests

__all__ = ["folder_status"]


def folder_status(out_dir: Path) -> dict[str, Any]:
    """Counts, tokens, cost and failures by kind from ``results.jsonl``; the last run from ``summary.json``."""
    with ResultsIndex.load(out_dir) as index:
        info = index.totals()
        orphans = orphaned_requests(out_dir, index)
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}
    info["last_run"] = summary.get("last_run")
    info["running"] = current_holder(out_dir)
    # While a run holds the folder, its unanswered requests are simply in flight, not lost.
    info["in_flight"] = len(orphans) if info["running"] else 0
    info["possibly_charged"] = 0 if info["running"] else len(orphans)
    info["possibly_charged_ids"] = [] if info["running"] else sorted({o["id"] for o in orphans})
    return info
