"""Input images: URL downloads (limits, retries, cache, no API key), size limits and resize_inputs, URL checks."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from PIL import Image as Pillow

import nanobatch
from nanobatch.api.gemini import Image
from nanobatch.api.retry import RetryPolicy
from nanobatch.cli.main import main
from nanobatch.config import RetrySettings
from nanobatch.errors import InputError, ManifestError
from nanobatch.inputs.load import InputLoader, UrlChecklist, load_inputs
from nanobatch.item import WorkItem
from nanobatch.models import MB
from nanobatch.pictures import file_problem, picture_problem, sniff_mime

from .conftest import run_virtual
from .fakes import FakeGemini, image_bytes, write_job

PNG = image_bytes()
JPEG = image_bytes(fmt="JPEG")


class Body(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A response body in chunks that counts how many were read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.read = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.read += 1
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.read += 1
            yield chunk


class Host:
    """A scripted image host: answers per URL in order, the last one repeating; keeps every request."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        queue = self.answers.get(str(request.url)) or [httpx2.Response(404)]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, bytes):
            return httpx2.Response(200, content=answer, headers={"content-type": "application/octet-stream"})
        return answer

    def count(self, url: str) -> int:
        return sum(str(r.url) == url for r in self.requests)


def waits() -> tuple[RetryPolicy, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return RetryPolicy(settings=RetrySettings(max_attempts=4), sleep=sleep), slept


def load(host: Host, refs: list[str], **options: Any) -> list[Image]:
    policy = options.pop("retry", None) or waits()[0]
    resize = options.pop("resize", False)

    async def go() -> list[Image]:
        async with InputLoader(transport=httpx2.MockTransport(host), **options) as loader:
            return await loader.load(refs, resize=resize, retry=policy)

    return anyio.run(go)


URL = "https://cdn.example.com/p/1.jpg"


def test_a_url_is_downloaded_and_its_type_read_from_the_bytes() -> None:
    host = Host({URL: [JPEG]})
    (image,) = load(host, [URL])
    assert image == Image("image/jpeg", JPEG)
    assert host.requests[0].headers["user-agent"] == "nanobatch"


def test_redirects_are_followed() -> None:
    host = Host(
        {
            URL: [httpx2.Response(302, headers={"location": "https://cdn2.example.com/x.png"})],
            "https://cdn2.example.com/x.png": [PNG],
        }
    )
    assert load(host, [URL])[0].mime_type == "image/png"


def test_a_404_fails_at_once_and_is_remembered_for_the_run() -> None:
    host = Host({URL: [httpx2.Response(404)]})

    async def go() -> list[str]:
        messages = []
        async with InputLoader(transport=httpx2.MockTransport(host)) as loader:
            for _ in range(2):
                with pytest.raises(InputError) as err:
                    await loader.load([URL], retry=waits()[0])
                messages.append(err.value.message)
                assert (err.value.kind, err.value.status_code, err.value.retryable) == ("input", 404, False)
        return messages

    messages = anyio.run(go)
    assert len(host.requests) == 1
    assert URL in messages[0] and "HTTP 404" in messages[0] and messages[1] == messages[0]


SIGNED = URL + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=f00dfeed"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(httpx2.Response(403), id="403"),
        pytest.param(httpx2.Response(200, content=b"<html>not a picture</html>"), id="not-a-picture"),
        pytest.param(httpx2.TooManyRedirects(f"redirected too often from {SIGNED}"), id="redirects"),
        pytest.param(httpx2.RemoteProtocolError(f"bad answer for {SIGNED}"), id="transport"),
    ],
)
def test_a_signed_url_that_fails_is_named_without_its_signature(answer: httpx2.Response | Exception) -> None:
    with pytest.raises(InputError) as err:
        load(Host({SIGNED: [answer]}), [SIGNED], retry=RetryPolicy(settings=RetrySettings(max_attempts=1)))
    assert URL in err.value.message and "f00dfeed" not in err.value.message


