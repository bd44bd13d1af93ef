"""nanobatch: bulk image edits through Google's Gemini image models, safely and within limits.

>>> import nanobatch
>>> summary = await nanobatch.run_job("jobs/example.yaml", simulate=True)
>>> summary.stats.ok, summary.stats.rejected, summary.exit_code  # two items rejected by the checks, on purpose
(7, 2, 1)
"""

from __future__ import annotations

import importlib
import importlib.util
import typing

if typing.TYPE_CHECKING:
    from .api.gemini import Image, Reply
    from .config import Settings, load_settings
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
    from .item import WorkItem
    from .job.manifest import Manifest, load_manifest
    from .run.preflight import CheckResult, check_job
    from .run.recheck import RecheckResult, recheck
    from .run.runner import RunSummary, run_job
    from .run.stats import RunStats

# Imported when first used, so that `nanobatch --help` does not load the HTTP stack, pydantic or the
# simulator (PEP 562): each public name, and the module it lives in.
_LAZY = {
    **dict.fromkeys(("Settings", "load_settings"), "config"),
    "RunStats": "run.stats",
    **dict.fromkeys(
        ("ApiError", "ConfigError", "FatalApiError", "Interrupted", "LockHeld", "ManifestError", "NanobatchError",
         "Problem", "RunAborted", "UsageError"),
        "errors",
    ),
    **dict.fromkeys(("Image", "Reply"), "api.gemini"),
    **dict.fromkeys(("Manifest", "load_manifest"), "job.manifest"),
    "WorkItem": "item",
    **dict.fromkeys(("CheckResult", "check_job"), "run.preflight"),
    **dict.fromkeys(("RunSummary", "run_job"), "run.runner"),
    **dict.fromkeys(("RecheckResult", "recheck"), "run.recheck"),
}  # fmt: skip


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule: nanobatch.output.results, ...
        raise AttributeError(f"module 'nanobatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
    "RecheckResult",
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
    "recheck",
    "run_job",
]

__version__ = "0.1.0"
