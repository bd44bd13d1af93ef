"""Successful (HTTP 200) generateContent bodies and their token accounting (pure)."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, replace
from typing import Any

from ..models import INPUT_IMAGE_TOKENS
from .faults import Draw
from .imaging import Rendered
from .validation import ParsedRequest

__all__ = ["Usage", "blocked_body", "finish_body", "image_body", "text_body", "text_tokens"]

DRAFT_IMAGE_TOKENS = 258  # one tile: what a small thought image costs
IMAGE_SAFETY_MESSAGE = (
    "Unable to show the generated image. The image was filtered out because it violated Google's Generative AI "
    "Prohibited Use policy. You will not be charged for blocked images. Try rephrasing the prompt. If you think "
    "this was an error, send feedback."
)
NO_IMAGE_MESSAGE = "The model did not generate an image. Try rephrasing the prompt."


def text_tokens(text: str) -> int:
    """About one token per four characters."""
    return math.ceil(len(text) / 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token counts of one response, serialised as Google does (zero counts left out)."""

    prompt_text: int
    prompt_image: int
    output_text: int = 0
    output_image: int = 0
    thoughts: int = 0

    @classmethod
    def of_prompt(cls, request: ParsedRequest) -> Usage:
        return cls(
            prompt_text=sum(text_tokens(t) for t in request.texts),
            prompt_image=INPUT_IMAGE_TOKENS * len(request.images),
        )

    def total(self) -> int:
        return self.prompt_text + self.prompt_image + self.output_text + self.output_image + self.thoughts

    def to_json(self) -> dict[str, Any]:
        candidates = self.output_text + self.output_image
        usage: dict[str, Any] = {"promptTokenCount": self.prompt_text + self.prompt_image}
        if candidates:
            usage["candidatesTokenCount"] = candidates
        usage["totalTokenCount"] = self.total()
        usage["promptTokensDetails"] = _details(self.prompt_text, self.prompt_image)
        if candidates:
            usage["candidatesTokensDetails"] = _details(self.output_text, self.output_image)
        if self.thoughts:
            usage["thoughtsTokenCount"] = self.thoughts
        return usage


def _details(text: int, image: int) -> list[dict[str, Any]]:
    counts = (("TEXT", text), ("IMAGE", image))
    return [{"modality": modality, "tokenCount": n} for modality, n in counts if n]


def image_body(request: ParsedRequest, draw: Draw, rendered: Rendered) -> tuple[dict[str, Any], Usage]:
    """The normal outcome: thoughts (3.x models), maybe a short text, the image."""
    thoughts, thought_tokens = _thoughts(request, draw, rendered)
    parts = list(thoughts)
    reply = _reply(request) if "TEXT" in request.modalities else None
    if reply:
        parts.append({"text": reply})
    parts.append({"inlineData": {"mimeType": rendered.mime_type, "data": _b64(rendered.data)}})
    _sign(parts, request, draw)
    usage = replace(
        Usage.of_prompt(request),
        output_text=text_tokens(reply) if reply else 0,
        output_image=request.model.output_tokens(request.image_size),
        thoughts=thought_tokens,
    )
    return _body(request, draw, _candidate(parts, "STOP"), usage), usage


def text_body(request: ParsedRequest, draw: Draw, text: str) -> tuple[dict[str, Any], Usage]:
    """A 200 that carries text and no image (finishReason STOP)."""
    parts, thought_tokens = _thoughts(request, draw, None)
    parts = [*parts, {"text": text}]
    _sign(parts, request, draw)
    usage = replace(Usage.of_prompt(request), output_text=text_tokens(text), thoughts=thought_tokens)
    return _body(request, draw, _candidate(parts, "STOP"), usage), usage


def finish_body(request: ParsedRequest, draw: Draw, reason: str) -> tuple[dict[str, Any], Usage]:
    """A 200 whose candidate ended with *reason* (IMAGE_SAFETY, NO_IMAGE) and holds no image."""
    message = IMAGE_SAFETY_MESSAGE if reason == "IMAGE_SAFETY" else NO_IMAGE_MESSAGE
    _, thought_tokens = _thoughts(request, draw, None)
    usage = replace(Usage.of_prompt(request), thoughts=thought_tokens)
    candidate = {"finishReason": reason, "finishMessage": message, "index": 0}
    return _body(request, draw, candidate, usage), usage


def blocked_body(request: ParsedRequest, draw: Draw) -> tuple[dict[str, Any], Usage]:
    """A 200 with promptFeedback.blockReason and no candidates at all."""
    usage = Usage.of_prompt(request)
    body = {
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": usage.to_json(),
        "modelVersion": request.model_id,
        "responseId": draw.response_id,
    }
    return body, usage


def _body(request: ParsedRequest, draw: Draw, candidate: dict[str, Any], usage: Usage) -> dict[str, Any]:
    return {
        "candidates": [candidate],
        "usageMetadata": usage.to_json(),
        "modelVersion": request.model_id,
        "responseId": draw.response_id,
    }


def _candidate(parts: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    return {"content": {"parts": parts, "role": "model"}, "finishReason": reason, "index": 0}


def _thoughts(request: ParsedRequest, draw: Draw, rendered: Rendered | None) -> tuple[list[dict[str, Any]], int]:
    """Thought parts (text, then maybe a draft image) and the thinking tokens, for 3.x models."""
    if not request.model.supports_thinking:
        return [], 0
    what = request.instruction or "the request"
    text = (
        "**Planning the edit**\n\n"
        f"I'm working out how to handle: {what}. I'll keep the subject intact, "
        "make the change where it matters, and check the whole frame before finishing."
    )
    parts: list[dict[str, Any]] = [{"text": text, "thought": True}]
    tokens = draw.thought_tokens + text_tokens(text)
    if rendered is not None and rendered.thought is not None:
        parts.append({"inlineData": {"mimeType": rendered.mime_type, "data": _b64(rendered.thought)}, "thought": True})
        tokens += DRAFT_IMAGE_TOKENS
    return parts, tokens


def _reply(request: ParsedRequest) -> str:
    if request.images:
        return f"Here is the edited image: {request.instruction}".strip()
    return "Here is the image you asked for."


def _sign(parts: list[dict[str, Any]], request: ParsedRequest, draw: Draw) -> None:
    """Put thoughtSignature on the first answer part and on every answer image (3.x models)."""
    if not request.model.supports_thinking:
        return
    answer = [p for p in parts if not p.get("thought")]
    for index, part in enumerate(answer):
        if index == 0 or "inlineData" in part:
            part["thoughtSignature"] = _b64(draw.signature)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
