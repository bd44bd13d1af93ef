"""The API key pasted into a manifest: found by the check before a run, and refused without being shown."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings, read_api_key
from ..errors import ConfigError, ManifestError, Problem
from ..item import WorkItem
from ..job.manifest import Manifest

__all__ = ["PastedKey"]

# Shorter "keys" (a simulator's "sim-key") would find ordinary words; real ones are 39 characters or more.
MIN_KEY = 16


class PastedKey:
    """The job's name or output folder, or items, that hold the API key: in an item's id, an instruction, the
    output name, a picture's reference or the model id it would go to the model in the request (the model id in
    its URL, which proxies log); anywhere it would go into ``results.jsonl``, the report, ``summary.json``, the
    metrics file's labels, the webhook's notice and the log lines that name the job or the item. Each is a
    problem; none names the key, and one in an id names no item either."""

    def __init__(self, key: str | None) -> None:
        self.key = key if key is not None and len(key) >= MIN_KEY else None
        self.problems: list[Problem] = []

    @classmethod
    def of(cls, settings: Settings) -> PastedKey:
        """The check for the key *settings* lead to; it finds nothing when there is none (or one the run will
        refuse itself)."""
        try:
            return cls(read_api_key(settings))
        except ConfigError:
            return cls(None)

    def check_job(self, job: Manifest, out_dir: Path, *, out_given: bool) -> None:
        """Raise :class:`ManifestError` if *job*'s name or its output folder *out_dir* (``--out`` when
        *out_given*) holds the key: nothing of the job is checked, written or told before."""
        if (key := self.key) is None:
            return
        if key in job.name:
            fld = "name"
        elif key in str(out_dir):
            fld = "--out" if out_given else "output_dir" if job.output_dir is not None else "output.dir"
        else:
            return
        message = "holds the API key: take it out (it would name the output folder and be written into summary.json)"
        raise ManifestError([Problem(str(job.path), None, fld, message)])

    def check(self, item: WorkItem, file: str) -> None:
        """*item*, from *file* (the manifest, or a source's row: ``catalog.csv:12``)."""
        if (key := self.key) is None:
            return
        fld = "id" if key in item.id else "output" if item.output is not None and key in item.output else None
        if fld is None:
            fld = next(("instruction" for step in item.steps if key in step), None)
        if fld is None:
            fld = next(("image" for ref in item.inputs if key in ref), None)
        if fld is None and key in item.model:  # the item's own, or the manifest's, --model's or api.model's
            fld = "model"
        if fld is not None:
            message = "holds the API key: take it out (it would be sent to the model and written into the records)"
            self.problems.append(Problem(file, None if fld == "id" else item.id, fld, message))
