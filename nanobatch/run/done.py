"""The work an output folder holds done, as a check counts it: for each item, whether a run would skip it."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError
from ..inputs.stamps import FileStamp, file_digest, is_remote, work_key
from ..item import WorkItem
from ..job.pictures import PictureCheck
from ..names import RESULTS_FILE, FoldersIn, item_stems
from ..output.results import ResultsIndex
from ..output.upload import Uploads

__all__ = ["DoneWork", "NewRows"]

_OkEntry = tuple[str | None, tuple[str, ...], Mapping[str, FileStamp]]  # ResultsIndex.ok_entry's: key, outputs, stamps
_TOLD_UP_TO = 16384  # entries kept for items told of and not met yet (an item never met is asked for again)


class DoneWork:
    """The output folder's results, asked for each item of a check whether a run would skip it as done: its
    latest record ok for the same work (the key, from the stamps of inputs that have not changed since) and
    its files there. An item with a URL or bucket input counts as done when ok with its files there (its
    bytes are not fetched to check). Its files, like its pictures, may have been stat-ed a moment before by the
    process that looks at pictures ahead (:func:`~nanobatch.job.pictures.looked_ahead`)."""

    def __init__(
        self, out_dir: Path, index: ResultsIndex, pictures: PictureCheck | None = None, upload_to: str | None = None
    ) -> None:
        self.out_dir = out_dir
        self._in = os.path.join(out_dir, "")  # a name's path: this and the name, as os.path.join gives it
        self.index = index
        self.pictures = pictures  # the check's, if it reads pictures: it tells which it found as stamped
        self.items = self.requests = 0
        self.uploads = Uploads(upload_to) if upload_to is not None else None  # an item done there is done
        self._last: tuple[str | None, _OkEntry | None] = (None, None)
        # The items coming next (ahead()), by id: their ok entries (None: not ok), until each is met
        self._told: OrderedDict[str, _OkEntry | None] = OrderedDict()

    @classmethod
    def of(cls, out_dir: Path, pictures: PictureCheck | None = None, upload_to: str | None = None) -> DoneWork | None:
        """The results of *out_dir* (its images uploaded to *upload_to*, ``output.upload_to``); None when it has
        none."""
        if not (out_dir / RESULTS_FILE).is_file():
            return None
        return cls(out_dir, ResultsIndex.load(out_dir), pictures, upload_to)

    def _entry(self, item_id: str | None) -> _OkEntry | None:
        """The key, outputs and input stamps of *item_id*'s latest record, if it is ok (asked once per item)."""
        if item_id is None:
            return None
        if self._last[0] != item_id:
            entry = self._told.pop(item_id) if item_id in self._told else self.index.ok_entry(item_id)
            self._last = (item_id, entry)
        return self._last[1]

    def ahead(self, ids: list[str | None]) -> dict[str, list[str]]:
        """The ids of the items a check takes next: their entries are read together. Returns the paths of the
        files each ok one's record wrote, to be stat-ed with its pictures."""
        told = list({item_id for item_id in ids if item_id is not None})
        entries = self.index.ok_entries(told) if told else {}
        for item_id in told:
            self._told[item_id] = entries.get(item_id)
        while len(self._told) > _TOLD_UP_TO:
            self._told.popitem(last=False)
        if self.pictures is None:  # a check that reads no pictures looks at nothing ahead
            return {}
        return {item_id: [self._path(name) for name in entry[1]] for item_id, entry in entries.items()}

    def _path(self, name: str) -> str:
        return name if name[:1] == os.sep else self._in + name  # os.path.join(out_dir, name), called per item

    def stamps(self, item_id: str | None) -> Mapping[str, FileStamp]:
        """The stamps of the inputs of *item_id*'s ok record: pictures unchanged since were sent and answered."""
        entry = self._entry(item_id)
        return entry[2] if entry is not None else {}

    def add(self, item: WorkItem) -> bool:
        """Whether *item* is done (then counted): as :func:`~nanobatch.output.resume.is_done` says a run finds it."""
        entry = self._entry(item.id)
        if entry is None:
            return False
        recorded, outputs, stamps = entry
        if not self.same_work(item, recorded, stamps):
            return False
        if not self._there(outputs) and not self._uploaded(item.id, outputs):
            return False
        self.items += 1
        self.requests += len(item.steps)
        return True

    def _there(self, outputs: tuple[str, ...]) -> bool:
        """Whether each of *outputs* is a file in the output folder (as :func:`~nanobatch.output.resume.outputs_there`
        says): as looked at ahead, if it was."""
        looked = self.pictures.ahead if self.pictures is not None else {}
        for name in outputs:
            path = self._path(name)
            if path not in looked and not os.path.isfile(path):
                return False
        return True

    def _uploaded(self, item_id: str | None, outputs: tuple[str, ...]) -> bool:
        """Whether a record of *item_id* put each of *outputs* in ``output.upload_to``, as a run counts it done."""
        return self.uploads is not None and item_id is not None and self.uploads.holds(self.index, item_id, outputs)

    def same_work(self, item: WorkItem, recorded: str | None, stamps: Mapping[str, FileStamp]) -> bool:
        """Whether *item* is still the work a record of key *recorded* and input *stamps* did (an item with a URL
        or bucket input is, its bytes not fetched to tell)."""
        key = recorded if any(map(is_remote, item.inputs)) else self._key(item, stamps)
        return key is not None and key == recorded

    def _key(self, item: WorkItem, stamps: Mapping[str, FileStamp]) -> str | None:
        """The work key of *item*, from the digests its record stamped its inputs with; None if one changed. A file
        only touched (its size the same, its time not: a sync tool) is hashed again, as a run does: the same bytes
        are the same work."""
        digests = []
        unchanged = self.pictures.unchanged if self.pictures is not None else ()
        for ref in item.inputs:
            stamp = stamps.get(ref)
            if ref in unchanged:  # the check found it as stamped (its stat just taken)
                digests.append(stamp[2])  # type: ignore[index]
                continue
            try:
                st = os.stat(ref)
                if stamp is None or st.st_size != stamp[0]:
                    return None
                if st.st_mtime_ns != stamp[1] and file_digest(ref) != stamp[2]:
                    return None
            except (OSError, InputError):
                return None
            digests.append(stamp[2])
        return work_key(item, digests)

    def close(self) -> None:
        self.index.close()


