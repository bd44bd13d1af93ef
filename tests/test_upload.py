"""``output.upload_to``: whole jobs whose images go to buckets on loopback emulators (gcp-storage-emulator, moto)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import anyio
import pytest

import nanobatch
import nanobatch.inputs.load
from nanobatch.api import storage
from nanobatch.cli.main import main
from nanobatch.config import Settings, load_settings
from nanobatch.errors import ConfigError, StorageError
from nanobatch.output.upload import Uploads

from .emulators import Bucket, Emulator, new_bucket
from .fakes import (
    FakeGemini,
    image_bytes,
    inline,
    killed_before_the_records,
    ok_body,
    records,
    run_now,
    write_job,
)


@contextlib.contextmanager
def puts_failing_for(suffix: str) -> Iterator[None]:
    """Inside, each PUT of an object whose URL ends with *suffix* fails (a connection reset); the others land."""
    real_put = storage.put

    def flaky(url: str, data: bytes, **options: Any) -> storage.ObjectStamp:
        if url.endswith(suffix):
            raise StorageError(url, "unreachable", "ConnectionError: reset")
        return real_put(url, data, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "put", flaky)
        yield


def _settings(upload_to: str) -> Settings:
    return load_settings(env={}, overrides={"output.upload_to": upload_to})


def night_one(tmp_path: Path, upload_to: str, fake: FakeGemini | None = None) -> tuple[Path, Path, Settings]:
    """A one-item job (sku-1) run once into tmp_path/out with *upload_to*, its first night a success: (job, output
    folder, settings)."""
    settings = _settings(upload_to)
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    out = tmp_path / "out"
    assert run_now(job, fake or FakeGemini(), out, settings=settings).exit_code == 0
    return job, out, settings


def change_instruction(job: Path) -> None:
    """The manifest's instruction changed: its items are new work."""
    job.write_text(job.read_text().replace("make the background white", "make the background grey"))


def test_images_go_to_the_bucket_and_a_rerun_checks_them_without_downloading_or_paying_twice(
    gcs_env: Emulator, tmp_path: Path
) -> None:
    name = new_bucket("gs")
    settings = _settings(f"gs://{name}/edited")
    job = write_job(tmp_path, [{"id": f"sku-{n}", "image": f"images/{n}.png"} for n in range(3)])
    out, fake = tmp_path / "out", FakeGemini()

    first = run_now(job, fake, out, settings=settings)

    assert first.exit_code == 0 and len(fake.requests) == 3
    for record in records(out):
        url = f"gs://{name}/edited/{record['id']}.png"
        assert record["outputs"] == [f"{record['id']}.png"] and record["uploads"] == [url]
        assert storage.read_bytes(url) == (out / record["outputs"][0]).read_bytes()  # the local copy stays too

    gcs_env.log.clear()
    again = run_now(job, fake, out, settings=settings)
    assert again.stats.skipped == 3 and len(fake.requests) == 3
    assert Bucket("gs", name, gcs_env).downloads() == 0  # metadata only (a listing from 64 objects on: bench)
    assert not [k for k in gcs_env.log.counts if not k.startswith("GET ")]  # nothing written again

    lost = [f"gs://{name}/edited/sku-{n}.png" for n in (1, 2)]
    storage._filesystem(f"gs://{name}").rm([url.removeprefix("gs://") for url in lost])
    (out / "sku-2.png").unlink()  # sku-1's image is still in the output folder; sku-2's is gone everywhere
    third = run_now(job, fake, out, settings=settings)
    assert third.stats.ok == 1 and third.stats.skipped == 2 and len(fake.requests) == 4
    assert records(out)[-1]["id"] == "sku-2"  # only sku-2 was sent again
    assert storage.read_bytes(lost[0]) == (out / "sku-1.png").read_bytes()  # put again from the folder
    assert storage.read_bytes(lost[1]) == (out / "sku-2.png").read_bytes()


