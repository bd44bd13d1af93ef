"""Fake Gemini answers for httpx.MockTransport: bodies, errors, and a scripted server."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image as PILImage

from nanobatch.errors import ManifestError, Problem
from nanobatch.manifest import load_manifest

USAGE = {"promptTokenCount": 1312, "candidatesTokenCount": 1120, "totalTokenCount": 2432}


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG", size: tuple[int, int] = (16, 16)
) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def inline(data: bytes, mime: str = "image/png", *, thought: bool = False) -> dict[str, Any]:
    part: dict[str, Any] = {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}}
    if thought:
        part["thought"] = True
    return part


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


def google_error(code: int, status: str, message: str, *details: dict[str, Any]) -> httpx.Response:
    return httpx.Response(
        code, json={"error": {"code": code, "message": message, "status": status, "details": list(details)}}
    )


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def quota_failure(quota_id: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": quota_id}]}


Answer = httpx.Response | dict[str, Any] | Callable[[httpx.Request], httpx.Response]


class FakeGemini:
    """A scripted server: answers by the request's instruction text, in order, the last one repeating.

    Instructions not in the script get a plain success. Every request is kept in ``requests``.
    """

    def __init__(self, script: dict[str, list[Answer]] | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.requests: list[httpx.Request] = []

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def instructions(self) -> list[str]:
        return [json.loads(r.content)["contents"][0]["parts"][0]["text"] for r in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        text = json.loads(request.content)["contents"][0]["parts"][0]["text"]
        answers = self.script.get(text)
        answer: Answer = ok_body()
        if answers:
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if callable(answer):
            return answer(request)
        if isinstance(answer, httpx.Response):
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)
        return httpx.Response(200, json=answer)


def write_job(folder: Path, items: list[dict[str, Any]], **top: Any) -> Path:
    """A manifest in *folder* with one small PNG per distinct ``image`` name the items use."""
    import yaml

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for n, item in enumerate(items):
        for name in [item.get("image"), *(item.get("images") or [])]:
            if name and not (folder / name).exists():
                (folder / name).write_bytes(image_bytes((40 * n % 255, 90, 160)))
    doc = {"name": "job", "defaults": {"instruction": "make the background white"}, **top, "items": items}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def manifest_problems(path: Path, default_model: str = "gemini-3.1-flash-image") -> list[Problem]:
    """Every problem `nanobatch validate` would list for the manifest at *path*."""
    try:
        manifest = load_manifest(path, default_model=default_model)
    except ManifestError as exc:
        return exc.problems
    return manifest.check().problems