class NewRows:
    """The items of the rows appended to a catalog since the last run's check, which holds for the rest
    (:mod:`~nanobatch.run.unchanged`), as the check of those rows alone meets them: whether one may clash with a
    done item, which the whole check would tell. One may when its id is a done item's, a file the folder's
    items were given (any run's) is named as its images or a folder of theirs could be (``<stem>-``,
    ``<stem>.``, ``<stem>/``; ``<folder>``, ``<folder>-``, ``<folder>.``, and the same for a folder's name
    without its extension, but not the files in the folder), or it reads a picture in the output folder. Most
    new rows are new products, and meet none of these: a row that does has the whole check run."""

    def __init__(self, done: DoneWork) -> None:
        self.index = done.index
        self._inside = FoldersIn(done.out_dir)
        self.may_clash = False

    def add(self, item: WorkItem) -> None:
        if not self.may_clash:
            self.may_clash = (
                self.index.get(item.id) is not None
                or any(map(self._named, item_stems(item)))
                or any(self._in_folder(ref) for ref in item.inputs if not is_remote(ref))
            )

    def _in_folder(self, ref: str) -> bool:
        """Whether the picture *ref*, or the file it links to, is in the output folder."""
        real = self._inside.real
        return real(os.path.dirname(ref)) is not None or real(os.path.dirname(os.path.realpath(ref))) is not None

    def _named(self, stem_step: tuple[str, int | None]) -> bool:
        stem = stem_step[0].replace(os.sep, "/")
        # "-", "." and "/" are consecutive characters, then "0": [stem-, stem0) holds the names going on with them
        if self.index.owns_between(stem + "-", stem + "0"):
            return True
        parts = stem.split("/")[:-1]
        for depth in range(1, len(parts) + 1):  # a file named as a folder on its way, or that folder less ".png"
            folder = "/".join(parts[:depth])  # (the files in it are not: the done items beside the new one)
            if self.index.owns_between(folder, folder + "/"):
                return True
            base = os.path.splitext(folder)[0]
            if base != folder and self.index.owns_between(base + "-", base + "/"):
                return True
        return False
