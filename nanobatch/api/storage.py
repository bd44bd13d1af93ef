"""Objects in buckets: ``s3://``, ``gs://``, ``az://`` (or ``abfs://``) URLs, through fsspec's backends.

Each backend is an extra (``nanobatch[s3]``, ``[gcs]``, ``[azure]``; ``[cloud]`` for all) and takes its
credentials from its usual chain (environment, profile files, metadata server), never from a manifest.
Every function here is synchronous and may wait on the network: async code calls it in a worker thread
(``anyio.to_thread.run_sync``). Backend errors become :class:`~nanobatch.errors.StorageError` here and
nowhere else; messages name the URL, never a credential.

>>> stat("s3://photos/shoes/001.jpg")  # doctest: +SKIP
ObjectStamp(url='s3://photos/shoes/001.jpg', size=48213, version='"9b2cf535f27731c974343645a3985328"')
"""

from __future__ import annotations

import importlib
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from ..errors import StorageError, has_userinfo

__all__ = [
    "ObjectStamp",
    "check_bucket",
    "exists_many",
    "USERINFO_REFUSED",
    "is_bucket_url",
    "iter_glob",
    "open_read",
    "presign",
    "put",
    "read_bytes",
    "stat",
    "stat_many",
]


T = TypeVar("T")

