"""Parse and check a generateContent body the way the real API does (pure, no I/O).

Everything the real API would refuse raises InvalidRequest with a message
modelled on Google's; what passes becomes a ParsedRequest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..models import ModelInfo
from .errors import UNPROCESSABLE_IMAGE, InvalidRequest

__all__ = ["MAX_BODY_BYTES", "InputImage", "ParsedRequest", "open_image", "parse_request", "stand_in_image"]

MAX_BODY_BYTES = 20 * 1024 * 1024
MODALITIES = ("TEXT", "IMAGE")

# Known JSON names (camelCase; snake_case is accepted too, as by the real API).
_TOP_FIELDS = frozenset(
    {"contents", "generationConfig", "safetySettings", "systemInstruction", "tools", "toolConfig",
     "cachedContent", "model", "labels", "serviceTier", "store"}
)  # fmt: skip
# Vertex AI's GenerateContentRequest has no "store" (google-genai refuses it there): an unknown field.
_VERTEX_TOP_FIELDS = _TOP_FIELDS - {"store"}
_GENERATION_FIELDS = frozenset(
    {"responseModalities", "imageConfig", "temperature", "topP", "topK", "candidateCount", "maxOutputTokens",
     "seed", "stopSequences", "thinkingConfig", "responseMimeType", "responseSchema", "responseJsonSchema",
     "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs", "mediaResolution", "speechConfig"}
)  # fmt: skip
_IMAGE_CONFIG_FIELDS = frozenset({"aspectRatio", "imageSize", "personGeneration", "imageOutputOptions"})
_CONTENT_FIELDS = frozenset({"parts", "role"})
_PART_FIELDS = frozenset(
    {"text", "inlineData", "fileData", "thought", "thoughtSignature", "functionCall", "functionResponse",
     "executableCode", "codeExecutionResult", "videoMetadata", "mediaResolution"}
)  # fmt: skip
_BLOB_FIELDS = frozenset({"mimeType", "data"})
_FILE_FIELDS = frozenset({"mimeType", "fileUri", "displayName"})


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class InputImage:
    """One decoded input image and where it was in the conversation."""

    image: Image.Image
    turn: int
    role: str
    uri: str | None = None  # a fileData part: the URI the real API would fetch (see _fetch.py for those fetched)

    @property
    def has_alpha(self) -> bool:
        return self.image.mode in ("RGBA", "LA", "PA") or "transparency" in self.image.info


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ParsedRequest:
    """What the simulator needs from a valid request."""

    model: ModelInfo
    model_id: str
    instruction: str  # the text of the last turn: what to do now
    texts: tuple[str, ...]  # every prompt text, for token counting
    images: tuple[InputImage, ...]  # every non-thought input image, in order
    last_turn: int
    aspect_ratio: str | None
    image_size: str | None
    modalities: tuple[str, ...]
    service_tier: str = "standard"  # lower case
    image_format: str | None = None  # png | jpeg from imageConfig.imageOutputOptions.mimeType (Vertex AI's)
    store: bool | None = None  # the top-level "store": may Google log this request (None: not sent)


def parse_request(body: bytes, *, model: ModelInfo, model_id: str, vertex: bool = False) -> ParsedRequest:
    """Check *body* for *model* and return its contents, or raise InvalidRequest. *vertex*: as Vertex AI
    checks it (no ``store`` field)."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"Request payload size exceeds the limit: {MAX_BODY_BYTES} bytes.")
    data = _load_json(body)
    _check_fields(data, _VERTEX_TOP_FIELDS if vertex else _TOP_FIELDS, "")
    contents = _get(data, "contents")
    if contents is None or contents == []:
        raise InvalidRequest("* GenerateContentRequest.contents: contents is not specified\n")
    if not isinstance(contents, list):
        raise InvalidRequest(f"Invalid value at 'contents' (type.googleapis.com/google.ai.Content), {contents!r}")
    texts: list[str] = [*_system_texts(data)]
    images: list[InputImage] = []
    instruction: list[str] = []
    for turn, content in enumerate(contents):
        role, parts = _content(content, turn)
        for index, part in enumerate(parts):
            where = f"contents[{turn}].parts[{index}]"
            text, image, uri = _part(part, where)
            if _get(part, "thought") is True:
                continue  # earlier thoughts are not part of the prompt
            if text is not None:
                texts.append(text)
                if turn == len(contents) - 1:
                    instruction.append(text)
            if image is not None:
                images.append(InputImage(image=image, turn=turn, role=role, uri=uri))
    if len(images) > model.max_input_images:
        raise InvalidRequest(
            f"Too many input images: {len(images)}. models/{model_id} accepts at most {model.max_input_images}."
        )
    generation = _object(data, "generationConfig", "generation_config", _GENERATION_FIELDS)
    image_config = _object(generation, "imageConfig", "generation_config.image_config", _IMAGE_CONFIG_FIELDS)
    _check_candidates(generation, model_id)
    return ParsedRequest(
        model=model,
        model_id=model_id,
        instruction=" ".join(t.strip() for t in instruction if t.strip()),
        texts=tuple(texts),
        images=tuple(images),
        last_turn=len(contents) - 1,
        aspect_ratio=_aspect_ratio(image_config, model, model_id),
        image_size=_image_size(image_config, model, model_id),
        modalities=_modalities(generation),
        service_tier=_service_tier(data, model, model_id),
        image_format=_image_format(image_config),
        store=_store(data),
    )


