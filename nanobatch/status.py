"""``nanobatch status``: what an output folder holds, from its results and summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .results import SUMMARY_FILE, ResultsIndex, orphaned_requests

__all__ = ["folder_status"]


def folder_status(out_dir: Path) -> dict[str, Any]:
    """Counts, tokens, cost and failures by kind from ``results.jsonl``; the last run from ``summary.json``."""
    info = ResultsIndex.load(out_dir).totals()
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}
    info["last_run"] = summary.get("last_run")
    orphans = orphaned_requests(out_dir)
    info["possibly_charged"] = len(orphans)
    info["possibly_charged_ids"] = sorted({o["id"] for o in orphans})
    return info