# scheme -> (fsspec protocol, the module it needs, the extra that installs it)
_BACKENDS = {
    "s3": ("s3", "s3fs", "s3"),
    "gs": ("gcs", "gcsfs", "gcs"),
    "gcs": ("gcs", "gcsfs", "gcs"),
    "az": ("az", "adlfs", "azure"),
    "abfs": ("abfs", "adlfs", "azure"),
    "abfss": ("abfs", "adlfs", "azure"),
}
_URL = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<bucket>[^/?#]+)(?:/(?P<key>.*))?$", re.IGNORECASE)
_GLOB_CHARS = re.compile(r"[*?\[]")
_QUERY = re.compile(r"\?\S*")
PAGE_SIZE = 1000
HEAD_CONCURRENCY = 32
# At least this many objects asked about in one bucket are listed (one request per 1,000 keys) rather
# than asked about one by one, unless the listing holds more than LIST_OVERSCAN times as many objects.
LIST_THRESHOLD = 64
LIST_OVERSCAN = 4


@dataclass(frozen=True, slots=True)
class ObjectStamp:
    """What identifies one version of an object without downloading it: its size and ETag/generation."""

    url: str
    size: int
    version: str

    def key(self) -> str:
        """A short string that changes whenever the object does (for work keys)."""
        return f"{self.size}:{self.version}"

    @property
    def pair(self) -> tuple[int, str]:
        """(size, version): what a record keeps of an object nanobatch put (``upload_stamps``)."""
        return self.size, self.version


USERINFO_REFUSED = (
    "a bucket URL carries no user name or password (they would be written where the URL is): give the cloud's "
    "credentials as its SDK reads them (environment variables, a profile, a service account)"
)


def is_bucket_url(value: str) -> bool:
    """True for ``s3://``, ``gs://``, ``az://``, ``abfs://`` URLs (local paths and http(s) are not)."""
    match = _URL.match(value)
    return bool(match and match["scheme"].lower() in _BACKENDS)


def _split(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of a bucket URL."""
    match = _URL.match(url)
    if not match or match["scheme"].lower() not in _BACKENDS:
        raise StorageError(url, "unsupported", "not a bucket URL (s3://, gs://, az:// or abfs://)")
    if "@" in match["bucket"] and has_userinfo(url):
        raise StorageError(url, "unsupported", USERINFO_REFUSED)
    return match["scheme"].lower(), match["bucket"], match["key"] or ""


def _filesystem(url: str) -> Any:
    """The fsspec filesystem for *url*'s scheme (cached by fsspec); a clear error when the extra is missing."""
    scheme, _, _ = _split(url)
    protocol, module, extra = _BACKENDS[scheme]
    try:
        importlib.import_module(module)
    except ImportError:
        raise StorageError(
            url, "missing_extra", f"{scheme}:// needs the {module} package: pip install 'nanobatch[{extra}]'"
        ) from None
    import fsspec

    try:
        return fsspec.filesystem(protocol)
    except Exception as exc:  # az:// with no account to connect to: adlfs refuses to start (ValueError)
        raise _translate(url, exc) from None


def _path(url: str) -> str:
    _, bucket, key = _split(url)
    return f"{bucket}/{key}" if key else bucket


def _translate(url: str, exc: BaseException, fs: Any = None) -> StorageError:
    """A backend's error as a StorageError naming *url*; asks whether the bucket exists only when unsure."""
    text = f"{type(exc).__name__} {exc}"
    if isinstance(exc, FileExistsError) or re.search(
        r"PreconditionFailed|\b412\b|BlobAlreadyExists|ConditionNotMet|pre-conditions you specified did not hold", text
    ):
        return StorageError(url, "exists", "an object is already there")
    if isinstance(exc, PermissionError) or re.search(r"AccessDenied|Forbidden|\b403\b|AuthorizationFailure", text):
        return StorageError(url, "denied", "access denied: the credentials in use may not read or write this")
    if isinstance(exc, FileNotFoundError) or re.search(r"NoSuch|\b404\b|NotFound", text):
        if "NoSuchBucket" in text or "ContainerNotFound" in text or not _bucket_exists(url, fs):
            return StorageError(url, "no_bucket", f"no such bucket {_split(url)[1]!r}")
        return StorageError(url, "not_found", "no such object")
    from .redaction import redact_urls  # httpx2 and all: loaded only on this error path

    first = _QUERY.sub("", redact_urls(str(exc).splitlines()[0] if str(exc) else ""))[:200]
    return StorageError(url, "unreachable", f"{type(exc).__name__}: {first}".rstrip(": "))


def _bucket_exists(url: str, fs: Any) -> bool:
    if fs is None:
        return True
    try:
        return bool(fs.exists(_split(url)[1]))
    except Exception:  # noqa: BLE001 - only a hint for the message; the original error is what is reported
        return True


def _call(url: str, fn: Callable[[Any], T]) -> T:
    fs = _filesystem(url)
    try:
        return fn(fs)
    except StorageError:
        raise
    except Exception as exc:
        raise _translate(url, exc, fs) from None


def stat(url: str) -> ObjectStamp:
    """The object's size and ETag/generation, from one metadata request (no download)."""

    def info(fs: Any) -> dict[str, Any]:
        path = _path(url)
        fs.invalidate_cache(path)  # fsspec caches listings per process; a stamp must be current
        found: dict[str, Any] = fs.info(path)
        return found

    found = _call(url, info)
    if found.get("type") == "directory":
        raise StorageError(url, "not_found", "this is a folder (prefix), not an object")
    return _stamp(url, found)


def _stamp(url: str, found: dict[str, Any]) -> ObjectStamp:
    """The stamp from a backend's metadata, the same whether a HEAD or a listing gave it."""
    version = next((str(found[k]) for k in ("generation", "ETag", "etag", "md5Hash") if found.get(k)), "")
    return ObjectStamp(url=url, size=int(found.get("size") or found.get("Size") or 0), version=version)


def read_bytes(url: str) -> bytes:
    """The whole object."""
    data: bytes = _call(url, lambda fs: fs.cat_file(_path(url)))
    return data


def open_read(url: str) -> BinaryIO:
    """The object as a file read in blocks as it is consumed (a million-row CSV never sits in memory)."""
    opened: BinaryIO = _call(url, lambda fs: fs.open(_path(url), "rb"))
    return opened


def put(url: str, data: bytes, *, replace: bool = True, version: str | None = None) -> ObjectStamp:
    """Write *data* as the object at *url* in one PUT, so readers see the old object or the new one, never half;
    the stamp of the object written, from the PUT's answer (a HEAD only where a backend gives none).
    Without *replace*, only if no object is there, in the same request (S3 ``If-None-Match: *``, Cloud Storage
    ``ifGenerationMatch=0``, Azure ``If-None-Match: *``): StorageError of kind ``exists`` if one is. With
    *version* (an ETag), only over the object of that version, in the same request on S3 and Azure
    (``If-Match``; gcsfs asks no such precondition: there the caller's last look is all)."""
    scheme = _split(url)[0]

    def pipe(fs: Any) -> Any:
        if version is not None and scheme == "s3":
            return fs.pipe_file(_path(url), data, IfMatch=version)
        if version is not None and scheme in ("az", "abfs"):
            from azure.core import MatchConditions

            return fs.pipe_file(_path(url), data, etag=version, match_condition=MatchConditions.IfNotModified)
        if replace:
            return fs.pipe_file(_path(url), data)
        if scheme in ("az", "abfs"):
            return fs.pipe_file(_path(url), data, overwrite=False)  # adlfs's way of asking
        return fs.pipe_file(_path(url), data, mode="create")

    try:
        answer = _call(url, pipe)
    except StorageError as exc:
        if exc.kind != "exists":
            raise
        if version is not None:
            why = "the object nanobatch put there was replaced since"
        else:
            why = "an object is already there, and no record says nanobatch put it there"
        raise StorageError(url, "exists", f"{why}: it was left as it is") from None
    written = _stamp(url, {**answer, "size": len(data)}) if isinstance(answer, dict) else None
    return written if written is not None and written.version else stat(url)


def check_bucket(url: str) -> None:
    """StorageError unless *url*'s bucket exists and can be asked about (the extra installed, credentials taken)."""
    scheme, bucket, _ = _split(url)
    if scheme == "s3":  # one HEAD, whose refusal is told as such (fsspec's exists() takes a 403 for "none")
        try:
            _filesystem(url).call_s3("head_bucket", Bucket=bucket)
            return
        except Exception as exc:  # noqa: BLE001 - translated: denied, unreachable, or no bucket
            error = _translate(url, exc)
        if error.kind not in ("not_found", "no_bucket"):
            raise error
    elif _call(url, lambda fs: fs.exists(bucket)):
        return
    raise StorageError(url, "no_bucket", f"no such bucket {bucket!r}")


def presign(url: str, *, expires_s: int = 3600) -> str:
    """A time-limited https URL anyone holding it can GET (s3 and az; gs needs a service-account key)."""

    def sign(fs: Any) -> str:
        try:
            return str(fs.sign(_path(url), expiration=expires_s))
        except NotImplementedError:
            raise StorageError(url, "unsupported", "this storage cannot make signed URLs") from None

    return _call(url, sign)


def iter_glob(pattern: str) -> Iterator[str]:
    """The URLs of the objects matching *pattern* (``*``, ``?``, ``[..]``, ``**``), in key order, page by page.

    S3, Cloud Storage and Azure are listed lazily (1,000 keys a request, under the pattern's literal prefix,
    one folder deep unless the pattern reaches deeper), so a million-object prefix never sits in memory.
    """
    scheme, bucket, key_pattern = _split(pattern)
    from fsspec.utils import glob_translate

    literal = _GLOB_CHARS.split(key_pattern, maxsplit=1)[0]
    matches = re.compile(glob_translate(key_pattern)).match if key_pattern != literal else key_pattern.__eq__
    deep = "**" in key_pattern or "/" in key_pattern[len(literal) :]
    for key, _ in _entries(pattern, scheme, bucket, literal, deep=deep):
        if matches(key):
            yield f"{scheme}://{bucket}/{key}"


def _entries(url: str, scheme: str, bucket: str, prefix: str, *, deep: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, metadata) of the objects under *prefix*; backend errors as StorageErrors naming *url*."""
    fs = _filesystem(url)
    if scheme == "s3":
        entries = _iter_s3(fs, bucket, prefix, "" if deep else "/")
    elif scheme in ("gs", "gcs"):
        entries = _iter_gcs(fs, bucket, prefix, "" if deep else "/")
    elif scheme in ("az", "abfs"):
        entries = _iter_az(fs, bucket, prefix, "" if deep else "/")
    else:
        entries = _iter_other(fs, bucket, prefix)
    while True:
        try:
            entry = next(entries)
        except StopIteration:
            return
        except Exception as exc:
            raise _translate(url, exc, fs) from None
        yield entry


def _iter_other(fs: Any, bucket: str, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    found: dict[str, dict[str, Any]] = fs.find(f"{bucket}/{folder}".rstrip("/"), detail=True)
    for path in sorted(found):
        key = path.split("/", 1)[1] if "/" in path else ""
        if key.startswith(prefix):
            yield key, found[path]


def _iter_s3(fs: Any, bucket: str, prefix: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from fsspec.asyn import sync

    more: dict[str, str] = {"Delimiter": delimiter} if delimiter else {}
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=PAGE_SIZE, **more)
        for entry in page.get("Contents", []):
            yield entry["Key"], entry
        if not page.get("IsTruncated"):
            return
        more["ContinuationToken"] = page["NextContinuationToken"]


def _iter_gcs(fs: Any, bucket: str, prefix: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from fsspec.asyn import sync

    more: dict[str, str] = {"delimiter": delimiter} if delimiter else {}
    while True:
        page = sync(fs.loop, fs._call_list_objects, bucket, prefix=prefix, maxResults=PAGE_SIZE, **more)
        for item in page.get("items", []):
            yield item["name"], item
        if not page.get("nextPageToken"):
            return
        more["pageToken"] = page["nextPageToken"]


def _iter_az(fs: Any, bucket: str, prefix: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from fsspec.asyn import sync

    async def page(token: str | None) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        container = fs.service_client.get_container_client(bucket)
        if delimiter:
            listing = container.walk_blobs(name_starts_with=prefix, delimiter=delimiter, results_per_page=PAGE_SIZE)
        else:
            listing = container.list_blobs(name_starts_with=prefix, results_per_page=PAGE_SIZE)
        pages = listing.by_page(continuation_token=token)
        found = [
            (blob.name, {"size": blob.size, "etag": _quoted(blob.etag)})
            async for blob in await pages.__anext__()
            if getattr(blob, "size", None) is not None  # not a folder (a BlobPrefix)
        ]
        return found, pages.continuation_token

    token: str | None = None
    while True:
        found, token = sync(fs.loop, page, token)
        yield from found
        if not token:
            return


def _quoted(etag: str) -> str:
    """An Azure listing's ETag as a metadata request gives it (in quotes), so both make the same stamp."""
    return etag if etag.startswith('"') else f'"{etag}"'


def stat_many(urls: Iterable[str], *, buckets_checked: bool = False) -> dict[str, ObjectStamp | None]:
    """Each object's stamp, or None where there is no such object; nothing is downloaded. StorageError (kind
    ``no_bucket``) for a missing object whose bucket does not exist, asked once per bucket with a missing object,
    unless *buckets_checked* (``output.upload_to``'s, checked when the run started).

    Where many of the objects share a bucket, the folder holding them all is listed (1,000 stamps a
    request); a listing that turns out to hold far more than was asked about stops early, and what it
    had not reached is asked about 32 at a time (HEAD), like objects too few to be worth a listing.
    """
    by_bucket: dict[tuple[str, str], set[str]] = defaultdict(set)
    for url in urls:
        scheme, bucket, _ = _split(url)
        by_bucket[scheme, bucket].add(url)
    found: dict[str, ObjectStamp | None] = {}
    singles: list[str] = []
    for (scheme, bucket), members in by_bucket.items():
        if len(members) >= LIST_THRESHOLD and scheme in ("s3", "gs", "gcs", "az", "abfs"):
            singles.extend(_stat_by_listing(scheme, bucket, members, found))
        else:
            singles.extend(members)
    with ThreadPoolExecutor(max_workers=HEAD_CONCURRENCY) as pool:
        found.update(zip(singles, pool.map(_stat_or_none, singles), strict=True))
    if not buckets_checked:
        _check_buckets_of([url for url in singles if found[url] is None])
    return found


def _check_buckets_of(missing: list[str]) -> None:
    """StorageError (``no_bucket``) if the bucket of one of the *missing* objects does not exist: one question
    per bucket (a HEAD answers 404 alike for an object and its bucket)."""
    for url in {(_split(url)[0], _split(url)[1]): url for url in missing}.values():
        if not _bucket_exists(url, _filesystem(url)):
            raise StorageError(url, "no_bucket", f"no such bucket {_split(url)[1]!r}")


def _stat_by_listing(scheme: str, bucket: str, members: set[str], found: dict[str, ObjectStamp | None]) -> list[str]:
    """Fill *found* from a listing of the folder holding all *members*; the members it did not settle."""
    root = f"{scheme}://{bucket}/"
    keys = sorted(url[len(root) :] for url in members)
    common = os.path.commonprefix([keys[0], keys[-1]])
    folder = common[: common.rfind("/") + 1]
    budget = LIST_OVERSCAN * len(members) + PAGE_SIZE
    unsettled = set(members)
    for scanned, (key, entry) in enumerate(_entries(root + folder, scheme, bucket, folder, deep=True), 1):
        if (url := root + key) in unsettled:
            found[url] = _stamp(url, entry)
            unsettled.discard(url)
        if not unsettled:
            return []
        if scanned >= budget:  # mostly other objects here: ask about the rest one by one
            return sorted(unsettled)
    found.update(dict.fromkeys(unsettled))  # listed to the end: these do not exist
    return []


def exists_many(urls: Iterable[str], *, buckets_checked: bool = False) -> dict[str, bool]:
    """Whether each object exists (see :func:`stat_many`), for checking a re-run's uploads."""
    return {url: stamp is not None for url, stamp in stat_many(urls, buckets_checked=buckets_checked).items()}


def _stat_or_none(url: str) -> ObjectStamp | None:
    """The object's stamp, None if there is none, from one metadata request where the backend allows: S3's HEAD
    alone, not s3fs's info (a HEAD, then a listing to see whether the key is a folder), and no question whether
    its bucket exists (see :func:`stat_many`). Asked for each item a run that uploads is about to send."""
    scheme, bucket, key = _split(url)
    fs = _filesystem(url)
    try:
        if scheme == "s3":
            found = fs.call_s3("head_object", Bucket=bucket, Key=key)
            return ObjectStamp(url=url, size=int(found["ContentLength"]), version=str(found["ETag"]))
        fs.invalidate_cache(_path(url))
        info: dict[str, Any] = fs.info(_path(url))
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _translate(url, exc) from None  # (without *fs*: no bucket probe)
    return None if info.get("type") == "directory" else _stamp(url, info)
