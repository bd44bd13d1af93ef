"""Worker processes (``limits.workers``): big answers decoded in another process, and the output folder's
guarantees kept when a run is killed with answers inside them."""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from PIL import Image as PILImage

import nanobatch.api.decoding as decoding
import nanobatch.output.verdicts as verdicts
from nanobatch.api.batch_api import BatchClient
from nanobatch.api.client import GeminiClient
from nanobatch.api.decoding import WORKERS_FROM_BYTES, Decoder
from nanobatch.api.gemini import Image, build_request
from nanobatch.config import load_settings
from nanobatch.errors import ApiError
from nanobatch.output.verdicts import Checker
from nanobatch.qa import QaSettings, Verdict
from nanobatch.simulator import SimulatorConfig, run_in_thread

from .fakes import write_job


def noise_png(edge: int) -> bytes:
    """A PNG of noise: it does not compress, so *edge* x *edge* pixels take about 3 x edge^2 bytes."""
    buffer = io.BytesIO()
    PILImage.frombytes("RGB", (edge, edge), random.Random(edge).randbytes(edge * edge * 3)).save(buffer, "PNG")
    return buffer.getvalue()


PICTURE = noise_png(640)  # 1.2 MB, 1.6 MB in base64: past WORKERS_FROM_BYTES
SMALL = noise_png(16)


def answer(picture: bytes) -> bytes:
    part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(picture).decode()}}
    return orjson.dumps({"candidates": [{"content": {"parts": [part]}, "finishReason": "STOP"}]})


@pytest.fixture
def broken_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process cannot decode answers: whatever decodes one correctly is another process."""

    def refuse(body: Any) -> Any:
        raise AssertionError("decoded in the run's own process")

    monkeypatch.setattr(decoding, "parse_reply", refuse)
    monkeypatch.setattr(decoding, "reply_from", refuse)


def test_a_big_answer_is_decoded_in_a_worker_process(broken_here: None) -> None:
    body = answer(PICTURE)
    assert len(body) >= WORKERS_FROM_BYTES

    async def main() -> Any:
        return await Decoder(1).reply(bytearray(body))

    reply = anyio.run(main)
    assert reply.images[0].data == PICTURE and reply.images[0].mime_type == "image/png"


def test_a_worker_writes_the_image_into_a_temporary_file_the_run_owns(tmp_path: Path, broken_here: None) -> None:
    """The image's bytes never come back to the run's process: the worker writes them into a file of nanobatch's
    own name in the spool folder (the output folder in a run), which is deleted if nobody takes it."""

    spool = tmp_path / "spool"
    spool.mkdir()

    async def main() -> Any:
        return await Decoder(1, str(spool)).reply(bytearray(answer(PICTURE)))

    reply = anyio.run(main)
    (image,) = reply.images
    assert image.content == b"" and image.spooled is not None and image.size == len(PICTURE)
    (spooled,) = spool.iterdir()
    assert spooled.name.startswith(".nanobatch-") and spooled.name.endswith(".tmp")
    assert spooled.read_bytes() == PICTURE == image.data
    del reply, image
    gc.collect()
    assert not list(spool.iterdir())  # let go of, never renamed into place: deleted


def test_two_decoders_of_one_run_never_share_or_delete_each_others_images(tmp_path: Path) -> None:
    """A run decodes online answers and batch results with two decoders spooling into the same output folder:
    each answer's files have a name of their own, and a file already there under the next name (a killed run's
    of the same pid) is left alone: the answer is decoded here instead, nothing paid for is lost."""
    from nanobatch.api import spool as spool_module

    spool = tmp_path / "out"
    spool.mkdir()
    upcoming = spool_module.spool_name(str(spool))  # the name the next answers would take
    number = int(upcoming.rsplit("-", 1)[1])
    there = f"{upcoming.rsplit('-', 1)[0]}-{number + 2}-0.tmp"
    Path(there).write_bytes(b"not this run's")

    async def main() -> list[Any]:
        online, batch = Decoder(1, str(spool)), Decoder(1, str(spool))
        return [await decoder.reply(bytearray(answer(PICTURE))) for decoder in (online, batch, online, batch)]

    replies = anyio.run(main)
    images = [reply.images[0] for reply in replies]
    assert all(image.data == PICTURE for image in images)  # every paid answer still whole
    paths = [image.spooled.path for image in images if image.spooled is not None]
    assert len(paths) == len(set(paths)) == 3  # three in files of their own; the one whose name was taken, here
    assert Path(there).read_bytes() == b"not this run's"


def test_an_image_a_worker_cannot_write_is_decoded_in_place(tmp_path: Path) -> None:
    """A spool folder the worker cannot write into (a full disk, say): the answer, paid for, is decoded here,
    and the writer meets the error itself (a full disk stops the run, as without workers)."""

    async def main() -> Any:
        return await Decoder(1, str(tmp_path / "gone")).reply(bytearray(answer(PICTURE)))

    (image,) = anyio.run(main).images
    assert image.spooled is None and image.data == PICTURE


def test_a_small_answer_is_decoded_in_place(broken_here: None) -> None:
    """A trip to a worker and back costs more than a small answer's decoding."""

    async def main() -> Any:
        return await Decoder(1).reply(bytearray(answer(SMALL)))

    with pytest.raises(AssertionError, match="own process"):
        anyio.run(main)


