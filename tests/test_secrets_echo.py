"""Every credential a request carries stays out of what nanobatch says, not only the API key: a proxy's password
(and the Basic header it makes) or ``?key=`` in ``api.base_url``, a Vertex access token, a signed JWT a token
endpoint echoes, the webhook's URL, a signed URL in the manifest or in ``output.upload_to``; and a key cut in half
by a shortened message is cut out before it is shortened."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import anyio
import httpx2
import pytest

from nanobatch.api.client import GeminiClient
from nanobatch.api.redaction import SECRETS, scrub
from nanobatch.cli.main import main
from nanobatch.errors import ApiError
from nanobatch.item import WorkItem
from nanobatch.output.tally import Tally, build_record
from nanobatch.run.notify import _kept_out_of_logs

from .fakes import image_bytes, manifest_problems, write_job

BODY = {"contents": [{"parts": [{"text": "x"}]}]}


def echo(request: httpx2.Request) -> httpx2.Response:
    """A proxy that refuses the request and quotes it back, request line and headers."""
    head = " ".join(
        f"{name}: {value}" for name, value in sorted(request.headers.items(), key=lambda h: h[0] != "authorization")
    )
    return httpx2.Response(400, text=f"proxy refused: POST {request.url.raw_path.decode()} {head}")


async def refused(base_url: str, api_key: str | None = None, **options: object) -> ApiError:
    async with GeminiClient(base_url=base_url, api_key=api_key, transport=httpx2.MockTransport(echo), **options) as c:
        with pytest.raises(ApiError) as caught:
            await c.generate("gemini-2.5-flash-image", BODY, timeout_s=30)
    return caught.value


async def test_a_proxys_password_in_the_base_url_is_not_echoed_back_in_any_form() -> None:
    # httpx2 sends the URL's user name and password as a Basic header (`nanobatch models --live`, the batch
    # tier's calls): a proxy quoting it back quotes them in base64.
    base = "https://proxyuser:PROXY-PASSWORD-456@proxy.example/gemini"
    async with GeminiClient(base_url=base, api_key=None, transport=httpx2.MockTransport(echo)) as client:
        with pytest.raises(ApiError) as caught:
            await client.list_models()
    basic = base64.b64encode(b"proxyuser:PROXY-PASSWORD-456").decode()
    assert "Basic [redacted]" in caught.value.message
    assert "PROXY-PASSWORD-456" not in caught.value.message and basic not in caught.value.message


async def test_a_proxys_key_in_the_base_urls_query_is_not_echoed_back_in_a_request_line() -> None:
    error = await refused("https://proxy.example/gemini?key=PROXY-QUERY-KEY-123")
    assert "proxy refused: POST" in error.message and "PROXY-QUERY-KEY-123" not in error.message


async def test_a_bearer_token_the_client_sent_is_not_echoed_back() -> None:
    token = "ya29.a0-SECRET-ACCESS-TOKEN-abcdef123456"

    class Bearer(httpx2.Auth):  # as Vertex AI's auth sends its token
        def auth_flow(self, request: httpx2.Request):  # type: ignore[no-untyped-def]
            SECRETS.add(token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    error = await refused("https://proxy.example", request_auth=Bearer())
    assert "SECRET-ACCESS-TOKEN" not in error.message and "[redacted]" in error.message


async def test_a_key_at_the_cut_of_a_shortened_message_leaves_no_part_of_itself() -> None:
    key = "sk-LIVE-0123456789abcdefghijklmnopqrstuv"
    for pad in range(150, 200, 7):  # wherever the 200-character cut falls within the key
        page = f"{'x' * pad} Authorization: Bearer {key} was refused"

        def proxy(request: httpx2.Request, page: str = page) -> httpx2.Response:
            return httpx2.Response(403, text=page)

        async with GeminiClient(base_url="https://p.example", api_key=key, transport=httpx2.MockTransport(proxy)) as c:
            with pytest.raises(ApiError) as caught:
                await c.generate("gemini-2.5-flash-image", BODY, timeout_s=30)
        assert "sk-LIVE-0123" not in caught.value.message


def test_a_signed_jwt_or_an_access_token_is_cut_from_any_message() -> None:
    jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJzYUBwLmlhbSJ9.c2lnbmF0dXJlLW9mLXRoZS1hc3NlcnRpb24"
    said = scrub(f"invalid_grant: bad request: assertion={jwt}&grant_type=jwt-bearer; token ya29.c.b0AXv0zTOKEN", None)
    assert "eyJ" not in said and "ya29." not in said and "invalid_grant" in said


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("setting", ["api: {store: KEY}", "api: {backend: vertex, project: KEY}"])
def test_a_config_error_quoting_a_value_never_shows_the_key_pasted_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, setting: str,
    log_format: str,
) -> None:  # fmt: skip
    # The config is read before the settings name the key's variable: what a message quotes is cut all the same.
    monkeypatch.setenv("NANOBATCH_API_KEY", PASTED)
    (tmp_path / "nanobatch.yaml").write_text(setting.replace("KEY", PASTED) + "\n")
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    argv = ["--log-format", log_format, "validate", str(job), "--config", str(tmp_path / "nanobatch.yaml")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "api." in captured.err and PASTED not in captured.err + captured.out


@pytest.mark.parametrize("field", ["api_key_env", "base_url"])
def test_a_key_pasted_in_the_wrong_setting_is_refused_without_being_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    key = "AIzaSyPASTED0KEY0123456789abcdefghijk"
    value = key if field == "api_key_env" else f"https://proxy.example:{key}/v1"
    (tmp_path / "nanobatch.yaml").write_text(f"api:\n  {field}: {value}\n")
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    assert main(["validate", str(job), "--config", str(tmp_path / "nanobatch.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"api.{field}" in err and "PASTED0KEY" not in err


def test_a_signed_upload_to_is_refused_without_its_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    sas = "https://acct.blob.core.windows.net/out?sv=2024&sig=SAS-SIGNATURE-SECRET%3D"
    (tmp_path / "nanobatch.yaml").write_text(f"output:\n  upload_to: '{sas}'\n")
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    assert main(["run", str(job), "--simulate", "--config", str(tmp_path / "nanobatch.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "output.upload_to" in err and "SAS-SIGNATURE" not in err


def test_a_signed_image_url_is_recorded_and_reported_without_its_signature(tmp_path: Path) -> None:
    url = "https://photos.example/a.jpg?X-Amz-Credential=AKIA&X-Amz-Signature=PRESIGNED-SIG-0badc0ffee"
    item = WorkItem(id="a", model="gemini-3.1-flash-image", inputs=(url, "http://u:USERINFO-PASS@h.example/b.png"),
                    steps=("make it white",))  # fmt: skip
    record = build_record(item, Tally(tier="standard"), run="r", status="failed")
    assert record.inputs == ("https://photos.example/a.jpg", "http://h.example/b.png")
    out = tmp_path / "out"
    out.mkdir()
    # A line an earlier version wrote, signature and all: the report does not show it either.
    line = {**record.to_json(), "inputs": [url]}
    (out / "results.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["report", str(out)]) == 0
    assert "PRESIGNED-SIG" not in (out / "report.html").read_text()


def test_the_webhooks_url_is_kept_out_of_the_http_librarys_log_lines_as_it_writes_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "https://Hooks.Example.com:443/services/T000/B000/WEBHOOK-TOKEN-2"
    caplog.set_level(logging.INFO, logger="httpx2")
    with _kept_out_of_logs(url):
        logging.getLogger("httpx2").info('HTTP Request: POST %s "HTTP/1.1 200 OK"', httpx2.URL(url))
    assert "WEBHOOK-TOKEN" not in caplog.text and "[the notify webhook]" in caplog.text
    assert json.dumps(caplog.messages)  # (the lines are there)


async def test_a_proxys_user_name_and_password_in_the_base_url_are_sent_with_each_request() -> None:
    seen: list[httpx2.Request] = []

    def proxy(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json={"candidates": [{"content": {"parts": [{"text": "x"}]}}]})

    base = "https://proxyuser:PROXY-PASSWORD-456@proxy.example/gemini"
    async with GeminiClient(base_url=base, api_key=None, transport=httpx2.MockTransport(proxy)) as client:
        await client.generate("gemini-2.5-flash-image", BODY, timeout_s=30)
    basic = base64.b64encode(b"proxyuser:PROXY-PASSWORD-456").decode()
    assert seen[0].headers["authorization"] == f"Basic {basic}"


def test_a_base_url_with_a_query_is_refused_without_being_shown() -> None:
    from nanobatch.config import load_settings
    from nanobatch.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides={"api.base_url": "https://proxy.example/gemini?key=PROXY-QUERY-KEY-123"})
    assert "holds a query" in str(caught.value) and "PROXY-QUERY-KEY" not in str(caught.value)


def test_a_short_secret_is_not_cut_out_of_a_downloaded_pictures_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # A results file is mostly base64 image data: a short query value (6 characters) could be spelled there by
    # chance, and cutting it would damage a picture. The key (and any secret of 12 or more) is cut everywhere.
    from nanobatch.api.redaction import StreamCut

    monkeypatch.setattr(SECRETS, "_values", ("sk-LIVE-0123456789abcdef", "Zm9vYm"))
    line = b'{"data": "QUJDZm9vYmFy", "error": "no credit for sk-LIVE-0123456789abcdef"}\n'
    cut = StreamCut(None)
    written = cut.feed(line[:40]) + cut.feed(line[40:]) + cut.end()
    assert written == line.replace(b"sk-LIVE-0123456789abcdef", b"[redacted]")


PASSWORD = "BucketPassw0rd-SECRET"


@pytest.mark.parametrize(
    ("where", "manifest", "config"),
    [
        ("image", {"image": f"s3://AKIAEXAMPLE:{PASSWORD}@bucket/a.jpg"}, ""),
        ("image", {"image": f"ftp://user:{PASSWORD}@host.example/a.jpg"}, ""),  # not a scheme we fetch either
        ("image", {"image": f"abfs://container:{PASSWORD}@acct.dfs.core.windows.net/a.jpg"}, ""),
        ("output.upload_to", {}, f"output:\n  upload_to: 'gs://user:{PASSWORD}@bucket/edited/'\n"),
        ("items_from", {"items_from": [{"csv": f"az://acct:{PASSWORD}@container/c.csv"}]}, ""),
    ],
    ids=["item picture", "other scheme", "abfs", "upload_to", "source"],
)
def test_a_user_name_and_password_in_a_bucket_url_are_refused_without_being_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str,
    manifest: dict[str, object], config: str,
) -> None:  # fmt: skip
    # Clouds take their credentials from their SDK's own places; one written into the URL would be written into
    # every record, report and log line that names the URL (and the bucket's library would warn with it).
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    (tmp_path / "nanobatch.yaml").write_text(config)
    item = {"id": "a", "image": "images/a.png", **{k: v for k, v in manifest.items() if k == "image"}}
    top = {k: v for k, v in manifest.items() if k != "image"}
    job = write_job(tmp_path, [] if "items_from" in top else [item], **top)
    argv = [str(job), "--config", str(tmp_path / "nanobatch.yaml")]
    assert main(["validate", *argv]) == 2
    assert main(["run", *argv, "--simulate", "--quiet", "--log-format", "json"]) == 2
    said = capsys.readouterr().err
    assert where in said and PASSWORD not in said and not (tmp_path / "out").exists()
    reason = "only http(s):// URLs" if "ftp://" in str(manifest) else "carries no user name or password"
    assert reason in said
    if where == "image":  # the problem itself, before any log line is cut, does not carry it either
        (problem,) = manifest_problems(job)
        assert PASSWORD not in problem.message


PASTED = "AIzaSyPASTED0KEY0123456789abcdefghijk"


@pytest.mark.parametrize(
    ("fields", "field", "item"),
    [
        ({"instruction": f"make it white {PASTED}"}, "instruction", "a"),
        ({"steps": ["crop it", f"key={PASTED}"]}, "instruction", "a"),
        ({"output": f"{PASTED}/{{id}}.png"}, "output", "a"),
        ({"id": PASTED}, "id", None),  # the problem names no item: its name is the key
        ({"model": PASTED}, "model", "a"),  # it would go into the request's URL, which proxies log
    ],
    ids=["instruction", "a step", "output", "id", "model"],
)
def test_the_api_key_pasted_into_an_item_is_refused_before_it_is_sent_or_written_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fields: dict[str, object],
    field: str, item: str | None,
) -> None:  # fmt: skip
    # It would go to the model in the request, and into results.jsonl, the report and the lines naming the item.
    monkeypatch.setenv("NANOBATCH_API_KEY", PASTED)
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", **fields}])
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert PASTED not in err and f"field '{field}': holds the API key" in err
    assert ("item 'a'" in err) == (item == "a")


def test_a_json_events_structured_data_is_cut_of_the_key_like_its_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanobatch.cli.logs import install_redaction, setup_logging
    from nanobatch.config import load_settings

    monkeypatch.setenv("NANOBATCH_API_KEY", PASTED)
    setup_logging(0, False, "json")
    install_redaction(load_settings())
    logging.getLogger("nanobatch").info("summary %s", PASTED, extra={"fields": {"examples": [f"x{PASTED}"]}})
    (event,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert event["examples"] == ["x[redacted]"] and PASTED not in event["message"]


def test_a_one_letter_test_key_cuts_nothing_out_of_the_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Cut from the answer's words, "k" took every k: usageMetadata's "promptTokenCount" was lost, and the item
    # priced at its worst case.
    from nanobatch.simulator import run_in_thread

    monkeypatch.setenv("NANOBATCH_API_KEY", "k")
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    with run_in_thread() as url:  # the key sent, as to a real endpoint
        assert main(["run", str(job), "--base-url", url, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert record["usage"]["promptTokenCount"] > 0 and "[redacted]" not in json.dumps(record)


def test_the_api_key_pasted_into_a_catalog_row_is_named_by_its_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a million-row export, "the manifest" is no place to look: the row is.
    monkeypatch.setenv("NANOBATCH_API_KEY", PASTED)
    job = write_job(tmp_path, [], items_from=[{"csv": "c.csv"}])
    (tmp_path / "images" / "a.png").write_bytes(image_bytes())
    (tmp_path / "c.csv").write_text(f"id,image,instruction\nA1,images/a.png,x\nA2,images/a.png,note {PASTED}\n")
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "c.csv:3: item 'A2', field 'instruction': holds the API key" in err and PASTED not in err


def test_a_short_test_key_in_the_environment_leaves_error_messages_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "e" as a local proxy's dummy key: cut from the message, it read "noth[redacted]r[redacted].yaml".
    monkeypatch.setenv("NANOBATCH_API_KEY", "e")
    assert main(["validate", str(tmp_path / "nothere.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nothere.yaml" in err and "[redacted]" not in err


# Every credential the settings lead to is known from the moment they are read (SECRETS.learn), and cut at each
# way out of the process: the webhook's body, results.jsonl, summary.json, the errors shown on stderr.

KEY = "AIzaSyKNOWN0KEY0123456789abcdefghijklmn"


def test_a_refused_runs_notice_never_carries_the_key_a_manifest_value_quotes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The problem quotes the value ("does not support '<key>'"): the terminal showed [redacted], the webhook the key.
    from nanobatch import run_job
    from nanobatch.errors import ManifestError

    from .receiver import receiver

    monkeypatch.setenv("NANOBATCH_API_KEY", KEY)
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "aspect_ratio": KEY}])
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + "/hook")
        with pytest.raises(ManifestError):
            anyio.run(lambda: run_job(job, simulate=True, out_dir=tmp_path / "out"))
    (body,) = server.bodies("/hook")
    notice = json.loads(body)
    assert "aspect_ratio" in notice["text"] and "aspect_ratio" in notice["reason"]
    assert KEY not in body.decode() and "[redacted]" in notice["reason"]


def test_a_notices_text_is_cut_of_the_key_before_it_is_shortened() -> None:
    # A chat's text takes 300 characters of the reason: a key at the cut left its start there, past any later cut.
    from nanobatch.run.notify import one_line

    SECRETS.add(KEY)
    line = one_line("nightly", "aborted", f"{'x' * 285} refused {KEY}", {"ok": 0}, 0.0, 1.0)
    assert KEY[:6] not in line and line.endswith("...")


def test_the_records_and_the_summary_are_cut_of_a_known_secret_as_they_are_written(tmp_path: Path) -> None:
    # The last net: whatever message reached a record or the summary without being cut is cut as it is written.
    from nanobatch.output.outdir import OutDir
    from nanobatch.output.record import ErrorInfo

    SECRETS.add(KEY, 'sk-with-"quotes"-and\\slash')
    item = WorkItem(id="a", model="gemini-3.1-flash-image", inputs=(), steps=("make it white",))
    said = f'no credit on {KEY} (sk-with-"quotes"-and\\slash)'
    error = ErrorInfo(kind="auth", status_code=401, message=said)
    record = build_record(item, Tally(tier="standard"), run="r", status="failed", error=error)
    out = OutDir(tmp_path / "out", "r")
    out.results.open()
    out.results.append_many([record])
    out.results.close()
    out.write_summary({"last_run": {"reason": said}})
    (line,) = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert json.loads(line)["error"]["message"] == "no credit on [redacted] ([redacted])"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["last_run"]["reason"] == "no credit on [redacted] ([redacted])"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_key_in_a_variable_of_its_own_is_never_shown_by_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    # api.api_key_env: MY_KEY. The error output cut the usual variables' keys alone, and what a client had learnt:
    # a check that refuses the job builds none.
    monkeypatch.setenv("MY_KEY", KEY)
    (tmp_path / "nanobatch.yaml").write_text("api:\n  api_key_env: MY_KEY\n")
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "image_size": KEY}])
    argv = ["--log-format", log_format, "validate", str(job), "--config", str(tmp_path / "nanobatch.yaml")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "field 'image_size'" in captured.err and KEY not in captured.err + captured.out


@pytest.mark.parametrize("pad", [0, 150, 165])  # the title's 200-character cut after the key, or in it
def test_a_page_that_came_back_with_200_is_told_without_the_key_in_its_title(pad: int) -> None:
    from nanobatch.api.gemini import parse_reply

    SECRETS.add(KEY)  # as the settings made it known
    page = f"<html><head><title>{'x' * pad} Access check for Bearer {KEY}</title></head></html>"
    with pytest.raises(ApiError) as caught:
        parse_reply(bytearray(page.encode()))
    assert caught.value.kind == "bad_gateway" and "a page, not an answer" in caught.value.message
    assert KEY[:6] not in caught.value.message


def test_a_worker_processs_message_is_cut_of_the_key_in_the_runs_process() -> None:
    # A big answer is decoded in a worker process, which knows no secret: its message is cut where it lands.
    from nanobatch.api.decoding import _received

    SECRETS.add(KEY)
    decoded = _received(("k", (f"a page, not an answer, came back with status 200: Bearer {KEY}", "bad_gateway", 200,
                                True), ()))  # fmt: skip
    assert decoded is not None and isinstance(error := decoded[1], ApiError)
    assert KEY not in error.message and error.message.endswith("Bearer [redacted]") and error.retryable


def test_an_images_mime_type_echoing_the_key_is_told_without_it() -> None:
    from nanobatch.api.gemini import Image, Reply, reply_error

    SECRETS.add(KEY)
    error = reply_error(Reply(images=(Image(f"image/Bearer_{KEY}", b"not a picture"),), finish_reason="STOP"))
    assert error is not None and error.kind == "bad_image"
    assert KEY not in error.message and "image/Bearer_[redacted]" in error.message


def test_a_proxy_echoing_the_key_in_a_200_answer_leaves_it_out_of_the_records_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .fakes import FakeGemini, inline, ok_body, records, run

    def page(request: httpx2.Request) -> httpx2.Response:
        title = f"Access check for {request.headers['authorization']}"
        return httpx2.Response(200, text=f"<html><title>{title}</title></html>", headers={"content-type": "text/html"})

    def mime(request: httpx2.Request) -> httpx2.Response:
        key = request.headers["authorization"].removeprefix("Bearer ")
        return httpx2.Response(200, json=ok_body(inline(b"not a picture", mime=f"image/{key}")))

    monkeypatch.setenv("NANOBATCH_API_KEY", KEY)
    monkeypatch.setenv("NANOBATCH_RETRY_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("NANOBATCH_RETRY_NO_IMAGE_ATTEMPTS", "0")
    items = [{"id": "page", "instruction": "page"}, {"id": "mime", "instruction": "mime"}]
    job = write_job(tmp_path, items)
    summary = run(job, FakeGemini({"page": [page], "mime": [mime]}))
    assert summary.exit_code == 1
    errors = {record["id"]: record["error"] for record in records(tmp_path / "out")}
    assert errors["page"]["kind"] == "bad_gateway" and "Bearer [redacted]" in errors["page"]["message"]
    assert errors["mime"]["kind"] == "bad_image" and "image/[redacted]" in errors["mime"]["message"]
    assert main(["report", str(tmp_path / "out")]) == 0
    for name in ("results.jsonl", "report.html", "summary.json"):
        assert KEY not in (tmp_path / "out" / name).read_text()


@pytest.mark.parametrize(
    ("top", "argv", "field"),
    [
        ({"name": KEY}, [], "name"),
        ({"name": f"nightly-{KEY}"}, [], "name"),
        ({"output_dir": f"out/{KEY}"}, [], "output_dir"),
        ({}, ["--out", f"out/{KEY}"], "--out"),
    ],
    ids=["name", "in the name", "output_dir", "--out"],
)
def test_the_api_key_pasted_as_the_jobs_name_or_folder_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, top: dict[str, str],
    argv: list[str], field: str,
) -> None:  # fmt: skip
    # It would name the output folder, and go into summary.json, the metrics file's labels and the webhook's notice.
    monkeypatch.setenv("NANOBATCH_API_KEY", KEY)
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}], **top)
    assert main(["validate", str(job), *argv]) == 2
    assert main(["run", str(job), "--simulate", "--quiet", *argv]) == 2
    captured = capsys.readouterr()
    assert f"field '{field}': holds the API key" in captured.err and KEY not in captured.err + captured.out
    assert not (tmp_path / "out").exists() and not Path("out").exists()  # (beside the manifest, or in the cwd)


@pytest.mark.parametrize(
    "value",
    ["Zk8f3PqLx92MvT0aBcDeFgHiJkLmNoPq", "a3f29c0b7d4e5f61a3f29c0b7d4e5f61", "SK0123456789ABCDEFGHIJKLMN"],
    ids=["mixed case", "hex", "capitals and digits"],
)
def test_a_key_without_dashes_pasted_as_the_keys_variable_is_refused_unseen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    # Taken for a name, it was echoed by "no API key: set the environment variable <key>".
    (tmp_path / "nanobatch.yaml").write_text(f"api:\n  api_key_env: {value}\n")
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    assert main(["run", str(job), "--config", str(tmp_path / "nanobatch.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "api.api_key_env" in err and "is a key pasted there?" in err and value not in err


@pytest.mark.parametrize(
    "name", ["MY_KEY", "NANOBATCH_PROD_KEY", "my_key", "_KEY2", "GEMINI_KEY_2026_11_PROJECT", "GeminiKey", "ShopKey2"]
)
def test_variable_names_are_still_taken(name: str) -> None:
    from nanobatch.config import load_settings

    assert load_settings(env={}, overrides={"api.api_key_env": name}).api.api_key_env == name


@pytest.mark.parametrize(
    ("item_id", "base_url"),
    [
        pytest.param("freya29.summer-dress-collection", None, id="an id with ya29. inside"),
        pytest.param("a", "http://shop:images@{host}", id="a short proxy password in the inputs' paths"),
    ],
)
def test_the_records_last_cut_never_touches_what_finds_an_items_work_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, item_id: str, base_url: str | None
) -> None:
    # Every record is cut once more as it is written: a token pattern inside an id, or a proxy's short password
    # that is also a folder's name, turned the record's id, outputs or inputs into "[redacted]", and the item,
    # never found done, was sent (and paid for) again every night.
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    from .fakes import records

    job = write_job(tmp_path, [{"id": item_id, "image": "images/a.png"}])
    out = tmp_path / "out"
    with run_in_thread(SimulatorConfig()) as url:
        where = url if base_url is None else base_url.format(host=url.removeprefix("http://"))
        argv = ["run", str(job), "--base-url", where, "--out", str(out), "--quiet"]
        monkeypatch.setenv("NANOBATCH_API_AUTH", "x-goog-api-key")
        assert main(argv) == 0
        assert main(argv) == 0
    (record,) = records(out)  # the second run found it done: one record, one payment
    assert record["id"] == item_id and record["inputs"] == [str(tmp_path / "images" / "a.png")]
    assert (out / record["outputs"][0]).is_file()
