"""``summary.json``: what a run did, and the folder's totals so far (the README's "Summary" section).

A run writes it twice: when it takes the folder (:func:`started_summary`: ``last_run.outcome`` is ``started``)
and when it ends (:func:`build_summary`). One that still says ``started`` once no run holds the folder was
never ended: the run was killed or crashed (``nanobatch status`` says so).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import FatalApiError
from ..names import JOURNAL_FILE, RESERVED_PREFIX, RESULTS_FILE, SUMMARY_FILE
from ..output.index_cache import prefix_digest
from ..percentiles import unsorted_percentile

if TYPE_CHECKING:  # only their types: `nanobatch status` reads STARTED without loading a run's machinery
    from ..job.manifest import Manifest
    from ..output.results import ResultsIndex
    from .limits import Gate
    from .stats import RunStats

__all__ = [
    "CHECK", "STARTED", "STATE", "RunClock", "build_summary", "file_stamp", "folder_entries", "folder_state",
    "last_state", "started_summary",
]  # fmt: skip

STARTED = "started"  # the outcome a run's summary has until the run ends
STATE = "state"  # summary.json's key for folder_state()
CHECK = "check"  # folder_state()'s key for what the run's check found and rested on (run.unchanged)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunClock:
    """When a run started: on the wall clock, for the ``started_at`` stamp, and on the event loop's monotonic
    clock, for its duration (the wall clock may be set, or jump, while a run goes)."""

    wall: float
    monotonic: float

    @classmethod
    def now(cls) -> RunClock:
        return cls(wall=time.time(), monotonic=anyio.current_time())

    def elapsed(self) -> float:
        return anyio.current_time() - self.monotonic


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _percentile(values: Sequence[float], q: float) -> float | None:
    return round(unsorted_percentile(values, q), 3) if values else None


def started_summary(manifest: Manifest, out_dir: Path, clock: RunClock, run_id: str, tier: str) -> dict[str, Any]:
    """What ``summary.json`` says while a run goes, until :func:`build_summary` replaces it: which run, since
    when. The folder's totals are left out: they are known when the run ends (``status`` counts them now).
    The last summary's ``state`` is kept (:func:`_carried_state`), so that ``status`` after this run is killed
    counts only the records it appended."""
    summary = {
        "job": manifest.name,
        "manifest": os.path.abspath(manifest.path),
        "out_dir": str(out_dir),
        "last_run": {"run": run_id, "outcome": STARTED, "reason": None, "started_at": _stamp(clock.wall),
                     "finished_at": None, "tier": tier},
    }  # fmt: skip
    state = _carried_state(out_dir, manifest, run_id)
    return summary if state is None else {**summary, STATE: state}


def _carried_state(out_dir: Path, manifest: Manifest, run_id: str) -> dict[str, Any] | None:
    """The ``state`` of the folder's summary as it is, for a run of *manifest* starting now: kept while the
    manifest is the one it counted, its files unchanged, and run *run_id* added to its ``runs`` (the runs since
    whose records are all of that manifest's items); None otherwise."""
    state = last_state(out_dir)
    files = manifest.files()
    if (
        state is None
        or not isinstance(state.get("left"), int)
        or not isinstance(state.get("results_digest"), str)
        or files is None
        or state.get("sources") != [[path, file_stamp(path)] for path in files]
    ):
        return None
    runs = state["runs"] if isinstance(state.get("runs"), list) else []
    # Not the journal's requests in doubt: the run has just taken them over (OutDir.recover), the journal anew.
    return {**{k: v for k, v in state.items() if k not in ("journal", "orphans")}, "runs": [*runs, run_id]}


def last_state(out_dir: Path) -> dict[str, Any] | None:
    """The ``state`` (:func:`folder_state`) of the folder's summary.json as the last run wrote it; None if it has
    none (no summary, one that cannot be read, or one written before this key)."""
    try:
        with (out_dir / SUMMARY_FILE).open("rb") as f:
            state = json.load(f).get(STATE)
    except (OSError, ValueError, AttributeError):
        return None
    return state if isinstance(state, dict) else None


def folder_state(
    manifest: Manifest, out_dir: Path, stats: RunStats, index: ResultsIndex, *, counted: bool,
    check: Mapping[str, Any] | None = None, upload_to: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What ``status`` needs to trust the figures of this summary without reading every record and item again:
    the stamps (size, mtime) of results.jsonl (and ``results_digest``: its head up to that size, so that records
    appended later can be counted on their own), of the journal and of the files the manifest's items come from
    (None: a glob or a bucket gives items too), how many entries the folder holds, the requests the journal
    leaves in doubt (``orphaned_requests``), the manifest's items and how many of them were not done when the
    run ended (None when not *counted*: ``--retry-failed`` passes over items without telling whether they are
    done). *check*: what the run's check found and rested on (``CheckResult.held``), for ``validate`` to answer
    from while it holds (:mod:`nanobatch.run.unchanged`)."""
    from ..output.journal import orphaned_requests

    files = manifest.files()
    try:
        count = folder_entries(out_dir)
    except OSError:
        count = 0
    results = file_stamp(str(out_dir / RESULTS_FILE))
    return {
        "results": results,
        "results_digest": _digest(out_dir / RESULTS_FILE, results),
        "journal": file_stamp(str(out_dir / JOURNAL_FILE)),
        "orphans": orphaned_requests(out_dir, index),
        "sources": None if files is None else [[path, file_stamp(path)] for path in files],
        "entries": count,
        "items": stats.total,
        "left": stats.total - stats.ok - stats.skipped if counted else None,
        CHECK: dict(check) if check is not None and counted else None,
        "upload_to": upload_to,  # where the run published: status counts an item whose objects are there as done
    }


def _digest(path: Path, stamp: list[int] | None) -> str | None:
    """:func:`prefix_digest` of the results file at *path* up to its size in *stamp*; None if it cannot be read."""
    try:
        return prefix_digest(path, stamp[0]) if stamp is not None else None
    except OSError:
        return None


def folder_entries(out_dir: Path) -> int:
    """The entries of the output folder that are not nanobatch's own working files (``.nanobatch*``: the lock,
    the journal, a worker's temporary images, which come and go): fewer than a summary counted is a file gone.
    Raises OSError."""
    return sum(not name.startswith(RESERVED_PREFIX) for name in os.listdir(out_dir))


def file_stamp(path: str) -> list[int] | None:
    """[size, mtime_ns] of the file at *path*; None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def build_summary(
    manifest: Manifest,
    out_dir: Path,
    outcome: str,
    reason: BaseException | None,
    stats: RunStats,
    index: ResultsIndex,
    gate: Gate,
    clock: RunClock,
    settings_tier: str = "standard",
) -> dict[str, Any]:
    """The object written as ``summary.json``: the folder's totals (*index*) and this run's counters (*stats*)."""
    folder = index.totals()
    return {
        "job": manifest.name,
        "manifest": os.path.abspath(manifest.path),  # absolute: `nanobatch status` finds it from anywhere
        "out_dir": str(out_dir),
        **folder,
        "wall_s": round(clock.elapsed(), 3),
        "last_run": {
            "outcome": outcome,
            "reason": str(reason) if reason else None,
            "fatal": reason.kind if isinstance(reason, FatalApiError) else None,
            "aborted": outcome == "aborted",  # budget, time limit, breaker, full disk, or a fatal API error
            "started_at": _stamp(clock.wall),
            "finished_at": _stamp(time.time()),
            "items": stats.total,
            "ok": stats.ok,
            "failed": stats.failed,
            "blocked": stats.blocked,
            "rejected": stats.rejected,
            "skipped": stats.skipped,
            "requests": stats.requests,
            "retries": dict(stats.retries),
            "tokens": dict(stats.tokens),
            "cost_usd": round(stats.cost_usd, 6),
            "tier": settings_tier,
            "fallbacks": stats.fallbacks,  # items with requests sent in a fallback tier
            "fallback_requests": stats.fallback_requests,
            "spent_usd": round(gate.budget.spent_usd, 6),
            "latency_s": {
                "p50": _percentile(stats.latencies, 0.5),
                "p95": _percentile(stats.latencies, 0.95),
                "max": max(stats.latencies, default=None),
            },
        },
    }
