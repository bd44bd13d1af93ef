"""Pictures and sources in buckets, and inputs sent by reference, against moto's S3 server and
gcp-storage-emulator on loopback (see tests/emulators.py)."""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from nanobatch.api import storage
from nanobatch.cli.report import write_report
from nanobatch.config import Settings, load_settings
from nanobatch.errors import ManifestError
from nanobatch.run.preflight import check_job

from .emulators import Bucket
from .fakes import FakeGemini, image_bytes, records, run_now, write_job

GOOGLE = "https://generativelanguage.googleapis.com"


def _pictures(bucket: Bucket, count: int, folder: str = "in") -> list[bytes]:
    pictures = [image_bytes((20 * n, 90, 160)) for n in range(count)]
    fs = storage._filesystem(bucket.url())
    fs.pipe({f"{bucket.name}/{folder}/{n}.png": data for n, data in enumerate(pictures)})
    return pictures


def _parts(request: httpx2.Request) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = json.loads(request.content)["contents"][0]["parts"][1:]
    return parts


def test_a_job_reads_its_pictures_from_a_bucket_and_a_rerun_downloads_none(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "LIST_THRESHOLD", 5)
    pictures = _pictures(bucket, 8)
    job = write_job(tmp_path, [{"id": f"p{n}", "image": bucket.url(f"in/{n}.png")} for n in range(8)])
    fake = FakeGemini()
    bucket.server.log.clear()

    assert run_now(job, fake).exit_code == 0

    sent = {base64.b64decode(_parts(r)[0]["inlineData"]["data"]) for r in fake.requests}
    assert sent == set(pictures)
    assert bucket.downloads() == 8
    bucket.server.log.clear()

    again = run_now(job, fake)  # nothing changed: stamps from one listing, not one download

    assert again.stats.skipped == 8 and len(fake.requests) == 8
    assert bucket.downloads() == 0
    assert sum(bucket.server.log.counts.values()) <= 2  # a listing (and maybe a bucket check), not 8 HEADs

    storage.put(bucket.url("in/3.png"), image_bytes((1, 2, 3)))  # a new version: only its item is redone
    third = run_now(job, fake)
    assert (third.stats.ok, third.stats.skipped, len(fake.requests)) == (1, 7, 9)


def test_validate_names_the_item_and_field_of_a_missing_object_or_bucket(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pictures(bucket, 1)
    gone = bucket.url("in/nothing.png").replace(bucket.name, bucket.name + "-gone")
    job = write_job(tmp_path, [
        {"id": "fine", "image": bucket.url("in/0.png")},
        {"id": "missing", "images": [bucket.url("in/0.png"), bucket.url("in/9.png")]},
        {"id": "no-bucket", "image": gone},
    ])  # fmt: skip

    with pytest.raises(ManifestError) as caught:
        check_job(job)

    found = {(p.item, p.field): p.message for p in caught.value.problems}
    assert set(found) == {("missing", "images[1]"), ("no-bucket", "image")}
    assert "no such object" in found["missing", "images[1]"]
    assert "no such bucket" in found["no-bucket", "image"]
    assert bucket.downloads() == 0


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [("s3://photos/a.png", "s3fs", "s3"), ("gs://photos/a.png", "gcsfs", "gcs"),
     ("az://photos/a.png", "adlfs", "azure"), ("abfs://photos@acct.dfs.core.windows.net/a.png", "adlfs", "azure")],
    ids=["s3", "gs", "az", "abfs"],
)  # fmt: skip
def test_a_missing_extra_is_a_problem_before_anything_is_sent(
    tmp_path: Path, without_module: Callable[[str], None], url: str, module: str, extra: str
) -> None:
    without_module(module)
    job = write_job(tmp_path, [{"id": "a", "image": url}])
    fake = FakeGemini()

    with pytest.raises(ManifestError) as caught:
        run_now(job, fake)

    (problem,) = caught.value.problems
    assert (problem.item, problem.field) == ("a", "image")
    assert f"pip install 'nanobatch[{extra}]'" in problem.message
    assert fake.requests == []


