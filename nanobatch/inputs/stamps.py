"""What an item's inputs are, as far as its work key needs: local or remote, and each local file's stamp.

* :func:`local_stamps`: (size, mtime, SHA-256) of local input files, hashing only those changed since the
  last run, so that a re-run over a finished catalog skips its items without reading their pictures.
* :func:`work_key`: a digest of everything that decides an item's output.

Bucket inputs are stamped in ``remote.py``; pictures are loaded to be sent in ``load.py``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from ..api.gemini import Image
from ..api.storage import is_bucket_url
from ..errors import InputError
from ..item import WorkItem
from ..models import MAX_INPUT_BYTES

__all__ = ["FileStamp", "file_digest", "image_digest", "is_remote", "is_url", "local_stamps", "unreadable", "work_key"]

# Files up to this size are read and hashed on the event loop: a thread hand-off costs the loop more (~0.1 ms
# and a trip of the GIL) than reading and hashing them (~0.04 ms for 64 KiB); bigger ones go to a thread.
INLINE_BYTES = 64 * 2**10


def is_url(ref: str) -> bool:
    return ref[:8].lower().startswith(("http://", "https://"))


def is_remote(ref: str) -> bool:
    """An http(s) URL or a bucket URL: not a local file."""
    return "://" in ref and (is_url(ref) or is_bucket_url(ref))  # a path without "://": the usual input


def unreadable(path: str, exc: OSError) -> InputError:
    """A local input picture that cannot be read (to hash or to send) fails its item."""
    return InputError(f"cannot read input image {path}: {exc.strerror or exc}")


# (size, mtime_ns, sha256) of a local file as last seen: the digest is reused while the file is unchanged.
FileStamp = tuple[int, int, str]


def _stat(path: str) -> os.stat_result | None:
    """The file's stat (a few microseconds); None when it cannot be had: reading it then says what is wrong."""
    try:
        return os.stat(path)
    except OSError:
        return None


def _file_digest(path: str, keep_up_to: int = 0) -> tuple[FileStamp, bytes | None]:
    """The file's stamp, and its bytes when it has at most *keep_up_to* of them (else None)."""
    data: bytes | None = None
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if 0 < st.st_size <= keep_up_to:
                data = f.read()
                digest = hashlib.sha256(data)
                if len(data) > keep_up_to:
                    data = None  # it grew while being read
            else:
                digest = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    except OSError as exc:
        raise unreadable(path, exc) from None
    return (st.st_size, st.st_mtime_ns, digest.hexdigest()), data


def file_digest(path: str) -> str:
    """The SHA-256 of the file at *path*, as a stamp holds it. Raises :class:`InputError` if it cannot be read."""
    return _file_digest(path)[0][2]


async def local_stamps(
    refs: Sequence[str],
    known: Mapping[str, FileStamp],
    *,
    contents: dict[str, bytes] | None = None,
    keep_up_to: int = MAX_INPUT_BYTES,
) -> dict[str, FileStamp] | None:
    """Stamps of an item's local input files, reading only those changed since *known*; None if any is a URL.

    This is what lets a nightly re-run over a finished catalog skip every item without reading its pictures:
    unchanged files cost one stat each, inline; only changed or new files are hashed: inline if each is at most
    :data:`INLINE_BYTES`, else in one worker thread hand-off. With *contents*, the bytes of each file hashed (if
    at most *keep_up_to*) are put there, so that sending the item does not read it again: the bytes sent are the
    bytes hashed.
    """
    if any(is_remote(ref) for ref in refs):
        return None
    stamps: dict[str, FileStamp] = {}
    missing: list[str] = []
    small = True  # every file to hash is at most INLINE_BYTES
    for ref in refs:  # one stat each: unchanged (its size and time as known), or to hash, and how
        st, seen = _stat(ref), known.get(ref)
        if st is not None and seen is not None and (seen[0], seen[1]) == (st.st_size, st.st_mtime_ns):
            stamps[ref] = seen
        else:
            missing.append(ref)
            small = small and st is not None and st.st_size <= INLINE_BYTES
    if missing:
        keep = keep_up_to if contents is not None else 0
        if small:
            hashed = {ref: _file_digest(ref, keep) for ref in missing}
        else:
            hashed = await anyio.to_thread.run_sync(lambda: {ref: _file_digest(ref, keep) for ref in missing})
        for ref, (stamp, data) in hashed.items():
            stamps[ref] = stamp
            if data is not None and contents is not None:
                contents[ref] = data
    return stamps


def work_key(item: WorkItem, digests: Sequence[str]) -> str:
    """A digest of everything that decides the item's output: settings, instructions and the inputs' digests.

    *digests* are the SHA-256 of each input's bytes, in order (the file's bytes for a local path,
    the downloaded bytes for a URL).
    """
    # json.dumps({"v": 1, "settings": item.settings(), "inputs": [...]}, sort_keys=True), its settings part
    # written once for every item that shares them (tests/test_resume.py holds the two to the same text).
    settings = _settings_json(
        item.model, item.steps, item.aspect_ratio, item.image_size, item.response_modalities, item.thinking_level,
        item.resize_inputs, item.output_format,
    )  # fmt: skip
    doc = '{"inputs": ' + _json_texts(digests) + ', "settings": ' + settings + ', "v": 1}'
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def _json_texts(texts: Sequence[str]) -> str:
    """``json.dumps(list(texts))``; written directly for hex digests (letters and digits: nothing to escape)."""
    joined = "".join(texts)
    if joined.isascii() and joined.isalnum():
        return '["' + '", "'.join(texts) + '"]'
    return json.dumps(list(texts))


@functools.lru_cache(maxsize=256)  # most items share their settings: a catalog's few shapes
def _settings_json(*fields: Any) -> str:
    model, steps, aspect_ratio, image_size, modalities, thinking_level, resize_inputs, output_format = fields
    item = WorkItem(
        id="-", model=model, inputs=(), steps=steps, aspect_ratio=aspect_ratio, image_size=image_size,
        response_modalities=modalities, thinking_level=thinking_level, resize_inputs=resize_inputs,
        output_format=output_format,
    )  # fmt: skip
    return json.dumps(item.settings(), sort_keys=True)


def image_digest(image: Image) -> str:
    return hashlib.sha256(image.data).hexdigest()