def test_validate_names_a_failing_signed_url_without_its_signature(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": SIGNED}])
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job, transport=httpx2.MockTransport(Host({SIGNED: [httpx2.Response(403)]})))
    assert URL in str(err.value) and "f00dfeed" not in str(err.value)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(httpx2.Response(503), id="503"),
        pytest.param(httpx2.Response(429, headers={"retry-after": "7"}), id="429-retry-after"),
        pytest.param(httpx2.ReadTimeout("slow"), id="timeout"),
        pytest.param(httpx2.ConnectError("refused"), id="connection"),
    ],
)
def test_transient_failures_are_retried(first: Any) -> None:
    host = Host({URL: [first, PNG]})
    policy, slept = waits()
    assert load(host, [URL], retry=policy)[0].data == PNG
    assert len(host.requests) == 2 and len(slept) == 1
    if isinstance(first, httpx2.Response) and first.status_code == 429:
        assert slept == [7.0]  # the server's Retry-After


def test_retries_stop_at_max_attempts_and_the_last_error_fails_the_load() -> None:
    host = Host({URL: [httpx2.Response(502)]})
    with pytest.raises(InputError, match="HTTP 502"):
        load(host, [URL])
    assert len(host.requests) == 4


def test_a_body_over_the_size_limit_is_refused_before_it_is_read() -> None:
    body = Body([b"x" * 1000] * 100)
    host = Host({URL: [httpx2.Response(200, headers={"content-length": str(100_000)}, stream=body)]})
    with pytest.raises(InputError, match="over the 0 MB download limit"):
        load(host, [URL], max_download_bytes=10_000)
    assert body.read == 0 and len(host.requests) == 1  # not retried


def test_a_streamed_body_without_a_length_stops_at_the_limit() -> None:
    body = Body([b"x" * 1000] * 100)
    host = Host({URL: [httpx2.Response(200, stream=body)]})
    with pytest.raises(InputError, match="more than"):
        load(host, [URL], max_download_bytes=10_000)
    assert body.read == 11


def test_something_that_is_not_a_picture_is_refused() -> None:
    host = Host({URL: [httpx2.Response(200, text="<html>login</html>", headers={"content-type": "text/html"})]})
    with pytest.raises(InputError, match=r"not a PNG, JPEG, WEBP or HEIC/HEIF image \(the server said text/html\)"):
        load(host, [URL])


def test_a_url_used_by_several_items_is_fetched_once() -> None:
    other = "https://cdn.example.com/logo.png"
    host = Host({URL: [JPEG], other: [PNG]})
    release = anyio.Event()

    async def slow(request: httpx2.Request) -> httpx2.Response:
        await release.wait()
        return host(request)

    async def go() -> None:
        async with InputLoader(transport=httpx2.MockTransport(slow)) as loader:
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(loader.load, [URL, other])
                await anyio.wait_all_tasks_blocked()
                release.set()
            assert (await loader.load([other]))[0].data == PNG  # later items: from the cache
            assert loader.downloads == 2

    anyio.run(go)
    assert host.count(URL) == 1 and host.count(other) == 1


def test_the_cache_is_bounded() -> None:
    urls = [f"https://cdn.example.com/{n}.png" for n in range(3)]
    host = Host({url: [PNG] for url in urls})
    load(host, [*urls, urls[2], urls[0]], cache_entries=2)
    assert [host.count(url) for url in urls] == [2, 1, 1]  # 0 was pushed out by 2, then fetched again


# --- sizes and resize_inputs -----------------------------------------------------------------------------------


