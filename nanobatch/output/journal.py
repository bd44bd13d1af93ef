"""What the folder's journal (``journal.jsonl``) tells once a run died: the requests it sent that nothing settled,
and the files it wrote that no record names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from ..names import JOURNAL_FILE
from .files import Stamp, stamp_of
from .results import ResultsIndex

__all__ = ["Recovered", "orphaned_requests", "recover"]


class Recovered(NamedTuple):
    """What a dead run's journal leaves, read in one pass (:func:`recover`)."""

    orphans: list[dict[str, Any]]  # its requests in doubt (see orphaned_requests)
    carried: list[bytes]  # its claim lines to keep, until a record names what they claim
    upload_claims: list[tuple[str, str, int]]  # (item id, URL, size) for Uploads.adopt


def recover(path: Path, index: ResultsIndex) -> Recovered:
    """The journal at *path*: its requests in doubt, its claims on files (adopted into *index* where the file is
    there as claimed, unless their run withdrew them) and on objects in ``output.upload_to`` (for the run to adopt
    once it looks)."""
    doubt, carried, claims = _InDoubt(index), [], []
    withdrawn = _withdrawals(path)
    for entry in _journal_entries(path, ("dispatched", "settled", "writing", "uploading", "restored")):
        event = entry["event"]
        if event in ("dispatched", "settled"):
            doubt.see(entry)
            continue
        if event == "writing":
            # (withdrawn by its own run: its move was refused, and what is there is still its owner's)
            withdrew = (entry.get("run"), entry["id"]) in withdrawn
            line = None if withdrew else _write_claim(entry, path.parent, index)
        elif event == "uploading":
            line, claimed = _upload_claim(entry, index)
            claims += claimed
        else:
            line = _restore_claim(entry, index)
        if line is not None:
            carried.append(line)
    return Recovered(list(doubt.open.values()), carried, claims)


def _withdrawals(path: Path) -> set[tuple[Any, str]]:
    """(run, item id) of each claim its run withdrew (a run writes an item once): the journal is read through once
    more rather than held (a night's has a line per request), and only the lines that withdraw are parsed."""
    found: set[tuple[Any, str]] = set()
    if path.exists():
        with path.open("rb") as f:
            for line in f:
                if b'"event":"withdrawn"' in line and isinstance(entry := _parsed(line), dict):
                    found.add((entry.get("run"), str(entry.get("id"))))
    return found


def orphaned_requests(out_dir: Path, index: ResultsIndex) -> list[dict[str, Any]]:
    """Requests the journal says were sent, not settled by an error answer, whose item has no result from that
    run (the run died, or stopped before the item's last step); one entry per request; *index* is the folder's
    loaded :class:`ResultsIndex`."""
    doubt = _InDoubt(index)
    for entry in _journal_entries(out_dir / JOURNAL_FILE, ("dispatched", "settled")):
        doubt.see(entry)
    return list(doubt.open.values())


class _InDoubt:
    """Requests in doubt, by (run, id, attempt): sent, not settled by an error answer, their item not recorded."""

    def __init__(self, index: ResultsIndex) -> None:
        self.index = index
        self.open: dict[tuple[Any, str, Any], dict[str, Any]] = {}

    def see(self, entry: dict[str, Any]) -> None:
        request = (entry.get("run"), entry["id"], entry.get("attempt"))
        if entry["event"] == "settled":
            self.open.pop(request, None)
            return
        latest = self.index.get(entry["id"])
        if latest is None or latest.run != entry.get("run"):
            self.open[request] = entry


