"""The API key pasted into a manifest: found by the check before a run, and refused without being shown."""

from __future__ import annotations

from ..errors import Problem
from ..item import WorkItem

__all__ = ["PastedKey"]

# Shorter "keys" (a simulator's "sim-key") would find ordinary words; real ones are 39 characters or more.
MIN_KEY = 16


class PastedKey:
    """Items that hold the API key in their id, an instruction, the output name, a picture's reference or the
    model id: the key would go to the model in the request (the model id in its URL, which proxies log) and
    into ``results.jsonl``, the report and the log lines that name the item. Each is a problem; none names the
    key, and one in an id names no item either."""

    def __init__(self, key: str | None) -> None:
        self.key = key if key is not None and len(key) >= MIN_KEY else None
        self.problems: list[Problem] = []

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