def test_an_image_that_cannot_be_uploaded_fails_its_item_and_stays_in_the_folder(
    s3_env: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = new_bucket("s3")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    out, fake = tmp_path / "out", FakeGemini()

    def refused(url: str, data: bytes, **options: object) -> None:
        raise StorageError(url, "denied", "access denied: the credentials in use may not read or write this")

    monkeypatch.setattr(storage, "put", refused)
    summary = run_now(job, fake, out, settings=_settings(f"s3://{name}/x/"))

    (record,) = records(out)
    assert summary.exit_code == 1
    assert record["status"] == "failed" and record["error"]["kind"] == "upload"
    assert f"s3://{name}/x/sku-1.png" in record["error"]["message"] and "uploads" not in record
    assert (out / "sku-1.png").is_file()


@pytest.mark.parametrize(
    ("upload_to", "message"),
    [
        pytest.param("https://example.com/out/", "is not a bucket URL", id="not-a-bucket-url"),
        pytest.param("s3://no-such-bucket-here/out/", "no such bucket", id="missing-bucket"),
        pytest.param("az://photos/out/", r"pip install 'nanobatch\[azure\]'", id="missing-extra"),
    ],
)
def test_a_bad_upload_to_is_a_config_error_before_anything_is_sent(
    upload_to: str, message: str, s3_env: Emulator, tmp_path: Path, without_module: Callable[[str], None]
) -> None:
    without_module("adlfs")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    fake = FakeGemini()

    with pytest.raises(ConfigError, match=rf"^output\.upload_to: .*{message}") as caught:
        run_now(job, fake, tmp_path / "out", settings=_settings(upload_to))
    with pytest.raises(ConfigError, match=message):
        nanobatch.check_job(job, settings=_settings(upload_to), out_dir=tmp_path / "out")

    assert caught.value.exit_code == 2 and fake.requests == []
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize(("src", "dst"), [("s3", "gs"), ("gs", "s3")], ids=["s3-to-gs", "gs-to-s3"])
def test_a_whole_job_from_s3_inputs_to_gs_outputs(
    s3_env: Emulator, gcs_env: Emulator, tmp_path: Path, src: str, dst: str
) -> None:
    source, target = new_bucket(src), new_bucket(dst)
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}, {"id": "sku-2", "image": "images/2.png"}])
    for n in (1, 2):
        storage.put(f"{src}://{source}/in/{n}.png", (tmp_path / "images" / f"{n}.png").read_bytes())
    job.write_text(job.read_text().replace("images/", f"{src}://{source}/in/"))
    out, fake = tmp_path / "out", FakeGemini()

    summary = run_now(job, fake, out, settings=_settings(f"{dst}://{target}/edited/"))

    assert summary.exit_code == 0 and len(fake.requests) == 2
    uploads = {r["id"]: r["uploads"] for r in records(out)}  # records come in the order items finish
    assert uploads == {f"sku-{n}": [f"{dst}://{target}/edited/sku-{n}.png"] for n in (1, 2)}
    assert all(storage.read_bytes(url) == (out / url.rsplit("/", 1)[1]).read_bytes() for (url,) in uploads.values())
    s3_env.log.clear()
    gcs_env.log.clear()
    again = run_now(job, fake, out, settings=_settings(f"{dst}://{target}/edited/"))
    assert again.stats.skipped == 2 and len(fake.requests) == 2
    gs_side = Bucket("gs", source if src == "gs" else target, gcs_env)
    assert gs_side.downloads() == 0  # neither the inputs nor the outputs, whichever side Cloud Storage is on
    assert not [k for k in s3_env.log.counts if k.startswith("GET /") and "list-type" not in k]


def test_an_item_whose_output_name_changed_is_uploaded_under_its_new_name_without_paying_again(
    s3_env: Emulator, tmp_path: Path
) -> None:
    name = new_bucket("s3")
    fake = FakeGemini()
    job, out, settings = night_one(tmp_path, f"s3://{name}/edited", fake)  # no trailing slash: still a prefix
    job.write_text(job.read_text().replace("defaults:\n", "defaults:\n  output: shoes/{id}\n"))

    again = run_now(job, fake, out, settings=settings)

    assert again.exit_code == 0 and len(fake.requests) == 1
    record = records(out)[-1]
    assert record["outputs"] == ["shoes/sku-1.png"] and record["uploads"] == [f"s3://{name}/edited/shoes/sku-1.png"]
    assert storage.read_bytes(record["uploads"][0]) == (out / "shoes" / "sku-1.png").read_bytes()