def _write_claim(entry: dict[str, Any], folder: Path, index: ResultsIndex) -> bytes | None:
    """A claim on files nanobatch was about to write that no record names (the run died between the image and
    its record): each made *index*'s, so that it may be replaced, if the file now under its name has the size
    claimed (a write that was refused, or never happened, leaves what is there to its owner), with the stamp it
    has now; so is a file of the item's that the dead run replaced (its record's stamp is the old file's). The
    line to keep until a record names them; a claim without sizes (an older run's) adopts nothing, and nor does
    one the claiming run's own record settled: that record names the files with the stamps they were left with,
    so one edited since (even to the same size) is the user's."""
    latest = index.get(entry["id"])
    if latest is not None and latest.run == entry.get("run"):
        return None
    names, sizes = entry.get("files") or (), entry.get("sizes") or ()
    claimed = dict(zip(map(str, names), sizes, strict=False))
    moved: dict[str, Stamp] = {
        str(n): (int(s[0]), int(s[1]))
        for n, s in zip(names, entry.get("stamps") or (), strict=False)
        if isinstance(s, list) and len(s) == 2
    }
    owned = index.owned(entry["id"], claimed)
    found = {name: stamp_of(str(folder / name)) for name in claimed}
    fresh = {name: stamp for name, stamp in found.items() if name not in owned or owned[name] not in (None, stamp)}
    adopted = {
        name: stamp for name, stamp in fresh.items() if stamp and _as_claimed(stamp, claimed[name], moved.get(name))
    }
    if not adopted:
        return None
    index.adopt(entry["id"], adopted)
    files = sorted(adopted)
    kept = {"files": files, "sizes": [claimed[n] for n in files], "stamps": [moved.get(n) for n in files]}
    return orjson.dumps({**entry, **kept}) + b"\n"


def _as_claimed(found: Stamp, size: Any, moved: Stamp | None) -> bool:
    """Whether the file *found* there is the one claimed: a moved file by the stamp it had (a rename keeps it: a
    copy of it, or another file of its size, is not it), a written one by its *size*."""
    return found == moved if moved is not None else found[0] == size


def _upload_claim(entry: dict[str, Any], index: ResultsIndex) -> tuple[bytes | None, list[tuple[str, str, int]]]:
    """A claim on objects nanobatch was about to PUT to ``output.upload_to``: each (item id, URL, size claimed),
    for the run to adopt once it sees an object of that size there (:meth:`~nanobatch.output.upload.Uploads.adopt`),
    unless the claiming run's record settled them; and the line, kept while a record does not name them all (the
    run died between the PUT and the record, or one PUT of the item failed after another landed)."""
    latest = index.get(entry["id"])
    if latest is not None and latest.status == "ok" and latest.run == entry.get("run"):
        return None, []  # settled: the claiming run's record names each object at the version it PUT
    urls, sizes = [str(url) for url in entry.get("urls") or ()], entry.get("sizes") or ()
    recorded = index.uploaded(entry["id"], urls)
    claimed = list(zip(urls, sizes, strict=False))
    line = orjson.dumps(entry) + b"\n" if any(url not in recorded for url, _ in claimed) else None
    return line, [(entry["id"], url, int(size)) for url, size in claimed]


def _restore_claim(entry: dict[str, Any], index: ResultsIndex) -> bytes | None:
    """An object nanobatch put that no record names as it is (``restored``: put back from the folder's copy, or
    adopted from a dead run's claim): counted with its new stamp while the records still name the one it
    replaced (or none); the line, to keep until a record names another (the item was made again)."""
    try:
        url, was, now = str(entry["url"]), entry["was"], entry["now"]
        was, now = None if was is None else (int(was[0]), str(was[1])), (int(now[0]), str(now[1]))
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if index.uploaded(entry["id"], [url]).get(url) not in (was, now):  # (None: no record names it with a stamp)
        return None
    index.adopt_uploads(entry["id"], {url: now})
    return orjson.dumps(entry) + b"\n"


def _journal_entries(path: Path, events: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The journal's entries of the given *events* that name an item (``id``); none when there is no journal.
    A line torn by the crash the journal is there to report is passed over."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            entry = _parsed(line)
            if isinstance(entry, dict) and entry.get("event") in events and isinstance(entry.get("id"), str):
                yield entry


def _parsed(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
