"""Fake Gemini answers for httpx2.MockTransport: bodies, errors, and a scripted server."""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from PIL import Image as PILImage

import nanobatch
from nanobatch.errors import ManifestError, Problem
from nanobatch.job.manifest import Manifest, load_manifest

from .conftest import run_virtual

USAGE = {"promptTokenCount": 1312, "candidatesTokenCount": 1120, "totalTokenCount": 2432}


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG", size: tuple[int, int] = (16, 16)
) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


@functools.cache
def noise_bytes(size: tuple[int, int] = (64, 64), fmt: str = "PNG", *, seed: int = 0) -> bytes:
    """A real picture of random pixels (it compresses badly: about 3 bytes a pixel as PNG), made once per size."""
    import random

    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    buf = io.BytesIO()
    PILImage.frombytes("RGB", size, pixels).save(buf, fmt)
    return buf.getvalue()


def inline(data: bytes, mime: str = "image/png", **extra: Any) -> dict[str, Any]:
    """An image part of a reply or request; *extra*: other keys of the part (``thought=True``, ...)."""
    return {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}, **extra}


def ok_body(
    *parts: dict[str, Any], finish: str = "STOP", usage: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    if not parts:
        parts = (inline(image_bytes()),)
    return {
        "candidates": [{"content": {"role": "model", "parts": list(parts)}, "finishReason": finish}],
        "usageMetadata": usage or USAGE,
        "modelVersion": "gemini-3.1-flash-image-11-2026",
        "responseId": "resp-1",
        **extra,
    }


def google_error(code: int, status: str, message: str, *details: dict[str, Any]) -> httpx2.Response:
    return httpx2.Response(
        code, json={"error": {"code": code, "message": message, "status": status, "details": list(details)}}
    )


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def quota_failure(quota_id: str, metric: str | None = None) -> dict[str, Any]:
    violation = {"quotaId": quota_id} if metric is None else {"quotaId": quota_id, "quotaMetric": metric}
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]}


Answer = httpx2.Response | dict[str, Any] | Callable[[httpx2.Request], httpx2.Response]


class FakeGemini:
    """A scripted server: answers by the request's instruction text, in order, the last one repeating.

    Instructions not in the script get a plain success. Every request is kept in ``requests``.
    """

    def __init__(self, script: dict[str, list[Answer]] | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.requests: list[httpx2.Request] = []

    @property
    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self)

    def instructions(self) -> list[str]:
        return [json.loads(r.content)["contents"][0]["parts"][0]["text"] for r in self.requests]

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        text = json.loads(request.content)["contents"][0]["parts"][0]["text"]
        answers = self.script.get(text)
        answer: Answer = ok_body()
        if answers:
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if callable(answer):
            return answer(request)
        if isinstance(answer, httpx2.Response):
            return httpx2.Response(answer.status_code, headers=answer.headers, content=answer.content)
        return httpx2.Response(200, json=answer)


def sku_job(
    folder: Path, monkeypatch: pytest.MonkeyPatch, config: str, n: int, *, model: str, pictures: int | None = None
) -> Path:
    """A job of *n* items ``sku-0``... (512 px, a picture each, or *pictures* shared round-robin) beside a config
    file holding *config*, with the simulator's key set: the set-up of the tests that drive the simulator."""
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    (folder / "nanobatch.yaml").write_text(config)
    return write_job(folder, sku_items(n, pictures), model=model)


def sku_items(n: int, pictures: int | None = None) -> list[dict[str, Any]]:
    """The items of :func:`sku_job` (to write its manifest again, with rows left out or back)."""
    return [{"id": f"sku-{i}", "image": f"images/p{i % (pictures or n)}.png", "image_size": "512"} for i in range(n)]


def write_job(folder: Path, items: list[dict[str, Any]], **top: Any) -> Path:
    """A manifest in *folder* with one small PNG per distinct local ``image`` name the items use that is not
    there yet (URLs and files already made are left as they are)."""
    import yaml

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for n, item in enumerate(items):
        for name in [item.get("image"), *(item.get("images") or [])]:
            if name and "://" not in name and not os.path.lexists(folder / name):
                (folder / name).write_bytes(image_bytes((40 * n % 255, 90, 160)))
    doc = {"name": "job", "defaults": {"instruction": "make the background white"}, **top, "items": items}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load(path: Path, default_model: str = "gemini-3.1-flash-image") -> Manifest:
    return load_manifest(path, default_model=default_model)


def records(out: Path) -> list[dict[str, Any]]:
    """The records of results.jsonl in the output folder *out*, in order."""
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def run(
    job: Path, fake: FakeGemini, out: Path | None = None, *, settle_s: float = 0.0, **options: Any
) -> nanobatch.RunSummary:
    """Run *job* against *fake* on the virtual clock, into *out* (``out`` beside the job if not given);
    *settle_s*: as :func:`run_virtual`'s."""
    options.setdefault("out_dir", out if out is not None else job.parent / "out")
    return run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, **options), settle_s=settle_s)


def run_now(job: Path, fake: FakeGemini | None = None, out: Path | None = None, **options: Any) -> nanobatch.RunSummary:
    """:func:`run` in real time, for jobs whose storage calls wait on real servers (the emulators) in worker
    threads; without *fake*, *options* say where requests go (``simulate=True``)."""
    options.setdefault("out_dir", out if out is not None else job.parent / "out")
    if fake is not None:
        options["transport"] = fake.transport
    return anyio.run(lambda: nanobatch.run_job(job, **options))


def manifest_problems(path: Path, default_model: str = "gemini-3.1-flash-image") -> list[Problem]:
    """Every problem `nanobatch validate` would list for the manifest at *path*."""
    try:
        manifest = load_manifest(path, default_model=default_model)
    except ManifestError as exc:
        return exc.problems
    return manifest.check().problems


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@contextlib.contextmanager
def taken_at_write(out: Path, name: str) -> Iterator[None]:
    """Inside: a file of the user's appears at *name* in the output folder *out* just as nanobatch is about to
    write an image there (the writer refuses it: ``output_exists``)."""
    from nanobatch.output.outdir import OutDir

    real = OutDir.claims

    def taken(self: OutDir, files: list[Any], moves: Any) -> Any:
        if any(written == name for written, _ in files):
            (out / name).write_bytes(b"mine")
        return real(self, files, moves)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OutDir, "claims", taken)
        yield


@contextlib.contextmanager
def killed_before_the_records() -> Iterator[None]:
    """The run inside dies (:class:`Killed`) just as it would append its records: what it wrote or PUT before
    stays, and no record names it."""
    from nanobatch.output.outdir import ResultsLog

    def killed(self: ResultsLog, records: object) -> None:
        raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ResultsLog, "append_many", killed)
        with pytest.raises((Killed, BaseExceptionGroup)):
            yield
