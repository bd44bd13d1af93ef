"""The Gemini ``generateContent`` wire protocol, as pure functions (no I/O).

* :func:`build_request` makes the JSON body for one edit or generation.
* :func:`parse_reply` turns a 200 body into a :class:`Reply`.
* :func:`redact_reply` takes every credential out of a reply's words.
* :func:`check_reply` says whether a reply is a result, blocked, imageless, or carries an image that cannot be
  decoded (:func:`reply_error`: the same, as a value).
* What any other answer means: :func:`nanobatch.api.causes.classify_error`.

An error's message made from what the server sent (a proxy's page, an image's mime type, the model's words) is
cut of every credential :data:`~nanobatch.api.redaction.SECRETS` knows: a proxy may echo the request.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pybase64
import pydantic_core
from pydantic_core import SchemaValidator, ValidationError, core_schema

from ..errors import ApiError
from ..pictures import answer_problem, sniff_mime
from .causes import plain_message
from .lifting import Buffer, Lifted, parsed
from .redaction import SECRETS, redact, redact_urls, scrub
from .spool import Spooled

__all__ = [
    "BLOCK_REASONS",
    "FileRef",
    "Image",
    "Reply",
    "build_request",
    "check_reply",
    "extension_of",
    "parse_reply",
    "redact_reply",
    "reply_error",
    "reply_from",
    "set_service_tier",
    "sum_usage",
    "type_of",
]

# finishReason values that mean the output was withheld: retrying will not help.
BLOCK_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_RECITATION",
    }
)

_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/heic": "heic",
    "image/heif": "heif",
}
# Every extension an answer's image can be saved under ("bin": a type not listed above).
OUTPUT_EXTENSIONS = (*dict.fromkeys(_EXTENSIONS.values()), "bin")


def extension_of(mime_type: str) -> str:
    """The file extension an image of *mime_type* is saved under (``bin`` for a type not listed)."""
    return _EXTENSIONS.get(mime_type, "bin")


def type_of(extension: str) -> str:
    """The mime type of an image saved under *extension* by :func:`extension_of` (``bin``: unknown)."""
    return next((mime for mime, ext in _EXTENSIONS.items() if ext == extension), "application/octet-stream")


@dataclass(frozen=True, slots=True)
class Image:
    """Image bytes and their mime type; or, for an answer a worker process decoded, the temporary file it wrote
    them into (*spooled*, :mod:`nanobatch.api.spool`): read from there only when asked for (``data``), and renamed
    into place by the run's writer."""

    mime_type: str
    content: bytes = field(default=b"", repr=False)
    spooled: Spooled | None = field(default=None, repr=False)

    @property
    def data(self) -> bytes:
        return self.content if self.spooled is None else self.spooled.read()

    @property
    def size(self) -> int:
        return len(self.content) if self.spooled is None else self.spooled.size

    @property
    def extension(self) -> str:
        return extension_of(self.mime_type)

    def problem(self) -> str | None:
        """Why the image cannot be decoded (:func:`~nanobatch.pictures.answer_problem`), or None."""
        return answer_problem(self.content) if self.spooled is None else self.spooled.problem


