"""nanobatch: bulk image edits through Google's Gemini image models, safely and within limits.

>>> import nanobatch
>>> summary = await nanobatch.run_job("jobs/example.yaml", simulate=True)
>>> summary.exit_code
0
"""

from __future__ import annotations

import importlib
import importlib.util
import typing

if typing.TYPE_CHECKING:
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

# Imported when first used, so that `nanobatch --help` does not load the HTTP stack, pydantic or the
# simulator (PEP 562): each public name, and the module it lives in.
_LAZY = {
    **dict.fromkeys(("Settings", "load_settings"), "config"),
    "RunStats": "engine",
    **dict.fromkeys(
        ("ApiError", "ConfigError", "FatalApiError", "Interrupted", "LockHeld", "ManifestError", "NanobatchError",
         "Problem", "RunAborted", "UsageError"),
        "errors",
    ),
    **dict.fromkeys(("Image", "Reply"), "gemini"),
    **dict.fromkeys(("Manifest", "WorkItem", "load_manifest"), "manifest"),
    **dict.fromkeys(("CheckResult", "RunSummary", "check_job", "run_job"), "runner"),
}  # fmt: skip


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule: nanobatch.results, ...
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