def test_a_rename_whose_upload_fails_leaves_the_item_as_it_was_for_the_next_run(
    s3_env: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = new_bucket("s3")
    fake = FakeGemini()
    job, out, settings = night_one(tmp_path, f"s3://{name}/edited/", fake)
    job.write_text(job.read_text().replace("defaults:\n", "defaults:\n  output: shoes/{id}\n"))

    def refused(url: str, data: bytes, **options: object) -> None:
        raise StorageError(url, "denied", "access denied: the credentials in use may not read or write this")

    with monkeypatch.context() as patch:
        patch.setattr(storage, "put", refused)
        assert run_now(job, fake, out, settings=settings).exit_code == 0
    assert (out / "sku-1.png").is_file() and len(records(out)) == 1  # nothing moved, nothing recorded

    assert run_now(job, fake, out, settings=settings).exit_code == 0 and len(fake.requests) == 1  # now it moves, unpaid
    assert records(out)[-1]["uploads"] == [f"s3://{name}/edited/shoes/sku-1.png"]


def test_an_object_nanobatch_did_not_put_there_is_never_replaced_and_nothing_is_paid_for_it(
    s3_env: Emulator, tmp_path: Path
) -> None:
    # A shop's published image already at the item's object name (upload_to pointed at a populated prefix),
    # under the type the item's model answers with (the facts table: JPEG for the 3.x models).
    name = new_bucket("s3")
    theirs = f"s3://{name}/edited/sku-1.jpg"
    storage.put(theirs, b"the shop's published image")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}, {"id": "sku-2", "image": "images/2.png"}])
    out = tmp_path / "out"
    fake = FakeGemini({"make the background white": [ok_body(inline(image_bytes(fmt="JPEG"), "image/jpeg"))] * 2})

    summary = run_now(job, fake, out, settings=_settings(f"s3://{name}/edited/"))

    assert summary.exit_code == 1 and len(fake.requests) == 1  # sku-1 was looked for before paying
    failed = next(r for r in records(out) if r["id"] == "sku-1")
    assert failed["error"]["kind"] == "upload" and theirs in failed["error"]["message"]
    assert storage.read_bytes(theirs) == b"the shop's published image"
    assert storage.read_bytes(f"s3://{name}/edited/sku-2.jpg") == (out / "sku-2.jpg").read_bytes()


@pytest.mark.parametrize("bucket", ["s3", "az"], indirect=True)
def test_an_object_that_appears_while_the_request_is_out_is_not_replaced(bucket: Bucket) -> None:
    # Each cloud's conditional create, refused by its emulator (moto, Azurite: make test installs it).
    url = bucket.url("edited/sku-1.png")
    storage.put(url, b"first")
    with pytest.raises(StorageError) as caught:
        storage.put(url, b"second", replace=False)  # in the same request as the write
    assert caught.value.kind == "exists" and storage.read_bytes(url) == b"first"
    storage.put(url, b"third")  # an object a record says nanobatch put there is replaced
    assert storage.read_bytes(url) == b"third"


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)
def test_a_new_object_in_cloud_storage_is_asked_for_only_if_there_is_none(bucket: Bucket) -> None:
    # gcp-storage-emulator does not enforce the precondition Cloud Storage does: the request must carry it.
    storage.put(bucket.url("edited/sku-1.png"), b"first", replace=False)
    assert any("ifGenerationMatch=0" in key for key in bucket.server.log.counts if key.startswith("POST "))


def test_a_changed_item_replaces_the_object_nanobatch_put_there_for_it(s3_env: Emulator, tmp_path: Path) -> None:
    name = new_bucket("s3")
    job, out, settings = night_one(tmp_path, f"s3://{name}/edited/")
    change_instruction(job)
    fake = FakeGemini()

    assert run_now(job, fake, out, settings=settings).exit_code == 0

    assert len(fake.requests) == 1 and records(out)[-1]["status"] == "ok"