def test_a_body_a_worker_cannot_parse_is_a_retryable_bad_response() -> None:
    body = answer(PICTURE)[:-100]  # cut short

    async def main() -> Any:
        return await Decoder(1).reply(bytearray(body))

    with pytest.raises(ApiError) as caught:
        anyio.run(main)
    assert caught.value.kind == "bad_response" and caught.value.retryable and caught.value.status_code == 200


def test_the_client_decodes_through_its_workers(broken_here: None) -> None:
    body = answer(PICTURE)

    async def main() -> Any:
        transport = httpx2.MockTransport(lambda request: httpx2.Response(200, content=body))
        async with GeminiClient(base_url="https://api.example.test", api_key="k", transport=transport,
                                workers=1) as api:  # fmt: skip
            reply = await api.generate("m", build_request("x"), timeout_s=60)
            assert api.answers.held == 0
            return reply

    assert anyio.run(main).images[0].data == PICTURE


def test_a_big_batch_results_line_is_decoded_in_a_worker_and_keeps_its_key(broken_here: None) -> None:
    part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PICTURE).decode()}}
    response = {"candidates": [{"content": {"parts": [part]}, "finishReason": "STOP"}]}
    line = orjson.dumps({"key": "sku-7", "response": response})
    cut = orjson.dumps({"key": "sku-8", "response": {"candidates": [{"content": {"parts": [
        {"inlineData": {"mimeType": "image/png", "data": "not base64!" * 200_000}}]}}]}})  # fmt: skip

    async def main() -> list[Any]:
        async with BatchClient(base_url="https://api.example.test", api_key="k", workers=1) as api:
            return [await api.decode_line(line), await api.decode_line(cut)]

    good, bad = anyio.run(main)
    assert good.key == "sku-7" and good.reply.images[0].data == PICTURE
    assert bad.key == "sku-8" and bad.error.kind == "bad_response" and bad.error.retryable


def test_the_run_s_process_holds_no_copy_of_a_body_a_worker_decodes() -> None:
    """The body goes from the socket straight into shared memory: this process's own allocations while reading
    and decoding an answer stay below the body's size (the image copied out of the worker's block, 3/4 of it,
    and the pieces read); reading it into a buffer of its own first took the whole body more."""
    body = answer(PICTURE)

    async def main() -> tuple[Any, int]:
        transport = httpx2.MockTransport(lambda request: httpx2.Response(200, content=body))
        async with GeminiClient(base_url="https://api.example.test", api_key="k", transport=transport,
                                workers=1) as api:  # fmt: skip
            await api.generate("m", build_request("x"), timeout_s=60)  # the worker started, the blocks made
            tracemalloc.start()
            try:
                reply = await api.generate("m", build_request("x"), timeout_s=60)
                return reply, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    reply, peak = anyio.run(main)
    assert reply.images[0].data == PICTURE
    assert peak < 0.9 * len(body)