def noise(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    channels = len(mode)
    picture = Pillow.frombytes(mode, size, os.urandom(size[0] * size[1] * channels))
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


def local(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_a_picture_over_the_inline_limit_is_refused_naming_the_file(tmp_path: Path) -> None:
    ref = local(tmp_path, "big.png", noise((64, 64)))
    with pytest.raises(InputError) as err:
        load(Host({}), [ref], max_input_bytes=4000)
    assert ref in err.value.message and "resize_inputs: true" in err.value.message


def test_resize_inputs_downscales_a_photo_to_a_jpeg_under_the_limit(tmp_path: Path) -> None:
    ref = local(tmp_path, "big.png", noise((64, 64)))
    (image,) = load(Host({}), [ref], max_input_bytes=4000, resize=True)
    assert image.mime_type == "image/jpeg" == sniff_mime(image.data) and len(image.data) <= 4000
    with Pillow.open(io.BytesIO(image.data)) as picture:
        assert picture.width < 64 and picture.width == picture.height  # shrunk, proportions kept


def test_resize_inputs_keeps_transparency_as_png(tmp_path: Path) -> None:
    ref = local(tmp_path, "logo.png", noise((64, 64), "RGBA"))
    (image,) = load(Host({}), [ref], max_input_bytes=6000, resize=True)
    assert image.mime_type == "image/png" and len(image.data) <= 6000
    with Pillow.open(io.BytesIO(image.data)) as picture:
        assert picture.mode == "RGBA"


def test_resize_inputs_keeps_a_16_bit_grey_scan_what_it_shows_not_a_white_page(tmp_path: Path) -> None:
    # Converted to RGB as it is, every 16-bit value above 255 clips to white: a blank page, sent and paid for.
    scan = Pillow.frombytes("I;16", (256, 256), os.urandom(256 * 256 * 2))  # grain over the whole range
    buffer = io.BytesIO()
    scan.save(buffer, "PNG")
    assert len(buffer.getvalue()) > 20_000
    (image,) = load(Host({}), [local(tmp_path, "scan.png", buffer.getvalue())], max_input_bytes=20_000, resize=True)
    with Pillow.open(io.BytesIO(image.data)) as picture:
        grey = picture.convert("L")
    mean = sum(count * value for value, count in enumerate(grey.histogram())) / (grey.width * grey.height)
    assert 64 < mean < 192  # its grain, centred on mid-grey: not white


def test_resize_inputs_applies_to_downloads_too() -> None:
    host = Host({URL: [noise((64, 64))]})
    (image,) = load(host, [URL], max_input_bytes=4000, resize=True)
    assert image.mime_type == "image/jpeg" and len(image.data) <= 4000


def test_pictures_that_fit_alone_but_not_together(tmp_path: Path) -> None:
    refs = [local(tmp_path, f"{n}.png", noise((36, 36))) for n in range(3)]  # ~4 KB each
    with pytest.raises(InputError, match="together"):
        load(Host({}), refs, max_input_bytes=5000, max_total_bytes=9000)
    images = load(Host({}), refs, max_input_bytes=5000, max_total_bytes=9000, resize=True)
    assert sum(len(i.data) for i in images) <= 9000


def test_small_pictures_are_sent_as_they_are(tmp_path: Path) -> None:
    ref = local(tmp_path, "small.png", PNG)
    assert load(Host({}), [ref], resize=True) == [Image("image/png", PNG)]


def test_a_huge_local_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    with path.open("wb") as f:
        f.write(JPEG[:16])
        f.truncate(9 * MB)  # sparse: costs nothing
    with pytest.raises(InputError, match=r"9\.0 MB, but an input image can be at most 7 MB"):
        anyio.run(lambda: load_inputs([str(path)]))


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        pytest.param(PNG, "image/png", id="png"),
        pytest.param(JPEG, "image/jpeg", id="jpeg"),
        pytest.param(image_bytes(fmt="WEBP"), "image/webp", id="webp"),
        pytest.param(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "image/heic", id="heic"),
        pytest.param(b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "image/heif", id="heif"),
    ],
)
def test_the_type_comes_from_the_bytes_not_the_name(tmp_path: Path, data: bytes, mime: str) -> None:
    ref = local(tmp_path, "picture.bin", data)
    assert anyio.run(lambda: load_inputs([ref])) == [Image(mime, data)]


def test_a_file_that_is_not_a_picture_fails(tmp_path: Path) -> None:
    ref = local(tmp_path, "notes.png", b"GIF89a....")
    with pytest.raises(InputError, match="it is image/gif"):
        anyio.run(lambda: load_inputs([ref]))


# --- through a run -----------------------------------------------------------------------------------------------


def routed(api: FakeGemini, host: Host) -> httpx2.MockTransport:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return host(request) if request.url.host == "cdn.example.com" else api(request)

    return httpx2.MockTransport(handler)


def test_a_run_downloads_each_url_once_without_the_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", "secret-key")
    missing = "https://cdn.example.com/gone.jpg"
    host = Host({URL: [JPEG], missing: [httpx2.Response(404)]})
    api = FakeGemini()
    job = write_job(
        tmp_path, [{"id": "a", "image": URL}, {"id": "b", "images": [URL, URL]}, {"id": "c", "image": missing}]
    )

    async def go() -> nanobatch.RunSummary:
        return await nanobatch.run_job(job, transport=routed(api, host), out_dir=tmp_path / "out")

    summary = run_virtual(go)
    assert (summary.stats.ok, summary.stats.failed, summary.exit_code) == (2, 1, 1)  # the item fails, not the run
    assert host.count(URL) == 1
    for request in host.requests:
        assert "authorization" not in request.headers and "x-goog-api-key" not in request.headers
    assert all(r.headers["authorization"] == "Bearer secret-key" for r in api.requests)
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert records["c"]["error"]["kind"] == "input" and missing in records["c"]["error"]["message"]
    sent = json.loads(api.requests[0].content)["contents"][0]["parts"][1]["inlineData"]
    assert sent["mimeType"] == "image/jpeg"