def test_items_from_a_csv_and_a_glob_in_a_bucket(bucket: Bucket, tmp_path: Path) -> None:
    _pictures(bucket, 3)
    storage.put(bucket.url("lists/catalog.csv"), b"sku,colour\n0,red\n2,blue\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        "defaults: {instruction: make it white}\n"
        "items_from:\n"
        f"  - csv: {bucket.url('lists/catalog.csv')}\n"
        '    id: "c{sku}"\n'
        f'    image: "{bucket.url("in/{sku}.png")}"\n'
        f'    instruction: "make it {{colour}}"\n'
        f'  - glob: "{bucket.url("in/*.png")}"\n'
        '    id: "g{stem}"\n'
    )
    fake = FakeGemini()

    assert run_now(job, fake).exit_code == 0

    done = {r["id"]: r["inputs"] for r in records(tmp_path / "out")}
    assert done == {
        "c0": [bucket.url("in/0.png")], "c2": [bucket.url("in/2.png")],
        **{f"g{n}": [bucket.url(f"in/{n}.png")] for n in range(3)},
    }  # fmt: skip
    assert sorted(fake.instructions()) == ["make it blue", "make it red"] + ["make it white"] * 3
    report = write_report(tmp_path / "out").read_text()
    assert f"remote image<small>{bucket.url('in/0.png')}</small>" in report  # not looked for on disk


def test_a_missing_source_object_is_named_with_its_field(bucket: Bucket, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"items_from:\n  - csv: {bucket.url('lists/none.csv')}\n")

    with pytest.raises(ManifestError) as caught:
        check_job(job)

    (problem,) = caught.value.problems
    assert problem.field == "items_from[0].csv" and "no such object" in problem.message


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_by_reference_sends_a_presigned_url_to_the_gemini_api_and_downloads_nothing(
    bucket: Bucket, tmp_path: Path
) -> None:
    pictures = _pictures(bucket, 2)
    job = write_job(tmp_path, [{"id": f"p{n}", "image": bucket.url(f"in/{n}.png")} for n in range(2)])
    settings = load_settings(env={}, overrides={"api.base_url": GOOGLE, "api.inputs": "by_reference"})
    fake = FakeGemini()
    bucket.server.log.clear()

    assert run_now(job, fake, settings=settings).exit_code == 0

    assert bucket.downloads() == 0
    uris = []
    for request in fake.requests:
        (part,) = _parts(request)
        assert part["fileData"]["mimeType"] == "image/png"
        uris.append(part["fileData"]["fileUri"])
    assert all(uri.startswith(bucket.server.url) and "Signature=" in uri for uri in uris)
    assert sorted(httpx2.get(uri).content for uri in uris) == sorted(pictures)  # anyone holding it can fetch it

    again = run_now(job, fake, settings=settings)  # the work key is the object's stamp, signed URL or not
    assert again.stats.skipped == 2