def test_an_answer_of_another_type_than_expected_is_paid_for_once_not_every_night(
    s3_env: Emulator, tmp_path: Path
) -> None:
    # The facts table says JPEG; this answer is PNG, and a shop's object is at the .png name. The first night
    # pays and the conditional create refuses the upload; the record keeps its names, so the next night looks
    # there before paying and sends nothing.
    name = new_bucket("s3")
    theirs = f"s3://{name}/edited/sku-1.png"
    storage.put(theirs, b"the shop's published image")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    out, fake = tmp_path / "out", FakeGemini()
    settings = _settings(f"s3://{name}/edited/")

    for _ in range(2):
        assert run_now(job, fake, out, settings=settings).exit_code == 1

    assert len(fake.requests) == 1 and storage.read_bytes(theirs) == b"the shop's published image"
    assert [r["error"]["kind"] for r in records(out)] == ["upload", "upload"]


@pytest.mark.parametrize(("bucket", "changed"), [("s3", False), ("gs", True)], indirect=["bucket"])
def test_an_object_a_killed_run_put_before_its_record_is_still_the_items(
    bucket: Bucket, tmp_path: Path, changed: bool
) -> None:
    # Killed between the PUT and the record: the journal's claim (URL and size) makes the object the item's
    # again, so the next run sends the item and replaces it, instead of refusing it for ever. *changed*: the item
    # was done before, and the PUT replaced its own object (on gs a new generation, whatever the bytes), which
    # its record names at the old version.
    settings = _settings(bucket.url("edited/"))
    jpeg = ok_body(inline(image_bytes(fmt="JPEG"), "image/jpeg"))
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    out = tmp_path / "out"

    def answers() -> FakeGemini:
        return FakeGemini({"make the background white": [jpeg], "make the background grey": [jpeg]})

    if changed:
        assert run_now(job, answers(), out, settings=settings).exit_code == 0
        change_instruction(job)
    with killed_before_the_records():
        run_now(job, answers(), out, settings=settings)
    assert storage.read_bytes(bucket.url("edited/sku-1.jpg"))  # PUT, and no record of it
    fake = answers()

    summary = run_now(job, fake, out, settings=settings)

    assert summary.exit_code == 0 and len(fake.requests) == 1 and records(out)[-1]["status"] == "ok"
    assert records(out)[-1]["uploads"] == [bucket.url("edited/sku-1.jpg")]


@pytest.mark.parametrize(("bucket", "changed"), [("s3", False), ("gs", True)], indirect=["bucket"])
def test_an_object_that_landed_when_another_of_its_items_puts_failed_is_still_the_items(
    bucket: Bucket, tmp_path: Path, changed: bool
) -> None:
    # hero.jpg lands, hero.step1.jpg's PUT fails: the record fails without uploads, and the next run makes the
    # item and replaces hero.jpg. *changed*: the item was done before, and hero.jpg replaced its own object.
    settings = _settings(bucket.url("edited/"))
    jpeg = ok_body(inline(image_bytes(fmt="JPEG"), "image/jpeg"))
    item = {"id": "hero", "image": "images/1.png", "keep_steps": True, "steps": ["crop it", "make it white"]}
    job = write_job(tmp_path, [item])
    out = tmp_path / "out"

    def answers() -> FakeGemini:
        return FakeGemini({"crop it": [jpeg], "make it white": [jpeg], "make it grey": [jpeg]})

    if changed:
        assert run_now(job, answers(), out, settings=settings).exit_code == 0
        job.write_text(job.read_text().replace("make it white", "make it grey"))
    with puts_failing_for("hero.step1.jpg"):
        assert run_now(job, answers(), out, settings=settings).exit_code == 1
    assert storage.read_bytes(bucket.url("edited/hero.jpg"))  # landed; the record failed without uploads
    fake = answers()

    assert run_now(job, fake, out, settings=settings).exit_code == 0
    assert records(out)[-1]["status"] == "ok" and len(fake.requests) == 2


@pytest.mark.parametrize("bucket", ["s3", "gs", "az"], indirect=True)
def test_an_object_someone_replaced_after_nanobatch_put_it_is_left_as_it_is_and_nothing_is_paid(
    bucket: Bucket, tmp_path: Path
) -> None:
    # The shop retouched a published image in the bucket; the item's instruction then changed. The record keeps
    # the size and ETag/generation the object was PUT with, so the new answer is not paid for, let alone PUT.
    fake = FakeGemini()
    job, out, settings = night_one(tmp_path, bucket.url("edited/"), fake)
    url = records(out)[0]["uploads"][0]
    assert records(out)[0]["upload_stamps"] == [list(astuple(storage.stat(url))[1:])]
    storage.put(url, b"retouched by the shop")
    change_instruction(job)

    summary = run_now(job, fake, out, settings=settings)

    assert summary.exit_code == 1 and len(fake.requests) == 1  # looked at before paying
    error = records(out)[-1]["error"]
    assert error["kind"] == "upload" and "replaced since" in error["message"] and url in error["message"]
    assert storage.read_bytes(url) == b"retouched by the shop"