@dataclass(frozen=True, slots=True)
class FileRef:
    """An input the API fetches itself: sent as ``{"fileData": {"mimeType", "fileUri"}}`` instead of its bytes."""

    mime_type: str
    uri: str = field(repr=False)  # a pre-signed URL's query is a credential: never in a log by way of repr


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What a 200 answer carried. ``images`` are the final images only, never thinking drafts."""

    images: tuple[Image, ...] = ()
    text: str | None = None
    finish_reason: str | None = None
    finish_message: str | None = None
    block_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None
    response_id: str | None = None
    # The tier the Gemini API says served it, in its x-gemini-service-tier header (a priority request past
    # priority's limit is served, and billed, at standard); None where no header said (Vertex AI: usage's trafficType).
    served_tier: str | None = None


def build_request(
    instruction: str,
    images: Sequence[Image | FileRef] = (),
    *,
    response_modalities: Sequence[str] = ("IMAGE",),
    aspect_ratio: str | None = None,
    image_size: str | None = None,
    thinking_level: str | None = None,
    service_tier: str | None = None,
    output_format: str | None = None,
    store: bool | None = None,
) -> dict[str, Any]:
    """The JSON body of a ``generateContent`` call: the instruction, then each image, in order (a
    :class:`FileRef` by its URI, which the API fetches).

    *service_tier* ``flex`` or ``priority`` sets the top-level ``serviceTier`` in lower case, as the official
    google-genai SDK sends it (its ``ServiceTier`` enum values); standard, the default, is left out.
    *output_format* ``png`` or ``jpeg`` sets ``imageConfig.imageOutputOptions.mimeType``, which only Vertex AI
    takes (the SDK refuses it for the Gemini API).
    *store* sets the top-level ``store`` (whether Google may log the request and its answer), as google-genai
    sends ``GenerateContentConfig.store`` to the Gemini API; None leaves it out (Vertex AI refuses it).
    """
    parts: list[dict[str, Any]] = [{"text": instruction}]
    for image in images:
        if isinstance(image, FileRef):  # the wire shape of google-genai's Part.from_uri
            parts.append({"fileData": {"mimeType": image.mime_type, "fileUri": image.uri}})
        else:
            data = pybase64.b64encode_as_string(image.data)  # 0.17 ms for 2 MB; base64.b64encode and decode: 2.7
            parts.append({"inlineData": {"mimeType": image.mime_type, "data": data}})
    generation: dict[str, Any] = {"responseModalities": list(response_modalities)}
    image_config: dict[str, Any] = {
        k: v for k, v in (("aspectRatio", aspect_ratio), ("imageSize", image_size)) if v is not None
    }
    if output_format is not None:
        image_config["imageOutputOptions"] = {"mimeType": f"image/{output_format}"}
    if image_config:
        generation["imageConfig"] = image_config
    if thinking_level is not None:
        generation["thinkingConfig"] = {"thinkingLevel": thinking_level}
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": parts}], "generationConfig": generation}
    set_service_tier(body, service_tier)
    if store is not None:
        body["store"] = store
    return body


def set_service_tier(body: dict[str, Any], service_tier: str | None) -> None:
    """Make *body* ask for *service_tier* (see :func:`build_request`): standard or None leaves it out."""
    body.pop("serviceTier", None)
    if service_tier is not None and service_tier != "standard":
        body["serviceTier"] = service_tier.lower()


def parse_reply(body: Buffer, size: int | None = None) -> Reply:
    """Parse a 200 body (its first *size* bytes: a worker's block of shared memory is bigger). A truncated or
    malformed body is a retryable ``bad_response``.

    Big images are decoded from the body's own bytes (:mod:`~nanobatch.api.lifting`), never made text; a
    bytearray is consumed: emptied once its images are decoded."""
    size = len(body) if size is None else size
    try:
        return parsed(body, size, functools.partial(_reply, size))
    finally:
        if isinstance(body, bytearray):
            body.clear()


def _reply(size: int, text: bytes | bytearray, lifted: Lifted | None) -> Reply:
    try:
        data = _loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for json.loads
        if bytes(text[:64]).lstrip().startswith(b"<"):  # a proxy's page (a CDN's challenge): no answer was made
            raise ApiError(f"a page, not an answer, came back with status 200: {_page_said(text)}",
                           kind="bad_gateway", status_code=200, retryable=True) from None  # fmt: skip
        raise ApiError(
            f"the response body is not valid JSON ({size} bytes; truncated?)",
            kind="bad_response",
            status_code=200,
            retryable=True,
        ) from None
    if not isinstance(data, dict):
        raise ApiError("the response body is not a JSON object", kind="bad_response", status_code=200, retryable=True)
    return reply_from(data, lifted)


_PAGE_READ = 4096  # bytes of a page its message is taken from


def _page_said(page: bytes | bytearray) -> str:
    """What a page says (its title, or its first words), without a credential: cut before it is shortened, which
    would leave the start of a key at the cut."""
    text = redact(bytes(page[: 2 * _PAGE_READ]).decode("utf-8", "replace"), None)
    return redact_urls(plain_message(text.encode()[:_PAGE_READ]))


def reply_from(data: dict[str, Any], lifted: Lifted | None = None) -> Reply:
    """The answer in a parsed ``generateContent`` response (a 200 body, or a batch results line's ``response``);
    *lifted*: where its images' text was lifted from (:func:`~nanobatch.api.lifting.lift`)."""
    images: list[Image] = []
    texts: list[str] = []
    candidates = data.get("candidates") or []
    first = candidates[0] if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict) else {}
    content = first.get("content") or {}
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(candidates, list) or not isinstance(content, dict) or not isinstance(parts or [], list):
        raise ApiError(
            "the response body is not a generateContent answer", kind="bad_response", status_code=200, retryable=True
        )
    for part in parts or []:
        if not isinstance(part, dict):
            continue
        inline = part.get("inlineData") or part.get("inline_data")
        if part.get("thought"):  # thinking parts, images included, are drafts: never the result
            if lifted is not None and isinstance(inline, dict):
                lifted.skip(inline.get("data"))
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        if isinstance(inline, dict) and inline.get("data"):
            images.append(_decode_image(inline, lifted))
    if lifted is not None:
        lifted.done()
    feedback = data.get("promptFeedback") or {}
    usage = data.get("usageMetadata")
    return Reply(
        images=tuple(images),
        text="\n".join(texts) if texts else None,
        finish_reason=_as_text(first.get("finishReason")),
        finish_message=_as_text(first.get("finishMessage")),
        block_reason=_as_text(feedback.get("blockReason")) if isinstance(feedback, dict) else None,
        usage=usage if isinstance(usage, dict) else {},
        model_version=_as_text(data.get("modelVersion")),
        response_id=_as_text(data.get("responseId")),
    )


_REPLY_TEXT_FIELDS = ("text", "finish_reason", "finish_message", "block_reason", "model_version", "response_id")


def redact_reply(reply: Reply, secret: str | None) -> Reply:
    """The reply with the key taken out of everything it says in words: a proxy that echoes the
    request ("low balance on <key>") must not put the key into results.jsonl or the report."""
    if not secret and not SECRETS:
        return reply

    def found(text: str) -> bool:
        return bool(secret and secret in text) or SECRETS.found_in(text)

    # parse_reply made each of these text (or None), whatever a proxy sent.
    changes: dict[str, Any] = {
        name: redact(value, secret)
        for name in _REPLY_TEXT_FIELDS
        if (value := getattr(reply, name)) is not None and found(value)
    }
    usage = orjson.dumps(reply.usage).decode()
    if found(usage):
        changes["usage"] = orjson.loads(redact(usage, secret))
    return dataclasses.replace(reply, **changes) if changes else reply


def _as_text(value: Any) -> str | None:
    """A field Google sends as text, as text even when a proxy sends a number, a list or an object."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


# pydantic-core's base64 decoder (Rust): faster than base64.b64decode (bench/RESULTS.md, "Why the code is shaped
# this way"), and it takes the str as it is (b64decode first copies it into bytes). Like the google-genai SDK, which
# decodes with the same settings, it also takes the URL-safe alphabet and missing padding; anything else is an error.
# pydantic_core alone, not pydantic: a worker process (limits.workers) starts ~0.1 s sooner without it.
_BASE64 = SchemaValidator(core_schema.bytes_schema(), core_schema.CoreConfig(val_json_bytes="base64"))


def _decode_image(inline: dict[str, Any], lifted: Lifted | None) -> Image:
    data = inline["data"]
    try:
        if not isinstance(data, str):
            raise TypeError(type(data).__name__)
        raw = lifted.image(data) if lifted is not None else None
        if raw is None:
            raw = _BASE64.validate_strings(data)  # type: ignore[arg-type]  # (its stub takes only dicts, its code a str too)
    except (ValidationError, TypeError):
        raise ApiError("an image in the response is not valid base64", kind="bad_response", retryable=True) from None
    # Trust the bytes over the label: proxies have been seen to send JPEG labelled PNG.
    return Image(sniff_mime(raw) or str(inline.get("mimeType") or "application/octet-stream"), raw)


def check_reply(reply: Reply) -> None:
    """Raise :func:`reply_error`'s error if *reply* holds no usable image."""
    if (error := reply_error(reply)) is not None:
        raise error


def reply_error(reply: Reply) -> ApiError | None:
    """Why *reply* holds no usable image, or None: ``blocked`` (final), ``no_image`` or ``bad_image`` (an image
    that cannot be decoded: a proxy that cut it short, say), both worth another try."""
    # Both the finishMessage and the model's own text can explain; keep each one that was sent.
    said = " / ".join(dict.fromkeys(s for s in (reply.finish_message, reply.text) if s))
    if reply.block_reason or (reply.finish_reason in BLOCK_REASONS):
        reason = reply.block_reason or reply.finish_reason
        detail = said
        return ApiError(
            scrub(f"the model withheld the output ({reason}){': ' + detail if detail else ''}", None),
            kind="blocked",
            status_code=200,
            reply=reply,
        )
    if not reply.images:
        detail = said or "no explanation given"
        return ApiError(
            scrub(f"the answer has no image (finishReason {reply.finish_reason}): {detail}", None),
            kind="no_image",
            status_code=200,
            retryable=True,
            reply=reply,
        )
    for n, image in enumerate(reply.images, 1):
        if (problem := image.problem()) is not None:
            which = f"image {n} of {len(reply.images)}" if len(reply.images) > 1 else "image"
            return ApiError(  # a proxy's mime type is its own words
                scrub(f"the answer's {which} ({image.mime_type}, {image.size} bytes) cannot be used: {problem}", None),
                kind="bad_image",
                status_code=200,
                retryable=True,
                reply=reply,
            )
    return None


def _loads(body: bytes | bytearray) -> Any:
    """json.loads, through pydantic-core's parser first (the fastest on big answers: bench/RESULTS.md); json.loads
    decides what it refuses (lone surrogates), so the same bodies parse."""
    try:
        return pydantic_core.from_json(body, cache_strings="keys")  # a value cached (responseId) would be kept
    except ValueError:
        return json.loads(body)


def sum_usage(usages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up several ``usageMetadata`` objects: counts field by field, ``*TokensDetails`` by modality; a word
    (Vertex AI's ``trafficType``, ``serviceTier``) is kept where every answer said the same."""
    if len(usages) == 1:
        return dict(usages[0])
    total: dict[str, Any] = {}
    words = {name: value for name, value in usages[0].items() if isinstance(value, str)}
    for usage in usages:
        words = {name: value for name, value in words.items() if usage.get(name) == value}
        for name, value in usage.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[name] = total.get(name, 0) + value
            elif isinstance(value, list) and name.endswith("TokensDetails"):
                by_modality: dict[str, int] = {d["modality"]: d["tokenCount"] for d in total.get(name, [])}
                for d in value:
                    if isinstance(d, dict) and "modality" in d:
                        by_modality[d["modality"]] = by_modality.get(d["modality"], 0) + int(d.get("tokenCount") or 0)
                total[name] = [{"modality": m, "tokenCount": n} for m, n in by_modality.items()]
    return total | words