def test_a_url_with_an_upper_case_scheme_is_downloaded_too(tmp_path: Path) -> None:
    shouted = URL.replace("https://", "HTTPS://")
    host = Host({URL: [JPEG]})
    api = FakeGemini()
    job = write_job(tmp_path, [{"id": "a", "image": shouted}])
    summary = run_virtual(lambda: nanobatch.run_job(job, transport=routed(api, host), out_dir=tmp_path / "out"))
    assert summary.stats.ok == 1 and host.count(URL) == 1


def big_jpeg(path: Path) -> Path:
    with path.open("wb") as f:
        f.write(JPEG[:16])
        f.truncate(8 * MB)
    return path


def test_a_local_picture_too_big_to_send_is_a_manifest_problem(tmp_path: Path) -> None:
    with (tmp_path / "huge.jpg").open("wb") as f:  # over both limits: still one problem, about the picture
        f.write(JPEG[:16])
        f.truncate(15 * MB)
    (tmp_path / "ok.png").write_bytes(PNG)
    job = write_job(tmp_path, [{"id": "big", "image": "huge.jpg"}, {"id": "fine", "image": "ok.png"}])
    fake = FakeGemini()
    with pytest.raises(ManifestError) as err:
        run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out"))
    (problem,) = err.value.problems
    assert (problem.item, problem.field) == ("big", "image") and "15.0 MB" in problem.message
    assert "resize_inputs" in problem.message and fake.requests == []
    # With resize_inputs it is fine: it will be downscaled.
    job = write_job(tmp_path, [{"id": "big", "image": "huge.jpg", "resize_inputs": True}])
    assert nanobatch.check_job(job, check_pictures=False).items == 1  # its bytes are a stand-in, not a picture


def test_pictures_too_big_together_are_a_manifest_problem(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        with (tmp_path / name).open("wb") as f:
            f.write(JPEG[:16])
            f.truncate(6 * MB)
    job = write_job(tmp_path, [{"id": "trio", "images": ["a.jpg", "b.jpg", "c.jpg"]}])
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job, check_pictures=False)  # their bytes are stand-ins, not pictures
    (problem,) = err.value.problems
    assert (problem.item, problem.field) == ("trio", "images") and "18.0 MB together" in problem.message


def test_a_picture_that_grew_too_big_after_the_check_fails_when_loaded(tmp_path: Path) -> None:
    huge = big_jpeg(tmp_path / "huge.jpg")
    with pytest.raises(InputError, match="8.0 MB, but an input image can be at most 7 MB"):
        anyio.run(lambda: load_inputs([str(huge)]))


def test_a_first_run_reads_each_local_picture_once_and_sends_the_bytes_it_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    import nanobatch.inputs.load
    import nanobatch.inputs.stamps

    pictures = {name: noise((8 + n, 8)) for n, name in enumerate(("a.png", "b.png", "c.png"))}
    for name, data in pictures.items():
        (tmp_path / name).write_bytes(data)
    job = write_job(tmp_path, [{"id": "one", "image": "a.png"}, {"id": "two", "images": ["b.png", "c.png"]}])
    opened: list[str] = []
    real_open, real_read_bytes = builtins.open, Path.read_bytes

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    def spy_read_bytes(self: Path) -> bytes:
        opened.append(self.name)
        return real_read_bytes(self)

    for module in (nanobatch.inputs.load, nanobatch.inputs.stamps):  # where pictures are read, and hashed
        monkeypatch.setattr(module, "open", spy_open, raising=False)
    monkeypatch.setattr(Path, "read_bytes", spy_read_bytes)
    api = FakeGemini()
    summary = run_virtual(lambda: nanobatch.run_job(job, transport=api.transport, out_dir=tmp_path / "out"))
    assert summary.stats.ok == 2
    assert sorted(name for name in opened if name in pictures) == ["a.png", "b.png", "c.png"]
    sent = [
        [base64.b64decode(part["inlineData"]["data"]) for part in json.loads(r.content)["contents"][0]["parts"][1:]]
        for r in api.requests
    ]
    assert sorted(sent) == sorted([[pictures["a.png"]], [pictures["b.png"], pictures["c.png"]]])