def _store(data: dict[str, Any]) -> bool | None:
    value = data.get("store")
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"Invalid value at 'store' (TYPE_BOOL), {json.dumps(value)}")
    return value


def _image_format(image_config: dict[str, Any]) -> str | None:
    options = _get(image_config, "imageOutputOptions")
    mime = _get(options, "mimeType") if isinstance(options, dict) else None
    if mime is None:
        return None
    if mime not in ("image/png", "image/jpeg"):
        raise InvalidRequest(f"Unsupported output image MIME type: {mime}. Use image/png or image/jpeg.")
    return str(mime).removeprefix("image/")


def _service_tier(data: dict[str, Any], model: ModelInfo, model_id: str) -> str:
    value = _get(data, "serviceTier")
    if value is None:
        return "standard"
    tier = str(value).lower().removeprefix("service_tier_")
    if tier not in ("standard", "flex", "priority"):
        raise InvalidRequest(f"Invalid value at 'service_tier': {value!r}. Use one of FLEX, STANDARD, PRIORITY.")
    if tier not in model.tiers:
        raise InvalidRequest(f"Service tier {tier.upper()} is not supported for models/{model_id}.")
    return tier


def _load_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        snippet = body[:40].decode("utf-8", "replace")
        raise InvalidRequest(f"Invalid JSON payload received. Unexpected token.\n{snippet}\n^") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"Invalid JSON payload received. Expected an object, got {type(data).__name__}.")
    return data


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _get(obj: dict[str, Any], name: str) -> Any:
    """Field *name* (camelCase) under either spelling."""
    return obj.get(name, obj.get(_snake(name)))