def test_answers_one_after_another_reuse_the_same_shared_memory() -> None:
    """A new block of shared memory costs this process more than the copy into it (its pages zeroed on first
    touch, freed when unlinked): the blocks are kept for the next answers, and let go when the client closes."""

    async def main() -> tuple[int, list[str]]:
        decoder = Decoder(1)
        for _ in range(3):
            assert (await decoder.reply(bytearray(answer(PICTURE)))).images[0].data == PICTURE
        names = [block.name for block in decoder.blocks._free]
        decoder.close()
        return decoder.blocks.made, names

    made, names = anyio.run(main)
    assert made == 1  # the body's, once (the images go into files)
    for name in names:  # unlinked once closed: nothing left behind in /dev/shm
        with pytest.raises(FileNotFoundError):
            decoding.attach(name)


def test_with_workers_the_output_checks_run_in_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks decode the image (the most CPU an item with ``qa:`` costs after its answer): with workers,
    not in the run's process; without, in a thread of it (the same verdict)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("checked in the run's own process")

    monkeypatch.setattr(verdicts, "check_images", refuse)
    settings = QaSettings(min_side=600, changed=True)

    async def main(workers: int) -> Verdict:
        images = [Image("image/png", PICTURE)]
        return await Checker(workers).check(images, original=SMALL, aspect_ratio="1:1", settings=settings)

    verdict = anyio.run(main, 1)
    assert verdict.passed and verdict.values["min_side"] == 640
    with pytest.raises(AssertionError, match="own process"):
        anyio.run(main, 0)


def test_checks_one_after_another_in_a_worker_reuse_the_same_shared_memory() -> None:
    """Each check in a worker copies the image and the input into shared memory; a new block's pages cost the
    run's process more than the copy (half of what a 2K JPEG check cost it): one block serves every check, and
    it is let go when the run ends."""
    settings = QaSettings(min_side=600, changed=True)

    async def main() -> tuple[list[Verdict], int, list[str]]:
        checker = Checker(1)
        images = [Image("image/png", PICTURE)]
        found = [await checker.check(images, original=SMALL, aspect_ratio="1:1", settings=settings) for _ in range(3)]
        names = [block.name for block in checker.blocks._free]
        checker.close()
        return found, checker.blocks.made, names

    found, made, names = anyio.run(main)
    assert [(v.passed, v.values["min_side"]) for v in found] == [(True, 640)] * 3
    assert made == 1
    for name in names:  # unlinked once closed: nothing left behind in /dev/shm
        with pytest.raises(FileNotFoundError):
            decoding.attach(name)