@pytest.mark.parametrize("over", [0, 1], ids=["inline-limit", "one-byte-over"])
def test_an_input_gets_the_same_stamp_and_bytes_whether_it_is_read_inline_or_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over: int
) -> None:
    """A small input is read and hashed on the event loop (a thread hand-off costs more than it does), a bigger
    one in a thread: either way its work key (size, time, sha256) and the bytes sent are those of the file."""
    import hashlib

    import nanobatch.inputs.stamps as stamps

    data = os.urandom(stamps.INLINE_BYTES + over)
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    handed: list[object] = []
    real = anyio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        handed.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    contents: dict[str, bytes] = {}
    found = anyio.run(lambda: stamps.local_stamps([str(path)], {}, contents=contents))
    st = path.stat()
    assert found == {str(path): (len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())}
    assert contents == {str(path): data}
    assert len(handed) == over  # inline up to the limit, one hand-off past it


def test_an_item_fails_on_its_first_unloadable_input_in_order(tmp_path: Path) -> None:
    missing = "https://cdn.example.com/gone.jpg"
    host = Host({missing: [httpx2.Response(404)]})
    (tmp_path / "notes.png").write_bytes(b"GIF89a....")
    with pytest.raises(InputError, match="HTTP 404"):
        load(host, [missing, str(tmp_path / "notes.png")])
    host.requests.clear()
    with pytest.raises(InputError, match="it is image/gif"):
        load(host, [str(tmp_path / "notes.png"), missing])
    assert host.requests == []  # the URL after the failed file is not fetched


# --- validate checks URLs ----------------------------------------------------------------------------------------


def test_validate_checks_each_url_once_by_its_headers(tmp_path: Path) -> None:
    body = Body([JPEG])
    host = Host(
        {
            URL: [httpx2.Response(200, stream=body)],
            "https://cdn.example.com/gone.png": [httpx2.Response(404)],
            "https://cdn.example.com/down.png": [httpx2.ConnectError("refused")],
        }
    )
    job = write_job(
        tmp_path,
        [
            {"id": "a", "image": URL},
            {"id": "b", "images": [URL, "https://cdn.example.com/gone.png"]},
            {"id": "c", "image": "https://cdn.example.com/down.png"},
        ],
    )
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job, transport=httpx2.MockTransport(host))
    found = [(p.item, p.field) for p in err.value.problems]
    assert found == [("b", "images[1]"), ("c", "image")]
    assert "HTTP 404" in err.value.problems[0].message and "ConnectError" in err.value.problems[1].message
    assert host.count(URL) == 1 and body.read == 0  # headers only
    host.requests.clear()
    assert nanobatch.check_job(job, transport=httpx2.MockTransport(host), check_urls=False).items == 3
    assert host.requests == []


def test_validate_names_each_url_that_cannot_be_fetched_as_its_items_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # the host name is looked up here, not by a proxy
    long_name = "https://" + "a" * 64 + ".example/a.png"  # a part of a host name is 63 characters at most
    job = write_job(tmp_path, [{"id": "a", "image": "http://[::1/a.png"}, {"id": "b", "images": ["b.png", long_name]}])
    with pytest.raises(ManifestError) as err:  # the real transport: neither URL gets as far as a request
        nanobatch.check_job(job)
    found = {(p.item, p.field): p.message for p in err.value.problems}
    assert list(found) == [("a", "image"), ("b", "images[1]")]
    assert "http://[::1/a.png is not a URL that can be fetched: Invalid port" in found["a", "image"]
    assert f"{long_name} is not a URL that can be fetched" in found["b", "images[1]"]


def test_too_many_urls_are_not_checked_at_validation(caplog: pytest.LogCaptureFixture) -> None:
    checklist = UrlChecklist(limit=2)
    for n in range(3):
        checklist.add(WorkItem(id=f"i{n}", model="m", inputs=(f"https://cdn.example.com/{n}.png",), steps=("x",)))
    host = Host({})
    with caplog.at_level(logging.WARNING, logger="nanobatch"):
        assert checklist.problems("job.yaml", transport=httpx2.MockTransport(host)) == []
    assert host.requests == [] and "more than 2 distinct image URLs" in caplog.text


# --- pictures that cannot be decoded -----------------------------------------------------------------------------

