"""The wire protocol: request bodies, 200 replies, and the error for every other answer."""

from __future__ import annotations

import base64
import email.utils
import json
from datetime import UTC, datetime
from typing import Any

import httpx2
import pytest

from nanobatch.api.causes import classify_error
from nanobatch.api.gemini import Image, build_request, check_reply, parse_reply, sum_usage
from nanobatch.errors import ApiError, FatalApiError
from nanobatch.pictures import sniff_mime

from .fakes import image_bytes, inline, noise_bytes, quota_failure, retry_info

PNG = image_bytes()
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"jpeg-pixels"
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"webp-pixels"


def body(*parts: dict[str, Any], finish: str | None = "STOP", **extra: Any) -> bytes:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}}
    if finish is not None:
        candidate["finishReason"] = finish
    return json.dumps({"candidates": [candidate], **extra}).encode()


# --- build_request -----------------------------------------------------------------------------------------


def test_request_has_the_instruction_then_each_image_in_order() -> None:
    req = build_request("make it blue", [Image("image/png", PNG), Image("image/jpeg", JPEG)])
    parts = req["contents"][0]["parts"]
    assert parts[0] == {"text": "make it blue"}
    assert [p["inlineData"]["mimeType"] for p in parts[1:]] == ["image/png", "image/jpeg"]
    assert [base64.b64decode(p["inlineData"]["data"]) for p in parts[1:]] == [PNG, JPEG]
    assert len(parts) == 3
    assert req["generationConfig"]["responseModalities"] == ["IMAGE"]
    json.dumps(req)  # the body must be JSON-serialisable as is


def test_text_to_image_request_has_only_the_instruction() -> None:
    req = build_request("a lemon on a blue table", response_modalities=("TEXT", "IMAGE"))
    assert req["contents"][0]["parts"] == [{"text": "a lemon on a blue table"}]
    assert req["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]


@pytest.mark.parametrize("store", [False, True, None])
def test_store_is_a_top_level_field_left_out_when_none(store: bool | None) -> None:
    body = build_request("x", store=store)
    assert body.get("store", "absent") == ("absent" if store is None else store)
    assert "store" not in body["generationConfig"]  # where google-genai puts it: the request, not its config


def test_image_config_and_thinking_are_sent_only_when_set() -> None:
    bare = build_request("x")["generationConfig"]
    assert "imageConfig" not in bare and "thinkingConfig" not in bare

    ratio_only = build_request("x", aspect_ratio="16:9")["generationConfig"]
    assert ratio_only["imageConfig"] == {"aspectRatio": "16:9"}  # no imageSize: 2.5 flash image rejects it

    full = build_request("x", aspect_ratio="1:1", image_size="2K", thinking_level="high")["generationConfig"]
    assert full["imageConfig"] == {"aspectRatio": "1:1", "imageSize": "2K"}
    assert full["thinkingConfig"] == {"thinkingLevel": "high"}


# --- sniff_mime / parse_reply --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        pytest.param(PNG, "image/png", id="png"),
        pytest.param(JPEG, "image/jpeg", id="jpeg"),
        pytest.param(WEBP, "image/webp", id="webp"),
        pytest.param(b"GIF89a....", "image/gif", id="gif"),
        pytest.param(b"\x00\x00\x00\x18ftypheic", "image/heic", id="heic"),
        pytest.param(b"hello world", None, id="unknown"),
        pytest.param(b"", None, id="empty"),
    ],
)
def test_sniff_mime(data: bytes, mime: str | None) -> None:
    assert sniff_mime(data) == mime


def test_thought_image_is_a_draft_and_only_the_final_image_is_returned() -> None:
    reply = parse_reply(
        body(
            {"text": "planning the composition", "thought": True},
            inline(JPEG, "image/jpeg", thought=True),
            {"text": "Here is your edited image."},
            inline(PNG, thoughtSignature="c2lnbmF0dXJl"),
        )
    )
    assert [(i.mime_type, i.data) for i in reply.images] == [("image/png", PNG)]
    assert reply.text == "Here is your edited image."


