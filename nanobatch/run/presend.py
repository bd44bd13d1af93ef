"""The settings checked before anything is sent: what ``check_job`` (``validate``, ``run --dry-run``, and the
check a run starts with) refuses in them, before it goes through the items."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..output.outdir import OutDir

__all__ = ["check_settings"]


def check_settings(settings: Settings, target: Path, job: str) -> None:
    """ConfigError for an output folder, a Vertex AI project or location, an ``output.upload_to`` or an
    ``output.metrics_file`` (of the job *job*) that cannot be used."""
    OutDir.check(target)
    if settings.output.metrics_file:
        from .metrics import metrics_file

        metrics_file(settings.output.metrics_file, job)
    if settings.api.backend == "vertex":
        from ..api.vertex import vertex_route

        vertex_route(settings.api.project, settings.api.location)
    if settings.output.upload_to is not None:
        from ..output.upload import Uploads

        Uploads.check(settings.output.upload_to)