DAMAGED = {
    "cut.jpg": JPEG[: len(JPEG) * 2 // 3],  # a truncated download
    "garbage.png": PNG[:33] + bytes(range(256)) * 4,  # a PNG header, then garbage
    "short.webp": image_bytes(fmt="WEBP")[:-20],
}


def test_validate_finds_pictures_that_cannot_be_decoded(tmp_path: Path) -> None:
    for name, data in DAMAGED.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "ok.jpg").write_bytes(JPEG)
    items = [{"id": name.split(".")[0], "image": name} for name in [*DAMAGED, "ok.jpg"]]
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(write_job(tmp_path, items))
    found = {(p.item, p.field) for p in err.value.problems if "cannot be decoded" in p.message}
    assert found == {("cut", "image"), ("garbage", "image"), ("short", "image")}
    assert len(err.value.problems) == 3


def test_a_run_never_sends_a_picture_that_cannot_be_decoded(tmp_path: Path) -> None:
    (tmp_path / "cut.jpg").write_bytes(DAMAGED["cut.jpg"])
    (tmp_path / "ok.jpg").write_bytes(JPEG)
    job = write_job(tmp_path, [{"id": "cut", "image": "cut.jpg"}, {"id": "ok", "image": "ok.jpg"}])
    fake = FakeGemini()
    summary = run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out"))
    assert summary.exit_code == 1 and len(fake.requests) == 1
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    (cut,) = [r for r in records if r["id"] == "cut"]
    assert cut["status"] == "failed" and cut["error"]["kind"] == "input" and cut["attempts"] == 0
    assert "cannot be decoded" in cut["error"]["message"]


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def test_a_picture_damaged_inside_is_refused_as_pillow_refuses_it() -> None:
    """Inputs are checked without Pillow (headers, every PNG chunk's CRC, the JPEG's tables): each byte of a
    small PNG flipped in turn is refused exactly when Pillow's open and verify refuse it, and so is a JPEG whose
    quantization table or frame header Pillow cannot read."""
    good = image_bytes(size=(40, 30))
    assert picture_problem(good) is None
    for at in range(8, len(good)):
        try:
            with Pillow.open(io.BytesIO(bad := _flipped(good, at))) as picture:
                picture.verify()
            pillow_ok = True
        except Exception:
            pillow_ok = False
        assert (picture_problem(bad) is None) == pillow_ok, at
    jpeg = image_bytes(size=(40, 30), fmt="JPEG")
    dqt, sof = jpeg.index(b"\xff\xdb") + 4, jpeg.index(b"\xff\xc0") + 4  # a table's size byte, the sample bits
    assert picture_problem(jpeg) is None
    for at in (dqt, sof):
        assert "cannot be decoded" in (picture_problem(_flipped(jpeg, at)) or "")


def test_a_file_whose_headers_run_past_its_first_read_is_judged_as_one_whose_headers_do_not(tmp_path: Path) -> None:
    """A catalog photo's headers can be large (a camera's EXIF, a colour profile of 100 KB or more): a file is
    judged alike whether its headers end within the first bytes read or far after them, and a damaged header or
    a cut end is found either way."""
    import struct
    import zlib

    png, jpeg = image_bytes(size=(40, 30)), image_bytes(size=(40, 30), fmt="JPEG")
    text = b"Comment\x00" + os.urandom(150_000).hex().encode()[:150_000]
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    at = png.index(b"IDAT") - 4
    big_png = png[:at] + chunk + png[at:]
    app = b"\xff\xe1" + struct.pack(">H", 65_000) + bytes(64_998)  # APP1 segments of the largest size, twice
    big_jpeg = jpeg[:2] + app + app + jpeg[2:]
    cases = {
        "big.png": (big_png, True),
        "big.jpg": (big_jpeg, True),
        "big-crc.png": (big_png[: at + 100_000] + b"!" + big_png[at + 100_001 :], False),  # its tEXt's CRC fails
        "big-cut.jpg": (big_jpeg[: len(big_jpeg) - 200], False),
        "big-cut.png": (big_png[: len(big_png) - 30], False),
        "small.png": (png, True),
    }
    for name, (data, good) in cases.items():
        (tmp_path / name).write_bytes(data)
        if good:
            with Pillow.open(io.BytesIO(data)) as picture:
                assert picture.size == (40, 30)  # Pillow opens it, headers and all
        assert (file_problem(str(tmp_path / name)) is None) == good, name
        assert (picture_problem(data) is None) == good, name


