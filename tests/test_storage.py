"""nanobatch.api.storage against real S3 and Cloud Storage APIs on loopback (moto's server, gcp-storage-emulator)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable

import httpx2
import pytest

from nanobatch.api import storage
from nanobatch.errors import StorageError

from .emulators import SECRET, Bucket


def test_stat_reads_size_and_version_without_downloading(bucket: Bucket) -> None:
    url = bucket.url("shoes/001.jpg")
    storage.put(url, b"first version")
    bucket.server.log.clear()

    stamp = storage.stat(url)

    assert (stamp.url, stamp.size) == (url, len(b"first version"))
    assert stamp.version
    assert bucket.downloads() == 0
    storage.put(url, b"other version")  # same size, new content: the stamp must change
    assert storage.stat(url).key() != stamp.key()
    assert bucket.downloads() == 0


def test_put_is_one_request_and_read_bytes_returns_it(bucket: Bucket) -> None:
    url = bucket.url("out/a b/é.png")
    storage.put(url, b"\x89PNG old")
    bucket.server.log.clear()

    storage.put(url, b"\x89PNG new" * 10_000)

    assert sum(bucket.server.log.counts.values()) == 1  # one PUT (one upload): atomic, never half an object
    assert storage.read_bytes(url) == b"\x89PNG new" * 10_000


def test_glob_matches_like_a_local_glob_in_key_order(bucket: Bucket) -> None:
    for key in ["p/b.jpg", "p/a.jpg", "p/c.png", "p/sub/d.jpg", "q/e.jpg"]:
        storage.put(bucket.url(key), b"x")

    assert list(storage.iter_glob(bucket.url("p/*.jpg"))) == [bucket.url("p/a.jpg"), bucket.url("p/b.jpg")]
    assert list(storage.iter_glob(bucket.url("p/**/*.jpg"))) == [
        bucket.url(k) for k in ("p/a.jpg", "p/b.jpg", "p/sub/d.jpg")
    ]
    assert list(storage.iter_glob(bucket.url("p/c.png"))) == [bucket.url("p/c.png")]
    assert list(storage.iter_glob(bucket.url("nothing/*"))) == []


def test_glob_lists_page_by_page_as_it_is_consumed(bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "PAGE_SIZE", 10)
    for i in range(35):
        storage.put(bucket.url(f"many/{i:03}.jpg"), b"x")
    bucket.server.log.clear()

    urls = storage.iter_glob(bucket.url("many/*.jpg"))
    first = list(itertools.islice(urls, 5))
    listings_for_five = _listings(bucket)
    rest = list(urls)

    assert first == [bucket.url(f"many/{i:03}.jpg") for i in range(5)]
    assert len(first) + len(rest) == 35
    assert listings_for_five == 1
    assert bucket.downloads() == 0
    if bucket.scheme in ("s3", "az"):
        assert _listings(bucket) == 4
    else:  # the emulator ignores maxResults and answers with one page; real Cloud Storage pages
        assert any("maxResults=10" in k for k in bucket.server.log.counts)


def _listings(bucket: Bucket) -> int:
    counts = bucket.server.log.counts
    if bucket.scheme == "s3":
        return sum(n for k, n in counts.items() if "list-type=2" in k)
    if bucket.scheme == "az":
        return sum(n for k, n in counts.items() if "comp=list" in k)
    return sum(n for k, n in counts.items() if k.startswith(f"GET /storage/v1/b/{bucket.name}/o?"))


def test_exists_many_answers_from_one_listing(bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "LIST_THRESHOLD", 5)
    for i in range(8):
        storage.put(bucket.url(f"out/{i}.png"), b"x")
    storage.put(bucket.url("lone/kept.png"), b"x")
    bucket.server.log.clear()
    asked = [bucket.url(f"out/{i}.png") for i in range(12)] + [bucket.url("lone/kept.png"), bucket.url("lone/gone.png")]

    found = storage.exists_many(asked)

    kept = {bucket.url(f"out/{i}.png") for i in range(8)} | {bucket.url("lone/kept.png")}
    assert found == {url: url in kept for url in asked}
    assert _listings(bucket) == sum(bucket.server.log.counts.values()) == 1


def test_a_listing_crowded_with_other_objects_gives_way_to_heads(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "LIST_THRESHOLD", 5)
    monkeypatch.setattr(storage, "PAGE_SIZE", 4)
    monkeypatch.setattr(storage, "LIST_OVERSCAN", 1)
    storage._filesystem(bucket.url()).pipe({f"{bucket.name}/a/{i:02}.jpg": b"x" for i in range(40)})
    for i in range(6):
        storage.put(bucket.url(f"z/{i}.jpg"), b"z")
    bucket.server.log.clear()
    asked = [bucket.url("a/00.jpg")] + [bucket.url(f"z/{i}.jpg") for i in range(7)]

    stamps = storage.stat_many(asked)

    assert {url for url, stamp in stamps.items() if stamp is None} == {bucket.url("z/6.jpg")}
    if bucket.scheme == "s3":  # the emulator for Cloud Storage answers every listing in one page
        pages = sum(n for k, n in bucket.server.log.counts.items() if "max-keys=4" in k)
        assert pages == 3  # (8 asked + one page) / 4 a page: then it stopped
    assert bucket.downloads() == 0


def test_stat_many_gives_the_same_stamps_as_stat_from_a_few_listings(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "LIST_THRESHOLD", 5)
    monkeypatch.setattr(storage, "PAGE_SIZE", 4)
    for i in range(10):
        storage.put(bucket.url(f"in/{i}.jpg"), b"x" * i)
    storage.put(bucket.url("in/deeper/0.jpg"), b"not asked about")
    storage.put(bucket.url("alone.jpg"), b"y")
    asked = [bucket.url(f"in/{i}.jpg") for i in range(12)] + [bucket.url("alone.jpg")]
    one_by_one = {url: storage.stat(url) if i not in (10, 11) else None for i, url in enumerate(asked)}
    bucket.server.log.clear()

    stamps = storage.stat_many(asked)

    assert stamps == one_by_one
    assert bucket.downloads() == 0
    one_object = [k for k in bucket.server.log.counts if "/in/" in k or "/in%2F" in k]
    assert one_object == []  # the crowded folder's objects are not asked about one by one...
    assert 1 <= _listings(bucket) <= 3  # ...but listed, 4 at a time


# Cloud Storage signs only with a service-account key; on Vertex gs:// URIs go as they are.
@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_presigned_url_fetches_the_object_without_credentials(bucket: Bucket) -> None:
    url = bucket.url("in/photo.jpg")
    storage.put(url, b"jpeg bytes")

    signed = storage.presign(url, expires_s=600)

    assert signed.startswith(bucket.server.url) and "Expires=" in signed and SECRET not in signed
    assert httpx2.get(signed).content == b"jpeg bytes"


def test_missing_object_and_missing_bucket_are_named(bucket: Bucket) -> None:
    with pytest.raises(StorageError) as missing:
        storage.stat(bucket.url("no/such.jpg"))
    assert missing.value.kind == "not_found" and bucket.url("no/such.jpg") in str(missing.value)

    gone = f"{bucket.scheme}://nb-no-such-bucket-{uuid.uuid4().hex[:8]}/a.jpg"
    for attempt in (storage.stat, storage.read_bytes):
        with pytest.raises(StorageError) as no_bucket:
            attempt(gone)
        assert no_bucket.value.kind == "no_bucket" and gone in str(no_bucket.value)
        assert SECRET not in str(no_bucket.value)
    with pytest.raises(StorageError) as listing:
        list(storage.iter_glob(gone.rsplit("/", 1)[0] + "/*.jpg"))
    assert listing.value.kind == "no_bucket"


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_credentials_the_server_refuses_are_access_denied(bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    url = bucket.url("in/photo.jpg")
    storage.put(url, b"jpeg bytes")
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks every signature

    for attempt in (storage.stat, storage.read_bytes, lambda u: storage.put(u, b"new")):
        with pytest.raises(StorageError) as denied:
            attempt(url)
        assert denied.value.kind == "denied" and str(denied.value).startswith(f"{url}: access denied")
        assert SECRET not in str(denied.value) and "AKIATESTING" not in str(denied.value)


def test_a_missing_extra_says_which_to_install(without_module: Callable[[str], None]) -> None:
    without_module("s3fs")
    with pytest.raises(StorageError, match=r"s3://b/k: .*pip install 'nanobatch\[s3\]'") as caught:
        storage.stat("s3://b/k")
    assert caught.value.kind == "missing_extra"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(PermissionError("Access Denied"), "denied", id="s3fs-permission"),
        pytest.param(OSError("Forbidden: b/k\nuser lacks storage.objects.get"), "denied", id="gcsfs-forbidden"),
        pytest.param(FileNotFoundError("NoSuchBucket"), "no_bucket", id="s3-no-bucket"),
        pytest.param(OSError("Connection refused https://h/b?X-Amz-Signature=abc"), "unreachable", id="network"),
        pytest.param(OSError("Connection refused https://AKIA:abc@h/b"), "unreachable", id="network-userinfo"),
    ],
)
def test_backend_errors_become_storage_errors(exc: Exception, kind: str) -> None:
    error = storage._translate("s3://b/k", exc)
    assert error.kind == kind and str(error).startswith("s3://b/k: ") and "Signature" not in str(error)
    assert "abc" not in str(error)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3://bucket/key.jpg", True),
        ("gs://bucket/dir/", True),
        ("az://container/blob", True),
        ("abfs://container/blob", True),
        ("https://example.com/a.jpg", False),
        ("photos/a.jpg", False),
        ("C:/photos/a.jpg", False),
        ("ftp://host/a.jpg", False),
    ],
)
def test_is_bucket_url(value: str, expected: bool) -> None:
    assert storage.is_bucket_url(value) is expected