def _check_fields(obj: dict[str, Any], known: frozenset[str], where: str) -> None:
    for key in obj:
        if _camel(key) not in known:
            at = f" at '{where}'" if where else ""
            raise InvalidRequest(f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.')


def _object(parent: dict[str, Any], name: str, where: str, known: frozenset[str]) -> dict[str, Any]:
    value = _get(parent, name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"Invalid value at '{where}', expected an object, got {value!r}")
    _check_fields(value, known, where)
    return value


def _system_texts(data: dict[str, Any]) -> list[str]:
    system = _get(data, "systemInstruction")
    parts = system.get("parts") if isinstance(system, dict) else None
    if not isinstance(parts, list):
        return []
    return [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]


def _content(content: Any, turn: int) -> tuple[str, list[dict[str, Any]]]:
    where = f"contents[{turn}]"
    if not isinstance(content, dict):
        raise InvalidRequest(f"Invalid value at '{where}' (type.googleapis.com/google.ai.Content), {content!r}")
    _check_fields(content, _CONTENT_FIELDS, where)
    role = content.get("role") or "user"
    if role not in ("user", "model"):
        raise InvalidRequest("Please use a valid role: user, model.")
    parts = content.get("parts")
    if not isinstance(parts, list) or not parts:
        raise InvalidRequest(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.\n")
    if not all(isinstance(p, dict) for p in parts):
        raise InvalidRequest(f"Invalid value at '{where}.parts': each part must be an object")
    return role, parts


def _part(part: dict[str, Any], where: str) -> tuple[str | None, Image.Image | None, str | None]:
    _check_fields(part, _PART_FIELDS, where)
    text = part.get("text")
    blob = _get(part, "inlineData")
    file = _get(part, "fileData")
    if sum(x is not None for x in (text, blob, file)) > 1:
        raise InvalidRequest(f"* GenerateContentRequest.{where}.data: oneof field 'data' is already set.\n")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidRequest(f"Invalid value at '{where}.text' (TYPE_STRING), {text!r}")
        return text, None, None
    if blob is not None:
        return None, _inline_image(blob, f"{where}.inline_data"), None
    if file is not None:
        uri = _file_uri(file, f"{where}.file_data")
        return None, stand_in_image(uri), uri
    data_fields = sorted(k for k in part if _camel(k) not in ("thought", "thoughtSignature"))
    if data_fields:
        raise InvalidRequest(
            f"{where}: the nanobatch simulator accepts only text, inlineData and fileData parts, "
            f"not {', '.join(data_fields)}."
        )
    raise InvalidRequest(
        f"* GenerateContentRequest.{where}.data: required oneof field 'data' must have one initialized field\n"
    )


def _file_uri(file: Any, where: str) -> str:
    if not isinstance(file, dict):
        raise InvalidRequest(f"Invalid value at '{where}', expected an object, got {file!r}")
    _check_fields(file, _FILE_FIELDS, where)
    mime_type, uri = _get(file, "mimeType"), _get(file, "fileUri")
    if not isinstance(uri, str) or not uri:
        raise InvalidRequest(f"* GenerateContentRequest.{where}.file_uri: required field is not set.\n")
    if not isinstance(mime_type, str) or not mime_type:
        raise InvalidRequest(f"* GenerateContentRequest.{where}.mime_type: required field is not set.\n")
    if not mime_type.startswith("image/"):
        raise InvalidRequest(f"Unsupported MIME type: {mime_type}")
    return uri


def stand_in_image(uri: str) -> Image.Image:
    """The picture a URI the simulator does not fetch stands for: a plain colour drawn from the URI, so the
    same URI always gives the same picture."""
    digest = hashlib.sha256(uri.encode()).digest()
    return Image.new("RGB", (256, 256), (digest[0], digest[1], digest[2]))


def _inline_image(blob: Any, where: str) -> Image.Image:
    if not isinstance(blob, dict):
        raise InvalidRequest(f"Invalid value at '{where}', expected an object, got {blob!r}")
    _check_fields(blob, _BLOB_FIELDS, where)
    mime_type, data = _get(blob, "mimeType"), blob.get("data")
    if not isinstance(mime_type, str) or not mime_type:
        raise InvalidRequest(f"* GenerateContentRequest.{where}.mime_type: required field is not set.\n")
    if not mime_type.startswith("image/"):
        raise InvalidRequest(f"Unsupported MIME type: {mime_type}")
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"* GenerateContentRequest.{where}.data: required field is not set.\n")
    return open_image(_b64decode(data, f"{where}.data"))


def _b64decode(data: str, where: str) -> bytes:
    # Proto JSON accepts standard and URL-safe alphabets, padded or not.
    text = data.translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        shown = data if len(data) <= 24 else data[:24] + "..."
        message = f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed for \"{shown}\""
        raise InvalidRequest(message) from None


def open_image(raw: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(raw))  # lazy: reads the header only
    except Exception:  # Pillow raises many types (and DecompressionBomb* warnings, maybe as errors)
        raise InvalidRequest(UNPROCESSABLE_IMAGE) from None


def _check_candidates(generation: dict[str, Any], model_id: str) -> None:
    count = _get(generation, "candidateCount")
    if count is not None and count != 1:
        raise InvalidRequest(f"Multiple candidates is not enabled for models/{model_id}")


def _aspect_ratio(image_config: dict[str, Any], model: ModelInfo, model_id: str) -> str | None:
    ratio = _get(image_config, "aspectRatio")
    if ratio is None:
        return None
    if ratio not in model.aspect_ratios:
        raise InvalidRequest(
            f"Invalid value at 'generation_config.image_config.aspect_ratio': {ratio!r} is not supported by "
            f"models/{model_id}. Supported values: {', '.join(model.aspect_ratios)}."
        )
    return str(ratio)


def _image_size(image_config: dict[str, Any], model: ModelInfo, model_id: str) -> str | None:
    size = _get(image_config, "imageSize")
    if size is None:
        return None
    if not model.image_sizes:
        raise InvalidRequest(f"Image size is not supported for models/{model_id}. Remove imageConfig.imageSize.")
    if size not in model.image_sizes:
        raise InvalidRequest(
            f"Invalid value at 'generation_config.image_config.image_size': {size!r} is not supported by "
            f"models/{model_id}. Supported values: {', '.join(model.image_sizes)}."
        )
    return str(size)


def _modalities(generation: dict[str, Any]) -> tuple[str, ...]:
    value = _get(generation, "responseModalities")
    if not value:
        return MODALITIES
    if not isinstance(value, list):
        raise InvalidRequest(f"Invalid value at 'generation_config.response_modalities', {value!r}")
    for index, item in enumerate(value):
        if item not in MODALITIES:
            raise InvalidRequest(
                f"Invalid value at 'generation_config.response_modalities[{index}]' "
                f'(type.googleapis.com/google.ai.generativelanguage.v1beta.GenerationConfig.Modality), "{item}"'
            )
    return tuple(dict.fromkeys(value))