@pytest.mark.parametrize("bucket", ["s3", "gs", "az"], indirect=True)
def test_an_object_replaced_while_the_request_is_out_is_not_replaced_again(bucket: Bucket) -> None:
    uploads = Uploads(bucket.url("edited/"))
    (url,), (stamp,) = anyio.run(uploads.put, [("sku-1.png", b"first")])
    assert anyio.run(uploads.put, [("sku-1.png", b"second")], {url: stamp})[0] == (url,)  # still as put: replaced
    storage.put(url, b"the shop's")

    with pytest.raises(StorageError) as caught:
        anyio.run(uploads.put, [("sku-1.png", b"third")], {url: stamp})

    assert caught.value.kind == "exists" and storage.read_bytes(url) == b"the shop's"


@pytest.mark.parametrize("bucket", ["gs", "az"], indirect=True)  # S3's ETag is the bytes' MD5: the same again
def test_an_object_put_back_from_the_folder_is_still_the_items_on_later_nights(bucket: Bucket, tmp_path: Path) -> None:
    # A published object deleted by mistake is PUT again from the folder's copy: a new generation (ETag), which the
    # journal keeps until a record does, so a later change of the item replaces it instead of refusing it.
    fake = FakeGemini()
    job, out, settings = night_one(tmp_path, bucket.url("edited/"), fake)
    url = records(out)[0]["uploads"][0]
    storage._filesystem(url).rm(url.split("://", 1)[1])
    assert run_now(job, fake, out, settings=settings).stats.skipped == 1 and storage.read_bytes(url)  # put back
    assert run_now(job, fake, out, settings=settings).stats.skipped == 1  # a night with nothing to do: kept still
    change_instruction(job)

    summary = run_now(job, fake, out, settings=settings)

    assert summary.exit_code == 0 and len(fake.requests) == 2
    assert storage.read_bytes(url) == (out / "sku-1.png").read_bytes()


def test_an_own_object_adopted_from_a_dead_runs_claim_stays_the_items_on_the_nights_after(
    gcs_env: Emulator, tmp_path: Path
) -> None:
    # The dead run's PUT replaced the item's object (a new generation); the next night adopts it, but does not
    # make the item (--retry-failed: the item is not failed). The journal keeps the version that night adopted,
    # so the night after, the changed item replaces its object instead of refusing it as replaced by someone.
    job, out, settings = night_one(tmp_path, f"gs://{new_bucket('gs')}/edited/")
    change_instruction(job)
    with killed_before_the_records():
        run_now(job, FakeGemini(), out, settings=settings)
    assert run_now(job, FakeGemini(), out, settings=settings, retry_failed=True).exit_code == 0
    fake = FakeGemini()

    assert run_now(job, fake, out, settings=settings).exit_code == 0 and len(fake.requests) == 1


def test_an_object_whose_record_is_from_before_upload_stamps_is_replaced_on_its_url(
    s3_env: Emulator, tmp_path: Path
) -> None:
    # A folder written by an older nanobatch: its records name their objects without stamps. A changed item
    # replaces its own object, as it did then, instead of refusing it.
    job, out, settings = night_one(tmp_path, f"s3://{new_bucket('s3')}/edited/")
    old = [{k: v for k, v in record.items() if k != "upload_stamps"} for record in records(out)]
    (out / "results.jsonl").write_text("".join(json.dumps(record) + "\n" for record in old))
    change_instruction(job)
    fake = FakeGemini()

    summary = run_now(job, fake, out, settings=settings)

    assert summary.exit_code == 0 and len(fake.requests) == 1 and records(out)[-1]["upload_stamps"]