def test_reply_carries_finish_usage_and_ids_verbatim() -> None:
    usage = {
        "promptTokenCount": 1312,
        "candidatesTokenCount": 1680,
        "thoughtsTokenCount": 210,
        "totalTokenCount": 3202,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 22}, {"modality": "IMAGE", "tokenCount": 1290}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1680}],
    }
    raw = json.dumps(
        {
            "candidates": [{"content": {"parts": [inline(PNG)]}, "finishReason": "STOP", "finishMessage": "all good"}],
            "usageMetadata": usage,
            "modelVersion": "gemini-3.1-flash-image-11-2026",
            "responseId": "abc-123",
        }
    ).encode()
    reply = parse_reply(raw)
    assert reply.finish_reason == "STOP"
    assert reply.finish_message == "all good"
    assert reply.usage == usage
    assert reply.model_version == "gemini-3.1-flash-image-11-2026"
    assert reply.response_id == "abc-123"
    assert reply.block_reason is None


def test_answers_parsed_keep_nothing_of_theirs_once_dropped() -> None:
    """A run parses one answer per item: what is unique to each (its responseId) is not kept by the JSON parser's
    string cache once the answer is gone (it was: up to 16,384 strings, about 1 MB by the 16,000th item)."""
    import gc
    import tracemalloc

    def raw(n: int) -> bytes:
        answer = {"candidates": [{"content": {"parts": [inline(PNG)]}, "finishReason": "STOP"}],
                  "usageMetadata": {"promptTokenCount": 10}, "responseId": f"response-{n:08d}"}  # fmt: skip
        return json.dumps(answer).encode()

    parse_reply(raw(0))  # (the keys, which every answer shares, may be cached)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(1, 20_001):
            parse_reply(raw(n))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 100_000


def test_prompt_block_has_no_candidates_and_keeps_the_reason() -> None:
    raw = json.dumps(
        {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {"promptTokenCount": 9}}
    )
    reply = parse_reply(raw.encode())
    assert reply.block_reason == "PROHIBITED_CONTENT"
    assert reply.images == () and reply.finish_reason is None
    assert reply.usage == {"promptTokenCount": 9}


def test_image_type_comes_from_the_bytes_not_the_label() -> None:
    reply = parse_reply(body(inline(JPEG, "image/png"), inline(WEBP, "image/png"), inline(PNG, "image/jpeg")))
    assert [i.mime_type for i in reply.images] == ["image/jpeg", "image/webp", "image/png"]
    assert [i.extension for i in reply.images] == ["jpg", "webp", "png"]


def test_several_final_images_are_all_kept_in_order() -> None:
    reply = parse_reply(body(inline(PNG), {"text": "and a variant"}, inline(JPEG, "image/jpeg")))
    assert [i.data for i in reply.images] == [PNG, JPEG]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(body(inline(PNG))[:-40], id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"[1, 2, 3]", id="not-an-object"),
        pytest.param(b'{"candidates": {"0": {}}}', id="candidates-not-a-list"),
        pytest.param(b'{"candidates": [{"content": "an image"}]}', id="content-not-an-object"),
        pytest.param(b'{"candidates": [{"content": {"parts": "an image"}}]}', id="parts-not-a-list"),
        pytest.param(body({"inlineData": {"mimeType": "image/png", "data": "!!not base64!!"}}), id="bad-base64"),
    ],
)
def test_malformed_200_is_a_retryable_bad_response(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_reply(raw)
    assert info.value.kind == "bad_response"
    assert info.value.retryable is True
    assert not isinstance(info.value, FatalApiError)


def test_a_page_with_status_200_is_a_retryable_bad_gateway_named_by_its_title() -> None:
    # A proxy's (or a CDN's) page made no answer: not a bad_response, which counts as a paid answer unread.
    with pytest.raises(ApiError) as info:
        parse_reply(b"<html><head><title>502 Bad Gateway</title></head><body>gateway</body></html>")
    assert info.value.kind == "bad_gateway" and info.value.retryable and "502 Bad Gateway" in info.value.message


# --- check_reply -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param(r, id=r)
        for r in (
            "SAFETY",
            "IMAGE_SAFETY",
            "PROHIBITED_CONTENT",
            "IMAGE_PROHIBITED_CONTENT",
            "BLOCKLIST",
            "SPII",
            "RECITATION",
            "IMAGE_RECITATION",
        )
    ],
)
def test_withheld_output_is_blocked_and_final(reason: str) -> None:
    reply = parse_reply(body({"text": "I can't help with that."}, finish=reason))
    with pytest.raises(ApiError) as info:
        check_reply(reply)
    assert info.value.kind == "blocked"
    assert info.value.retryable is False
    assert reason in info.value.message


