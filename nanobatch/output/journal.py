"""What the folder's journal (``journal.jsonl``) tells once a run died: the requests it sent that nothing settled,
and the files it wrote that no record names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ..names import JOURNAL_FILE
from .files import stamp_of
from .results import ResultsIndex

__all__ = ["orphaned_requests", "restores_to_adopt", "uploads_to_adopt", "writes_to_adopt"]


def orphaned_requests(out_dir: Path, index: ResultsIndex) -> list[dict[str, Any]]:
    """Requests the journal says were sent, not settled by an error answer, whose item has no result from that
    run (the run died, or stopped before the item's last step); one entry per request; *index* is the folder's
    loaded :class:`ResultsIndex`."""
    # Requests in doubt, by (run, id, attempt): sent, not settled by an error answer, their item not recorded.
    open_requests: dict[tuple[Any, str, Any], dict[str, Any]] = {}
    for entry in _journal_entries(out_dir / JOURNAL_FILE, ("dispatched", "settled")):
        request = (entry.get("run"), entry["id"], entry.get("attempt"))
        if entry["event"] == "settled":
            open_requests.pop(request, None)
            continue
        latest = index.get(entry["id"])
        if latest is None or latest.run != entry.get("run"):
            open_requests[request] = entry
    return list(open_requests.values())


def writes_to_adopt(path: Path, index: ResultsIndex) -> list[bytes]:
    """Files the journal says nanobatch wrote that no record names (the run died between the image and its
    record): made *index*'s, so they may be replaced; returns their lines, to keep until a record names them.

    A claim is written before its files: a file is adopted only if the one under its name now has the size
    claimed (a write that was refused, or never happened, leaves what is there to its owner), with the stamp it
    has now; so is a file of the item's that the dead run replaced (its record's stamp is the old file's). A
    claim without sizes (an older run's) adopts nothing."""
    carried = []
    for entry in _journal_entries(path, ("writing",)):
        names, sizes = entry.get("files") or (), entry.get("sizes") or ()
        claimed = dict(zip(map(str, names), sizes, strict=False))
        owned = index.owned(entry["id"], claimed)
        found = {name: stamp_of(str(path.parent / name)) for name in claimed}
        fresh = {name: stamp for name, stamp in found.items() if name not in owned or owned[name] not in (None, stamp)}
        if adopted := {name: stamp for name, stamp in fresh.items() if stamp and stamp[0] == claimed[name]}:
            index.adopt(entry["id"], adopted)
            files = sorted(adopted)
            carried.append(orjson.dumps({**entry, "files": files, "sizes": [claimed[n] for n in files]}) + b"\n")
    return carried


def uploads_to_adopt(path: Path, index: ResultsIndex) -> tuple[list[bytes], list[tuple[str, str, int]]]:
    """The journal's claims on objects in ``output.upload_to``: each (item id, URL, size claimed), for the run to
    adopt once it sees an object of that size there (:meth:`~nanobatch.output.upload.Uploads.adopt`): one no
    record names (the run died between the PUT and the record, or one PUT of an item failed after another
    landed), or one a record names at an older version (a replacing PUT whose record was never written). Also
    the lines of those no record names, kept until one does."""
    carried, claims = [], []
    for entry in _journal_entries(path, ("uploading",)):
        urls, sizes = [str(url) for url in entry.get("urls") or ()], entry.get("sizes") or ()
        recorded = index.uploaded(entry["id"], urls)
        claimed = list(zip(urls, sizes, strict=False))
        if any(url not in recorded for url, _ in claimed):
            carried.append(orjson.dumps(entry) + b"\n")
        claims += [(entry["id"], url, int(size)) for url, size in claimed]
    return carried, claims


def restores_to_adopt(path: Path, index: ResultsIndex) -> list[bytes]:
    """The journal's objects put again from the folder's copy (``restored``): each counted with its new stamp
    while the item's record still names the one it replaced; their lines, to keep until a record names another
    (the item was made again, and its new object replaced the restored one)."""
    carried = []
    for entry in _journal_entries(path, ("restored",)):
        try:
            url, was, now = str(entry["url"]), (int(entry["was"][0]), str(entry["was"][1])), entry["now"]
            now = (int(now[0]), str(now[1]))
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        recorded = index.uploaded(entry["id"], [url]).get(url)
        if recorded in (was, now):
            index.adopt_uploads(entry["id"], {url: now})
            carried.append(orjson.dumps(entry) + b"\n")
    return carried


def _journal_entries(path: Path, events: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The journal's entries of the given *events* that name an item (``id``); none when there is no journal.
    A line torn by the crash the journal is there to report is passed over."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("event") in events and isinstance(entry.get("id"), str):
                yield entry
