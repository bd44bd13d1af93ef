"""nanobatch: bulk image edits through Google's Gemini image models, safely and within limits.

>>> import nanobatch
>>> summary = await nanobatch.run_job("jobs/example.yaml", simulate=True)
>>> summary.exit_code
0
"""

from __future__ import annotations

from .config import Settings, load_settings
from .engine import RunStats
from .errors import (
    ApiError,
    ConfigError,
    FatalApiError,
    Interrupted,
    LockHeld,
    ManifestError,
    NanobatchError,
    Problem,
    RunAborted,
    UsageError,
)
from .gemini import Image, Reply
from .manifest import Manifest, WorkItem, load_manifest
from .runner import CheckResult, RunSummary, check_job, run_job

__all__ = [
    "ApiError",
    "CheckResult",
    "ConfigError",
    "FatalApiError",
    "Image",
    "Interrupted",
    "LockHeld",
    "Manifest",
    "ManifestError",
    "NanobatchError",
    "Problem",
    "Reply",
    "RunAborted",
    "RunStats",
    "RunSummary",
    "Settings",
    "UsageError",
    "WorkItem",
    "check_job",
    "load_manifest",
    "load_settings",
    "run_job",
]

__version__ = "0.1.0"