def test_blocked_even_when_an_image_came_along() -> None:
    with pytest.raises(ApiError) as info:
        check_reply(parse_reply(body(inline(PNG), finish="IMAGE_SAFETY")))
    assert info.value.kind == "blocked"


def test_prompt_block_reason_is_blocked() -> None:
    reply = parse_reply(json.dumps({"promptFeedback": {"blockReason": "OTHER"}}).encode())
    with pytest.raises(ApiError) as info:
        check_reply(reply)
    assert info.value.kind == "blocked" and not info.value.retryable
    assert "OTHER" in info.value.message


@pytest.mark.parametrize(
    ("finish", "text", "finish_message"),
    [
        pytest.param("NO_IMAGE", "I could not draw that, try a simpler scene.", None, id="NO_IMAGE"),
        pytest.param("IMAGE_OTHER", "Something odd happened with the picture.", None, id="IMAGE_OTHER"),
        pytest.param("STOP", "Sure! Here is a description of a lemon instead.", None, id="text-only-STOP"),
        pytest.param("IMAGE_OTHER", None, "Unable to show the generated image.", id="finish-message-only"),
        pytest.param("IMAGE_OTHER", "I drew a cat instead.", "Unable to show the image.", id="finish-message-and-text"),
    ],
)
def test_answer_without_image_is_retryable_no_image_and_keeps_the_models_words(
    finish: str, text: str | None, finish_message: str | None
) -> None:
    parts = [{"text": text}] if text else []
    extra = {"finishMessage": finish_message} if finish_message else {}
    raw = json.dumps({"candidates": [{"content": {"parts": parts}, "finishReason": finish, **extra}]}).encode()
    with pytest.raises(ApiError) as info:
        check_reply(parse_reply(raw))
    assert info.value.kind == "no_image"
    assert info.value.retryable is True
    for words in (text, finish_message):
        assert words is None or words in info.value.message
    assert finish in info.value.message


def test_reply_with_an_image_passes() -> None:
    reply = parse_reply(body(inline(PNG)))
    check_reply(reply)  # accepted: no exception
    assert [(image.data, image.mime_type) for image in reply.images] == [(PNG, "image/png")]


def _cut(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize(
    ("parts", "said"),
    [
        pytest.param([inline(bytes(range(256)) * 20)], "not a picture by its first bytes", id="random-bytes-as-png"),
        pytest.param([inline(b"\x89PNG\r\n\x1a\n" + bytes(5000))], "before its end chunk", id="png-signature-only"),
        pytest.param([inline(_cut(noise_bytes()))], "before its end chunk", id="png-cut-short"),
        pytest.param(
            [inline(_cut(noise_bytes(fmt="JPEG")), "image/jpeg")], "before its end marker", id="jpeg-cut-short"
        ),
        pytest.param([inline(PNG), inline(b"<html>502</html>")], "image 2 of 2", id="second-of-two"),
    ],
)
def test_an_image_that_cannot_be_decoded_is_a_retryable_bad_image(parts: list[dict[str, Any]], said: str) -> None:
    with pytest.raises(ApiError) as info:
        check_reply(parse_reply(body(*parts)))
    assert (info.value.kind, info.value.retryable, info.value.status_code) == ("bad_image", True, 200)
    assert said in info.value.message and "cannot be used" in info.value.message
    assert info.value.reply is not None  # its usage is billed and recorded all the same


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(image_bytes(fmt="JPEG"), id="jpeg"),
        pytest.param(image_bytes(fmt="JPEG") + b"\x00\x00\r\n", id="jpeg-with-padding-after-eoi"),
        pytest.param(image_bytes(fmt="JPEG") + b"appended motion-photo data " * 40, id="jpeg-with-data-appended"),
        pytest.param(image_bytes(fmt="WEBP"), id="webp"),
        pytest.param(image_bytes(size=(512, 384)), id="png"),
    ],
)
def test_a_whole_image_of_any_type_passes(data: bytes) -> None:
    check_reply(parse_reply(body(inline(data, "image/png"))))