def test_a_run_that_checks_in_workers_leaves_no_shared_memory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocks kept for the next checks are the run's: let go when it ends, not left in /dev/shm."""
    import nanobatch

    from .fakes import FakeGemini, inline, ok_body

    made: list[str] = []

    class Named(decoding.SharedMemory):  # type: ignore[misc]  # the run's blocks, by name (not other processes')
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if kwargs.get("create"):
                made.append(self.name)

    monkeypatch.setattr(decoding, "SharedMemory", Named)
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png"} for n in range(3)], qa={"changed": True})
    settings = load_settings(overrides={"limits.workers": 1})
    fake = FakeGemini({"make the background white": [ok_body(inline(PICTURE))]})
    out = tmp_path / "out"
    summary = anyio.run(lambda: nanobatch.run_job(job, settings=settings, transport=fake.transport, out_dir=out))
    assert summary.stats.ok == 3 and made  # the checks went through shared memory
    for name in made:
        with pytest.raises(FileNotFoundError):
            decoding.attach(name)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions handed to worker processes, in order (they still run there)."""
    names: list[str] = []
    real = decoding.anyio.to_process.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        names.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(decoding.anyio.to_process, "run_sync", counting)
    return names


def test_by_default_one_worker_per_cpu_starts_once_the_run_has_read_enough_big_answers(
    monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    """A worker costs ~0.2 s of CPU to start: a run of a few big answers (or of small ones only) decodes them in
    its own process and starts none; past WORKERS_AFTER_BYTES of big answers the rest go to workers, and so do
    the output checks. A number asks for workers from the first big answer; 0 for none."""
    assert load_settings(env={}).limits.workers is None
    assert load_settings(env={"NANOBATCH_LIMITS_WORKERS": "2"}).limits.workers == 2
    big = answer(PICTURE)
    monkeypatch.setattr(decoding, "WORKERS_AFTER_BYTES", 3 * len(big))
    monkeypatch.setattr(verdicts, "CHECK_BYTES", 0)  # (what the checks weigh themselves: the next test)
    images = [Image("image/png", PICTURE)]
    settings = QaSettings(min_side=600, min_fill=0.0)

    async def main() -> None:
        decoder, checker = Decoder(None), Checker(None)
        for _ in range(100):
            assert (await decoder.reply(bytearray(answer(SMALL)))).images[0].data == SMALL
        for _ in range(3):
            assert (await decoder.reply(bytearray(big))).images[0].data == PICTURE
        assert (await checker.check(images, original=None, aspect_ratio=None, settings=settings)).passed
        assert sent == []  # a small run: no worker started
        for _ in range(2):
            assert (await decoder.reply(bytearray(big))).images[0].data == PICTURE
        assert (await checker.check(images, original=None, aspect_ratio=None, settings=settings)).passed
        decoder.close()

    anyio.run(main)
    assert sent == ["decode_in_worker", "decode_in_worker", "check_in_worker"]


def test_answers_read_by_the_client_count_once_toward_starting_the_workers(
    monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    """The same, as a run meets it: answers of a known length are asked about once, before they are read; the
    workers start only once the big answers read add up to WORKERS_AFTER_BYTES, not half of it."""
    big = answer(PICTURE)
    monkeypatch.setattr(decoding, "WORKERS_AFTER_BYTES", 3 * len(big))
    transport = httpx2.MockTransport(lambda request: httpx2.Response(200, content=big))

    async def main() -> None:
        async with GeminiClient(base_url="https://example.invalid", api_key=None, transport=transport,
                                workers=None) as client:  # fmt: skip
            for _ in range(5):
                reply = await client.generate("m", {"contents": []}, timeout_s=30)
                assert reply.images[0].data == PICTURE

    anyio.run(main)
    assert sent == ["decode_in_worker", "decode_in_worker"]  # three read here, then past the line


def test_a_night_of_checked_small_answers_starts_the_workers_and_header_checks_never_need_them(
    monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    """A 2K JPEG answer is too small to go to a worker, but checking its pixels costs ~10 ms of CPU: by default
    the first checks run in a thread, and once they add up to the workers' start-up the rest run in workers.
    ``min_side`` and ``aspect`` read the header only: a trip to a worker would cost more than they do."""
    monkeypatch.setattr(decoding, "WORKERS_AFTER_BYTES", 4 * verdicts.CHECK_BYTES)
    images = [Image("image/png", SMALL)]
    pixels, header = QaSettings(background="any", min_fill=0.0), QaSettings(min_side=8, aspect=True)

    async def main(workers: int | None, settings: QaSettings, times: int) -> None:
        checker = Checker(workers)
        for _ in range(times):
            assert (await checker.check(images, original=None, aspect_ratio="1:1", settings=settings)).passed

    anyio.run(main, None, pixels, 4)
    assert sent == []  # a few checks: no worker started for them
    anyio.run(main, None, pixels, 7)
    assert sent == ["check_in_worker"] * 3  # from the fifth on: past the start-up's worth (each anyio.run a new run)
    sent.clear()
    anyio.run(main, 2, header, 5)
    assert sent == []  # workers asked for, but a header is read in place
    compare_only = QaSettings(min_side=8, changed=True, same_subject=True)
    anyio.run(main, 2, compare_only, 3)
    assert sent == []  # nothing to compare with (a text-to-image item): the header is all there is to read


def test_workers_that_cannot_start_leave_the_decoding_to_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise anyio.BrokenWorkerProcess("Error during worker process initialization")

    monkeypatch.setattr(decoding.anyio.to_process, "run_sync", broken)

    async def main() -> list[Any]:
        decoder = Decoder(2)
        return [await decoder.reply(bytearray(answer(PICTURE))) for _ in range(2)]

    replies = anyio.run(main)
    assert [reply.images[0].data for reply in replies] == [PICTURE, PICTURE]
    assert caplog.text.count("worker processes failed") == 1


# -- a SIGKILL with answers inside the workers --------------------------------------------------------------

ITEMS = 24
SPOOLED = ".nanobatch-*-*-*.tmp"  # a worker's temporary file: .nanobatch-<run's pid>-<answer>-<image>.tmp


@pytest.fixture(scope="module")
def big_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    canned = tmp_path_factory.mktemp("canned") / "answer.png"
    canned.write_bytes(PICTURE)
    config = SimulatorConfig(latency="uniform", latency_s=0.2, latency_spread=0.1, seed=3, canned=str(canned))
    with run_in_thread(config) as url:
        yield url


def start_run(job: Path, out: Path, api: str, marker: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NANOBATCH_API_KEY": marker}
    command = [sys.executable, "-m", "nanobatch", "run", str(job), "--base-url", api, "--out", str(out),
               "--concurrency", "6", "--workers", "2", "--quiet"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def processes_with(marker: str) -> list[int]:
    """Processes whose environment holds *marker* (the run's and its workers')."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"NANOBATCH_API_KEY={marker}".encode() in environ.split(b"\0"):
            found.append(int(pid))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_with_answers_in_workers_then_rerun_ends_with_every_item_ok_exactly_once(
    tmp_path: Path, big_api: str
) -> None:
    items = [{"id": f"sku-{n:03d}", "image": f"images/p{n % 3}.png"} for n in range(ITEMS)]
    job = write_job(tmp_path, items, qa={"min_side": 600, "changed": True})  # checked in the workers too
    out = tmp_path / "out"
    marker = f"sim-key-{os.getpid()}-{time.monotonic_ns()}"
    # Killed once a worker has written an answer's image into its temporary file (the writer not done with it),
    # then mid-run.
    strays: list[str] = []
    for results_before_kill in (0, 6):
        before = len(lines(out / "results.jsonl"))
        proc = start_run(job, out, big_api, marker)
        deadline = time.monotonic() + 60
        while proc.poll() is None and (
            len(lines(out / "results.jsonl")) < before + results_before_kill
            or (not results_before_kill and not list(out.glob(SPOOLED)))
        ):
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.002)
        workers = [pid for pid in processes_with(marker) if pid != proc.pid]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert workers  # the answers in flight were being decoded in worker processes
        deadline = time.monotonic() + 30  # workers die with the run
        while processes_with(marker):
            assert time.monotonic() < deadline, "worker processes outlived the run"
            time.sleep(0.05)
        strays += [p.name for p in out.glob(SPOOLED)]  # images the workers wrote, not yet in place

    proc = start_run(job, out, big_api, marker)
    assert proc.wait(timeout=120) == 0
    records = [json.loads(line) for line in lines(out / "results.jsonl")]  # every line parses: no torn record
    ok = Counter(r["id"] for r in records if r["status"] == "ok")
    assert all(r["qa"]["passed"] for r in records if r["status"] == "ok")
    assert sorted(ok) == [f"sku-{n:03d}" for n in range(ITEMS)] and set(ok.values()) == {1}
    for name in ok:
        assert (out / f"{name}.png").read_bytes() == PICTURE  # whole images, each written once
    assert strays  # the kills left images in workers' temporary files
    # The killed runs' temporary files were removed, none was taken for an output, and nothing else is there.
    assert sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(("results", "journal",
                  "summary", ".nanobatch")))  == sorted(f"{name}.png" for name in ok)  # fmt: skip
    assert not list(out.glob(".*.tmp"))


def test_dropping_a_dead_workers_files_ends_when_their_folder_cannot_be_written(tmp_path: Path) -> None:
    """Not only when the next file is not there: a spool whose folder became a file (or lost its permissions)
    must not keep the run's process in a loop on an error path."""
    import threading

    from nanobatch.api.spool import drop_spooled

    (tmp_path / "afile").write_bytes(b"")
    dropping = threading.Thread(target=drop_spooled, args=(str(tmp_path / "afile" / ".nanobatch-1-0"),), daemon=True)
    dropping.start()
    dropping.join(timeout=30)
    assert not dropping.is_alive()