@pytest.mark.parametrize("bucket", ["s3", "az"], indirect=True)  # gcsfs asks for no generation but 0
def test_an_object_replaced_between_the_last_look_and_the_put_is_not_replaced(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last look saw the object nanobatch put; the shop's replacement landed just after it: the PUT itself asks
    # for the version it saw (If-Match), and the cloud refuses it.
    uploads = Uploads(bucket.url("edited/"))
    (url,), (stamp,) = anyio.run(uploads.put, [("sku-1.png", b"first")])
    storage.put(url, b"the shop's")
    monkeypatch.setattr(storage, "stat_many", lambda urls, **_: {u: storage.ObjectStamp(u, *stamp) for u in urls})

    with pytest.raises(StorageError) as caught:
        anyio.run(uploads.put, [("sku-1.png", b"second")], {url: stamp})

    assert caught.value.kind == "exists" and "replaced since" in str(caught.value)
    assert storage.read_bytes(url) == b"the shop's"


def test_objects_put_under_a_new_upload_to_are_the_items_when_they_change_later(
    s3_env: Emulator, tmp_path: Path
) -> None:
    # upload_to moves to a new prefix: the done images are PUT there from the folder's copies, and no record names
    # those objects (the records keep their old URLs). They are nanobatch's all the same: a later change of the
    # item replaces its object there instead of refusing it as someone else's.
    name = new_bucket("s3")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    out = tmp_path / "out"
    assert run_now(job, FakeGemini(), out, settings=_settings(f"s3://{name}/old/")).exit_code == 0
    moved = _settings(f"s3://{name}/new/")
    assert run_now(job, FakeGemini(), out, settings=moved).stats.skipped == 1
    assert storage.read_bytes(f"s3://{name}/new/sku-1.png") == (out / "sku-1.png").read_bytes()
    change_instruction(job)
    fake = FakeGemini()

    summary = run_now(job, fake, out, settings=moved)

    assert summary.exit_code == 0 and len(fake.requests) == 1
    assert records(out)[-1]["uploads"] == [f"s3://{name}/new/sku-1.png"]


def test_the_look_before_paying_is_one_request_per_name_on_s3(s3_env: Emulator, tmp_path: Path) -> None:
    # Asked for each item about to be sent: one HEAD, not s3fs's HEAD then a listing (is the key a folder?), nor a
    # question whether the bucket exists (asked once, at the start). A catalog's first night made three requests
    # per item before its PUT.
    bucket = Bucket("s3", new_bucket("s3"), s3_env)
    job = write_job(tmp_path, [{"id": f"sku-{n}", "image": f"images/{n}.png"} for n in range(3)])
    s3_env.log.clear()

    assert run_now(job, FakeGemini(), tmp_path / "out", settings=_settings(bucket.url("edited/"))).exit_code == 0

    heads = {key: n for key, n in s3_env.log.counts.items() if key.startswith(f"HEAD /{bucket.name}/edited/")}
    assert sorted(heads.values()) == [1, 1, 1]  # one per item's name (its model answers JPEG)
    assert not [key for key in s3_env.log.counts if "prefix=edited%2Fsku" in key]  # no listing per name


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
@pytest.mark.parametrize("how", ["retouched", "a link out of the folder"])
def test_a_missing_object_is_put_back_only_from_the_items_own_copy_as_nanobatch_left_it(
    bucket: Bucket, tmp_path: Path, how: str
) -> None:
    # Putting a deleted object back publishes the folder's copy: not a file the user retouched since, nor one a
    # link there leads to (outside the folder: anything). The item cannot be made again without replacing the
    # user's file either, so it fails output_exists, nothing paid, and the bucket stays without it.
    fake = FakeGemini()
    job, out, settings = night_one(tmp_path, bucket.url("edited/"), fake)
    url = records(out)[0]["uploads"][0]
    storage._filesystem(url).rm(url.split("://", 1)[1])
    copy = out / "sku-1.png"
    copy.unlink()
    if how == "retouched":
        copy.write_bytes(b"the user's retouch")
    else:
        (tmp_path / "outside.txt").write_bytes(b"not for publishing")
        copy.symlink_to(tmp_path / "outside.txt")

    summary = run_now(job, fake, out, settings=settings)

    assert summary.exit_code == 1 and len(fake.requests) == 1 and records(out)[-1]["error"]["kind"] == "output_exists"
    assert not storage._filesystem(url).exists(url.split("://", 1)[1])


def test_an_upload_to_the_credentials_may_not_use_is_said_so_not_called_missing(
    s3_env: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bucket is there, the credentials in use are refused (403): "no such bucket" sent the operator looking
    # for a typo.
    name = new_bucket("s3")
    fs = storage._filesystem(f"s3://{name}")
    real = fs.call_s3

    def forbidden(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "head_bucket":
            raise PermissionError("An error occurred (403) when calling the HeadBucket operation: Forbidden")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", forbidden)
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    with pytest.raises(ConfigError, match=r"^output\.upload_to: .*access denied") as caught:
        nanobatch.check_job(job, settings=_settings(f"s3://{name}/edited/"), out_dir=tmp_path / "out")
    assert "no such bucket" not in str(caught.value)


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_an_answer_of_several_images_one_of_whose_objects_is_taken_is_paid_for_once(
    bucket: Bucket, tmp_path: Path
) -> None:
    # Someone's object at edited/lamp-1.png: the first night's two-image answer is refused there (paid); the next
    # nights look at the numbered names before paying, and send nothing.
    from .fakes import image_bytes, inline, ok_body

    settings = _settings(bucket.url("edited/"))
    storage.put(bucket.url("edited/lamp-1.png"), b"theirs", replace=False)
    job = write_job(tmp_path, [{"id": "lamp", "image": "images/a.png"}], model="gemini-3-pro-image")
    two = ok_body(inline(image_bytes((1, 2, 3))), inline(image_bytes((4, 5, 6))))
    out, fake = tmp_path / "out", FakeGemini({"make the background white": [two, two, two]})

    for _ in range(3):
        assert run_now(job, fake, out, settings=settings).exit_code == 1

    assert len(fake.requests) == 1 and storage.read_bytes(bucket.url("edited/lamp-1.png")) == b"theirs"


def test_an_item_whose_local_copy_alone_was_deleted_is_done_for_validate_and_status_as_for_the_run(
    bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A catalog that deletes its local copies once they are published: a run finds the objects and sends nothing,
    # so validate and status must not count such an item as work left (nor estimate its cost).
    job, out, settings = night_one(tmp_path, bucket.url("edited/"))
    (out / "sku-1.png").unlink()

    checked = nanobatch.check_job(job, settings=settings, out_dir=out, count_done=True)
    # status is given no settings (the night's came from a --config): the run's summary says where it published
    assert main(["status", str(out), "--json"]) == 0
    fake = FakeGemini()

    assert checked.done_items == 1 and checked.left_requests == 0
    assert json.loads(capsys.readouterr().out)["left"] == 0
    assert run_now(job, fake, out, settings=settings).stats.skipped == 1 and not fake.requests


def test_an_uploaded_image_rejected_later_by_qa_apply_is_said_still_published_and_replaced_once_one_passes(
    bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The team tightens a threshold after a night that published its images: --apply sets the image aside, and
    # must not pretend it was never uploaded. The object is left for the shop (it may be live), and the card,
    # the command and the record say where it is; the next image that passes replaces it.
    from nanobatch.cli.report import write_report

    fake = FakeGemini()
    job, out, settings = night_one(tmp_path, bucket.url("edited/"), fake)
    url = records(out)[0]["uploads"][0]
    published = storage.read_bytes(url)
    job.write_text(job.read_text() + "qa: {min_side: 2800}\n")
    capsys.readouterr()

    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1

    said = capsys.readouterr().out
    assert f"1 objects of items rejected now were uploaded before and stay in output.upload_to until the next " \
           f"run's image passes: {url}" in said  # fmt: skip
    assert records(out)[-1]["status"] == "rejected" and records(out)[-1]["uploads"] == [url]
    assert storage.read_bytes(url) == published and (out / "rejected" / "sku-1.png").is_file()
    card = write_report(out).read_text()
    assert f"uploaded before it was rejected, still at {url}" in card and "never uploaded" not in card
    job.write_text(job.read_text().replace("min_side: 2800", "min_side: 8"))
    other = FakeGemini({"make the background white": [ok_body(inline(image_bytes((10, 20, 30))))]})

    assert run_now(job, other, out, settings=settings).exit_code == 0
    assert records(out)[-1]["status"] == "ok" and storage.read_bytes(url) == (out / "sku-1.png").read_bytes()
    assert storage.read_bytes(url) != published