def test_only_a_thought_image_is_no_image() -> None:
    with pytest.raises(ApiError) as info:
        check_reply(parse_reply(body(inline(PNG, thought=True))))
    assert info.value.kind == "no_image"


# --- classify_error ---------------------------------------------------------------------------------------------


def google(code: int, status: str, message: str, *details: dict[str, Any]) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "status": status, "details": list(details)}}
    ).encode()


def apiyi(code: int, message: str) -> bytes:
    error = {"message": message, "type": "upstream_error", "code": "model_overloaded"}
    return json.dumps({"status_code": code, "error": error}).encode()


NO_HEADERS = httpx2.Headers()
HTML_502 = (
    b"""<!DOCTYPE html><html><head><title>502 Bad Gateway</title><style>body{margin:0}</style></head>
<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"""
    + b"<p>padding</p>" * 500
    + b"</body></html>"
)


@pytest.mark.parametrize(
    ("status", "raw", "kind"),
    [
        pytest.param(408, b"", "timeout", id="408"),
        pytest.param(429, google(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted"), "rate_limited", id="429"),
        pytest.param(500, google(500, "INTERNAL", "An internal error has occurred"), "server_error", id="500"),
        pytest.param(502, HTML_502, "bad_gateway", id="502-html"),
        pytest.param(503, google(503, "UNAVAILABLE", "The model is overloaded"), "overloaded", id="503"),
        pytest.param(503, apiyi(503, "upstream overloaded, please retry"), "overloaded", id="503-apiyi"),
        pytest.param(504, google(504, "DEADLINE_EXCEEDED", "Deadline expired"), "timeout", id="504"),
        pytest.param(520, b"", "server_error", id="520-unknown-5xx"),
    ],
)
def test_transient_statuses_are_retryable(status: int, raw: bytes, kind: str) -> None:
    error = classify_error(status, NO_HEADERS, raw)
    assert type(error) is ApiError
    assert (error.kind, error.retryable, error.status_code) == (kind, True, status)


@pytest.mark.parametrize(
    ("status", "raw", "kind", "words"),
    [
        pytest.param(401, google(401, "UNAUTHENTICATED", "Request had invalid credentials"), "auth",
                     "invalid credentials", id="401"),
        pytest.param(402, apiyi(402, "insufficient balance"), "no_credit", "insufficient balance", id="402-apiyi"),
        pytest.param(403, google(403, "PERMISSION_DENIED", "Permission denied on resource"), "permission",
                     "Permission denied", id="403"),
        pytest.param(404, google(404, "NOT_FOUND", "models/gemini-9-image is not found"), "not_found",
                     "gemini-9-image", id="404"),
        pytest.param(
            400,
            google(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}),
            "auth", "API key not valid", id="400-API_KEY_INVALID",
        ),
        pytest.param(
            429,
            google(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota",
                   quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier"), retry_info("26s")),
            "quota_exhausted", "exceeded your current quota", id="429-per-day-quota",
        ),
        pytest.param(
            429,
            google(429, "RESOURCE_EXHAUSTED", "quota exceeded", quota_failure(
                "", "generativelanguage.googleapis.com/generate_requests_per_model_per_day")),
            "quota_exhausted", "quota exceeded", id="429-per-day-metric",
        ),
    ],
)  # fmt: skip
def test_answers_no_request_can_survive_are_fatal(status: int, raw: bytes, kind: str, words: str) -> None:
    error = classify_error(status, NO_HEADERS, raw)
    assert isinstance(error, FatalApiError)
    assert error.kind == kind and error.status_code == status and not error.retryable
    assert words in error.message
    assert "hint:" in error.message  # says what to do


def test_per_minute_quota_is_worth_waiting_for() -> None:
    raw = google(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota",
        quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
        retry_info("26s"),
    )
    error = classify_error(429, NO_HEADERS, raw)
    assert not isinstance(error, FatalApiError)
    assert (error.kind, error.retryable, error.retry_after) == ("rate_limited", True, 26.0)


@pytest.mark.parametrize(
    ("status", "raw", "shed"),
    [
        pytest.param(503, google(503, "UNAVAILABLE", "The model is overloaded"), True, id="503"),
        pytest.param(429, google(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted"), True, id="429"),
        pytest.param(
            429,
            google(429, "RESOURCE_EXHAUSTED", "quota", quota_failure("GenerateRequestsPerDayPerProjectPerModel")),
            False,
            id="429-daily-quota",
        ),
        pytest.param(500, google(500, "INTERNAL", "An internal error has occurred"), False, id="500"),
        pytest.param(400, google(400, "INVALID_ARGUMENT", "Unsupported image size"), False, id="400"),
    ],
)
def test_only_load_answers_count_as_shedding_a_request(status: int, raw: bytes, shed: bool) -> None:
    """A flex request turned away for load may go at standard; one wrong in itself, or out of daily quota, not."""
    assert classify_error(status, NO_HEADERS, raw).shed is shed


def test_bad_request_is_final_and_keeps_the_apis_message() -> None:
    raw = google(400, "INVALID_ARGUMENT", "Unsupported image size: 8K. Supported sizes are 1K, 2K, 4K.")
    error = classify_error(400, NO_HEADERS, raw)
    assert type(error) is ApiError
    assert (error.kind, error.retryable, error.retry_after) == ("bad_request", False, None)
    assert "Unsupported image size: 8K. Supported sizes are 1K, 2K, 4K." in error.message
    assert error.status_code == 400


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [
        pytest.param("26s", 26.0, id="whole"),
        pytest.param("45.837906927s", 45.837906927, id="fraction"),
        pytest.param("0s", 0.0, id="zero"),
    ],
)
def test_retry_info_delay_is_taken_exactly(delay: str, seconds: float) -> None:
    error = classify_error(429, NO_HEADERS, google(429, "RESOURCE_EXHAUSTED", "slow down", retry_info(delay)))
    assert error.retry_after == seconds


def test_retry_info_beats_retry_after_header() -> None:
    headers = httpx2.Headers({"Retry-After": "5"})
    error = classify_error(429, headers, google(429, "RESOURCE_EXHAUSTED", "slow down", retry_info("26s")))
    assert error.retry_after == 26.0


def test_retry_after_header_in_seconds() -> None:
    error = classify_error(503, httpx2.Headers({"Retry-After": "120"}), b"")
    assert error.retry_after == 120.0


def test_retry_after_header_as_http_date() -> None:
    now = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC).timestamp()
    when = email.utils.formatdate(now + 90, usegmt=True)
    error = classify_error(429, httpx2.Headers({"Retry-After": when}), b"", now=now)
    assert error.retry_after == 90.0


def test_retry_after_in_the_past_means_now() -> None:
    now = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC).timestamp()
    error = classify_error(503, httpx2.Headers({"Retry-After": email.utils.formatdate(now - 60, usegmt=True)}), b"",
                           now=now)  # fmt: skip
    assert error.retry_after == 0.0


def test_unreadable_retry_after_is_ignored() -> None:
    assert classify_error(503, httpx2.Headers({"Retry-After": "soon"}), b"").retry_after is None


def test_final_errors_carry_no_retry_after() -> None:
    error = classify_error(400, httpx2.Headers({"Retry-After": "30"}), google(400, "INVALID_ARGUMENT", "bad"))
    assert error.retry_after is None


def test_apiyi_body_message_is_kept() -> None:
    error = classify_error(503, NO_HEADERS, apiyi(503, "upstream overloaded, please retry"))
    assert "upstream overloaded, please retry" in error.message


def test_html_page_from_a_proxy_becomes_its_title() -> None:
    error = classify_error(502, NO_HEADERS, HTML_502)
    assert error.message == "HTTP 502: 502 Bad Gateway"
    assert "<" not in error.message and len(error.message) < 100


def test_html_page_without_title_is_short_and_tagless() -> None:
    page = b"<html><body><h1>Gateway Timeout</h1>" + b"<p>the upstream did not answer in time</p>" * 100 + b"</body>"
    error = classify_error(504, NO_HEADERS, page)
    assert error.message.startswith("HTTP 504: Gateway Timeout")
    assert "<" not in error.message and len(error.message) < 300
    assert error.kind == "timeout" and error.retryable


def test_empty_body_says_so() -> None:
    error = classify_error(500, NO_HEADERS, b"")
    assert error.message == "HTTP 500: empty response body"


# --- sum_usage ---------------------------------------------------------------------------------------------------


def test_sum_usage_adds_counts_and_details_by_modality() -> None:
    first = {
        "promptTokenCount": 100,
        "candidatesTokenCount": 1120,
        "totalTokenCount": 1220,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}, {"modality": "IMAGE", "tokenCount": 90}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120}],
    }
    second = {
        "promptTokenCount": 1300,
        "candidatesTokenCount": 1130,
        "thoughtsTokenCount": 50,
        "totalTokenCount": 2480,
        "promptTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}, {"modality": "TEXT", "tokenCount": 10}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120}, {"modality": "TEXT", "tokenCount": 10}],
    }
    total = sum_usage([first, second])
    assert total["promptTokenCount"] == 1400
    assert total["candidatesTokenCount"] == 2250
    assert total["thoughtsTokenCount"] == 50
    assert total["totalTokenCount"] == 3700
    by_modality = {d["modality"]: d["tokenCount"] for d in total["promptTokensDetails"]}
    assert by_modality == {"TEXT": 20, "IMAGE": 1380}
    by_modality = {d["modality"]: d["tokenCount"] for d in total["candidatesTokensDetails"]}
    assert by_modality == {"IMAGE": 2240, "TEXT": 10}
    assert first["promptTokenCount"] == 100  # inputs untouched