def _catalog(tmp_path: Path, extra: list[dict[str, Any]] | None = None) -> Path:
    """The damaged pictures, a picture of a type Gemini does not take, and two good ones, an item each."""
    for name, data in {**DAMAGED, "anim.png": image_bytes(fmt="GIF"), "ok.jpg": JPEG, "ok2.png": PNG}.items():
        (tmp_path / name).write_bytes(data)
    items = [{"id": name.split(".")[0], "image": name} for name in [*DAMAGED, "anim.png", "ok.jpg", "ok2.png"]]
    return write_job(tmp_path, items + (extra or []))


BAD = ["cut", "garbage", "short", "anim"]


def test_validate_says_a_run_would_not_stop_for_pictures_that_cannot_be_decoded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(_catalog(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert all(f"item {name!r}" in err for name in BAD)
    assert "hint: 4 items' input pictures cannot be decoded. A run would not stop for them" in err
    assert "--skip-bad-inputs" in err


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_skip_bad_inputs_leaves_those_items_out_and_lists_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    assert main([*command, str(_catalog(tmp_path)), "--skip-bad-inputs"]) == 0
    out = capsys.readouterr().out
    assert "items:     6" in out and "requests:  2 (steps counted)" in out  # only the good ones are priced
    listed = out[out.index("left out 4 items whose input pictures cannot be decoded") :].splitlines()[1:5]
    assert [line.split("'")[1] for line in listed] == BAD
    assert not (tmp_path / "out").exists()


def test_skip_bad_inputs_still_refuses_what_is_wrong_with_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An item with a damaged picture and a setting its model does not take, and a picture that is missing.
    extra = [{"id": "wide", "image": "cut.jpg", "aspect_ratio": "7:3"}, {"id": "gone", "image": "gone.jpg"}]
    job = _catalog(tmp_path, extra)
    (tmp_path / "gone.jpg").unlink()
    assert main(["validate", str(job), "--skip-bad-inputs"]) == 2
    err = capsys.readouterr().err
    assert "item 'wide', field 'aspect_ratio'" in err and "item 'gone', field 'image'" in err
    assert "item 'cut'" not in err and "hint:" not in err


def test_a_run_with_skip_bad_inputs_lists_them_first_and_records_them_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job, fake = _catalog(tmp_path), FakeGemini()
    with caplog.at_level(logging.WARNING, logger="nanobatch"):
        summary = run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out",
                                                        skip_bad_inputs=True))  # fmt: skip
    first = caplog.records[0].getMessage()
    assert first.startswith("left out 4 items whose input pictures cannot be decoded")
    assert all(f"item {name!r}" in first for name in BAD)
    assert summary.exit_code == 1 and len(fake.requests) == 2
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert {i for i, r in records.items() if r["status"] == "ok"} == {"ok", "ok2"}
    for record in (records[name] for name in BAD):
        assert (record["status"], record["error"]["kind"], record["attempts"]) == ("failed", "input", 0)
        assert any(reason in record["error"]["message"] for reason in ("cannot be decoded", "is not a PNG"))


@pytest.mark.parametrize(
    ("data", "said"),
    [(image_bytes(fmt="GIF"), "(it is image/gif)"), (b"hello", "(not a picture by its first bytes)"), (b"", "")],
    ids=["gif", "text", "empty"],
)
def test_validate_refuses_a_picture_the_run_would_refuse_for_its_type(tmp_path: Path, data: bytes, said: str) -> None:
    (tmp_path / "photo.png").write_bytes(data)
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(write_job(tmp_path, [{"id": "a", "image": "photo.png"}]))
    (problem,) = err.value.problems
    assert (problem.item, problem.field) == ("a", "image")
    assert "is not a PNG, JPEG, WEBP or HEIC/HEIF image" in problem.message and said in problem.message


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "reference-folder"])
def test_an_image_that_is_not_a_regular_file_is_named_so(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "photo.jpg"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target.symlink_to("/dev/null")
    else:
        target.mkdir()
    item = {"id": "a", "image": "photo.jpg"} if kind != "reference-folder" else {"id": "a", "images": ["photo.jpg"]}
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(write_job(tmp_path, [item]))
    (problem,) = err.value.problems
    assert "not a regular file" in problem.message and "not found" not in problem.message
