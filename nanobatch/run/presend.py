"""The settings checked before anything is sent: what ``check_job`` (``validate``, ``run --dry-run``, and the
check a run starts with) refuses in them, before it goes through the items."""

from __future__ import annotations

from pathlib import Path

from ..api.credentials import check_credentials
from ..config import Settings
from ..output.outdir import OutDir

__all__ = ["check_settings"]


def check_settings(
    settings: Settings, target: Path, job: str, *, simulate: bool = False, key_needed: bool = True
) -> None:
    """ConfigError for the first setting that cannot be used, in this order: the output folder, an
    ``output.metrics_file`` (of the job *job*), the API key (if *key_needed*) and Vertex AI's project, location
    and credentials (none with *simulate*: the built-in simulator takes neither), and ``output.upload_to``
    (last: its bucket is asked whether it is there)."""
    OutDir.check(target)
    if settings.output.metrics_file:
        from .metrics import metrics_file

        metrics_file(settings.output.metrics_file, job)
    check_credentials(settings, simulate=simulate, needed=key_needed)
    if settings.output.upload_to is not None:
        from ..output.upload import Uploads

        Uploads.check(settings.output.upload_to)