def test_sum_of_one_usage_is_that_usage() -> None:
    usage = {"promptTokenCount": 5, "totalTokenCount": 7, "trafficType": "ON_DEMAND"}
    assert sum_usage([usage]) == usage


def test_a_body_only_the_standard_json_parser_takes_still_parses() -> None:
    # NaN and a lone surrogate: json.loads takes them, orjson (tried first, for speed) does not.
    text = body(inline(PNG)).decode().replace('"finishReason"', '"score": NaN, "note": "\\ud800", "finishReason"')
    reply = parse_reply(text.encode())
    assert reply.finish_reason == "STOP" and reply.images[0].data == PNG


def test_an_image_in_url_safe_or_unpadded_base64_is_decoded_as_the_sdk_does() -> None:
    png = b"\x89PNG\r\n\x1a\n\xfb\xff\xfe" + bytes(range(256))
    for text in (base64.urlsafe_b64encode(png).decode(), base64.b64encode(png).decode().rstrip("=")):
        body = json.dumps({"candidates": [{"content": {"parts": [{"inlineData": {"data": text}}]}}]}).encode()
        (image,) = parse_reply(body).images
        assert image.data == png and image.mime_type == "image/png"


def test_a_redirect_stops_the_run_naming_where_it_points_without_its_query() -> None:
    # A base URL that moved (http to https, a new host): every request would fail item by item as "HTTP 307: {}".
    headers = {"location": "https://new.proxy.example/v1beta/models/m:generateContent?key=SECRET-KEY-123"}
    error = classify_error(307, headers, b"{}")
    assert isinstance(error, FatalApiError) and error.kind == "redirect"
    assert "https://new.proxy.example/v1beta/models/m:generateContent" in error.message
    assert "SECRET-KEY-123" not in error.message and "api.base_url" in error.message


def test_an_openai_style_model_not_found_stops_the_run_as_googles_404_does() -> None:
    body = json.dumps({"error": {"message": "The model `gemini-x` does not exist", "type": "invalid_request_error",
                                 "code": "model_not_found"}}).encode()  # fmt: skip
    error = classify_error(400, {}, body)
    assert isinstance(error, FatalApiError) and error.kind == "not_found"