@pytest.mark.parametrize(
    ("base_url", "inputs", "expected"),
    [
        pytest.param("https://api.apiyi.com", "auto", "inlineData", id="proxy-auto-inline"),
        pytest.param("https://api.apiyi.com", "by_reference", "inlineData", id="proxy-falls-back-inline"),
        pytest.param(GOOGLE, "auto", "inlineData", id="gemini-gs-inline"),
        pytest.param("https://aiplatform.googleapis.com", "auto", "gs://", id="vertex-gs-uri"),
    ],
)
@pytest.mark.parametrize("bucket", ["gs"], indirect=True)
def test_gs_objects_go_by_uri_only_where_the_endpoint_takes_them(
    bucket: Bucket, tmp_path: Path, base_url: str, inputs: str, expected: str
) -> None:
    _pictures(bucket, 1)
    job = write_job(tmp_path, [{"id": "a", "image": bucket.url("in/0.png")}])
    settings = load_settings(env={}, overrides={"api.base_url": base_url, "api.inputs": inputs})
    fake = FakeGemini()
    bucket.server.log.clear()

    assert run_now(job, fake, settings=settings).exit_code == 0

    (part,) = _parts(fake.requests[0])
    if expected == "gs://":
        assert part == {"fileData": {"mimeType": "image/png", "fileUri": bucket.url("in/0.png")}}
        assert bucket.downloads() == 0
    else:
        assert "inlineData" in part and bucket.downloads() == 1


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_the_simulator_fetches_presigned_and_plain_urls_sent_by_reference(
    bucket: Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _pictures(bucket, 2)
    signed = storage.presign(bucket.url("in/1.png"), expires_s=600) + "&x=.png"  # a name that tells the type
    job = write_job(tmp_path, [
        {"id": "object", "image": bucket.url("in/0.png")},
        {"id": "url", "image": signed, "inputs": "by_reference"},
    ], defaults={"instruction": "make it white", "inputs": "auto"})  # fmt: skip
    bucket.server.log.clear()

    with caplog.at_level(logging.WARNING, logger="nanobatch"):
        summary = run_now(job, simulate=True)

    assert summary.exit_code == 0 and len(records(tmp_path / "out")) == 2
    signed_gets = [k for k in bucket.server.log.counts if k.startswith("GET ") and "Signature=" in k]
    assert len(signed_gets) == 2  # both fetched by the simulator, through their signed URLs
    assert bucket.downloads() == 2  # ...and by nothing else
    bucket.server.log.clear()

    again = run_now(job, simulate=True)  # work keys from the object's stamp and the URL: nothing fetched

    assert again.stats.skipped == 2 and bucket.downloads() == 0


def test_an_unknown_input_mode_is_named(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "inputs": "by_url"}])

    with pytest.raises(ManifestError) as caught:
        check_job(job)

    (problem,) = caught.value.problems
    assert (problem.item, problem.field) == ("a", "inputs") and "by_reference" in problem.message


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
@pytest.mark.parametrize("tier", ["standard", "batch"])
def test_a_url_the_api_cannot_fetch_fails_its_item_not_the_run(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    _pictures(bucket, 1)
    job = write_job(tmp_path, [
        {"id": "fine", "image": bucket.url("in/0.png")},
        {"id": "gone", "image": storage.presign(bucket.url("in/gone.png"), expires_s=600) + "&x=.png"},
    ], defaults={"instruction": "make it white", "inputs": "by_reference"})  # fmt: skip

    summary = run_now(job, simulate=True, settings=_fast_batch(monkeypatch) if tier == "batch" else None)

    assert (summary.exit_code, summary.stats.ok, summary.stats.failed) == (1, 1, 1)
    assert {r["tier"] for r in records(tmp_path / "out")} == {tier}
    (failed,) = [r for r in records(tmp_path / "out") if r["status"] == "failed"]
    assert failed["id"] == "gone" and failed["error"]["status_code"] == 400
    # The API's message names the URL it could not fetch; the record keeps its address, not its signature.
    assert "in/gone.png" in failed["error"]["message"] and "Signature" not in failed["error"]["message"]


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_validate_names_objects_the_credentials_may_not_read(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pictures(bucket, 2)
    job = write_job(tmp_path, [{"id": f"p{n}", "image": bucket.url(f"in/{n}.png")} for n in range(2)])
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks every signature

    with pytest.raises(ManifestError) as caught:
        check_job(job)

    found = {(p.item, p.field): p.message for p in caught.value.problems}
    assert set(found) == {("p0", "image"), ("p1", "image")}
    assert all("access denied" in message and "AKIATESTING" not in message for message in found.values())


def test_the_simulator_checks_file_data_parts_like_the_api() -> None:
    from nanobatch.models import lookup
    from nanobatch.simulator.errors import InvalidRequest
    from nanobatch.simulator.validation import parse_request

    model = lookup("gemini-3.1-flash-image")
    assert model is not None

    def parse(file: dict[str, Any]) -> Any:
        body = {"contents": [{"parts": [{"text": "make it white"}, {"fileData": file}]}]}
        return parse_request(json.dumps(body).encode(), model=model, model_id=model.id)

    first = parse({"mimeType": "image/png", "fileUri": "gs://b/a.png"})
    again = parse({"mime_type": "image/png", "file_uri": "gs://b/a.png"})  # snake_case, as the API accepts
    other = parse({"mimeType": "image/png", "fileUri": "gs://b/other.png"})
    (image,) = first.images
    assert image.uri == "gs://b/a.png"
    assert image.image.tobytes() == again.images[0].image.tobytes() != other.images[0].image.tobytes()
    with pytest.raises(InvalidRequest, match="mime_type: required"):
        parse({"fileUri": "gs://b/a.png"})
    with pytest.raises(InvalidRequest, match="Unsupported MIME type"):
        parse({"mimeType": "application/pdf", "fileUri": "gs://b/a.pdf"})


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
@pytest.mark.parametrize(("batch", "hours"), [(False, 6), (True, 49)], ids=["online", "batch"])
def test_signed_urls_outlive_a_batch_job_that_may_wait_48_hours(bucket: Bucket, batch: bool, hours: int) -> None:
    from nanobatch.api.gemini import FileRef
    from nanobatch.inputs.remote import Referrer, endpoint_for

    _pictures(bucket, 1)
    ref = bucket.url("in/0.png")
    referrer = Referrer(endpoint_for(GOOGLE), "by_reference", batch=batch)
    asked_at = time.time()
    signed = anyio.run(referrer.sign, {ref: FileRef("image/png", "signed")})
    expires = int(urllib.parse.parse_qs(urllib.parse.urlsplit(signed[ref].uri).query)["Expires"][0])
    assert abs(expires - (asked_at + hours * 3600)) < 600  # the URL's own expiry time, not a measured duration


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def _fast_batch(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for --tier batch against --simulate's simulator, its jobs done in 0.3 s rather than a minute."""
    import functools

    from nanobatch import simulator

    monkeypatch.setattr(simulator, "SimulatorConfig", functools.partial(simulator.SimulatorConfig, batch_latency_s=0.3))
    overrides = {"api.tier": "batch", "batch.linger_s": 0.1, "batch.poll_initial_s": 0.05, "batch.poll_max_s": 0.2}
    return load_settings(env={}, overrides=overrides)


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_a_batch_run_sends_bucket_pictures_by_reference_in_its_chunks(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pictures(bucket, 2)
    job = write_job(tmp_path, [{"id": f"p{n}", "image": bucket.url(f"in/{n}.png")} for n in range(2)],
                    defaults={"instruction": "make it white", "inputs": "by_reference"})  # fmt: skip
    bucket.server.log.clear()

    summary = run_now(job, simulate=True, settings=_fast_batch(monkeypatch))

    done = records(tmp_path / "out")
    assert summary.exit_code == 0 and {(r["status"], r["tier"]) for r in done} == {("ok", "batch")}
    signed_gets = [k for k in bucket.server.log.counts if k.startswith("GET ") and "Signature=" in k]
    assert len(signed_gets) == 2 and bucket.downloads() == 2, bucket.server.log.counts  # by the simulator only


def test_an_azure_url_with_no_account_to_connect_to_is_a_problem_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adlfs = pytest.importorskip("adlfs")
    for name in ("CONNECTION_STRING", "ACCOUNT_NAME", "ACCOUNT_KEY", "SAS_TOKEN"):
        monkeypatch.delenv(f"AZURE_STORAGE_{name}", raising=False)
    adlfs.AzureBlobFileSystem.clear_instance_cache()
    job = write_job(tmp_path, [{"id": "a", "image": "az://photos/a.png"}, {"id": "b", "image": "b.png"}])

    with pytest.raises(ManifestError) as caught:  # adlfs refuses to start: no account, no connection string
        check_job(job)
    (problem,) = caught.value.problems
    assert (problem.file, problem.item, problem.field) == (str(job), "a", "image")
    assert problem.message.startswith("az://photos/a.png: ValueError:") and "account" in problem.message

    fake = FakeGemini()  # a run (which does not stop for storage it cannot reach) fails that item alone
    run_now(job, fake)
    assert sorted((r["id"], r["status"]) for r in records(tmp_path / "out")) == [("a", "failed"), ("b", "ok")]
    assert len(fake.requests) == 1
