"""Big images decoded straight from the body (nanobatch.api.lifting): the same reply, or the same error, as
parsing the whole body; and no text of the image made on the way."""

from __future__ import annotations

import base64
import json
import mmap
import random
import tracemalloc
from typing import Any

import pytest

from nanobatch.api import decoding, gemini, lifting
from nanobatch.api.gemini import parse_reply
from nanobatch.errors import ApiError

PNG = b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(200_000)
JPEG = b"\xff\xd8\xff\xe0" + random.Random(2).randbytes(150_000)


def answer(*parts: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps(
        {"candidates": [{"content": {"parts": list(parts)}, "finishReason": "STOP"}], **extra}, indent=1
    ).encode()


def image(data: bytes, mime: str = "image/png", *, text: str | None = None, key: str = "inlineData") -> dict[str, Any]:
    return {key: {"mimeType": mime, "data": base64.b64encode(data).decode() if text is None else text}}


STANDARD = base64.b64encode(PNG).decode()
LIFTING_LEFT = 4096  # what is parsed of a body once its images are lifted out: a few hundred bytes
BROKEN = "\x01" + STANDARD[1:]  # not base64 (json.dumps escapes it: \u0001)
# Each body, and what parsing it whole gives: the images' bytes, or the error's kind.
CASES = {
    "plain": (answer(image(PNG)), [PNG]),
    "two images, data before mimeType, snake_case": (
        answer({"inline_data": {"data": STANDARD, "mime_type": "image/png"}}, image(JPEG, "image/jpeg")),
        [PNG, JPEG],
    ),
    "a thought image is a draft": (answer({**image(JPEG), "thought": True}, image(PNG)), [PNG]),
    "url-safe": (answer(image(PNG, text=base64.urlsafe_b64encode(PNG).decode())), [PNG]),
    "unpadded": (answer(image(PNG, text=STANDARD.rstrip("="))), [PNG]),
    "an escaped slash": (answer(image(PNG)).replace(b"/", b"\\/"), [PNG]),
    "an escaped quote": (answer(image(PNG, text=f'{STANDARD[:99_999]}"}}, "x": "{STANDARD[99_999:]}')), "bad_response"),
    "a stray character": (answer(image(PNG, text=STANDARD[:1000] + "!" + STANDARD[1001:])), "bad_response"),
    "the last character's unused bits set": (
        answer(image(PNG, text=STANDARD[:-3] + chr(ord(STANDARD[-3]) + 1) + "==")),
        "bad_response",
    ),
    "cut short in the image": (answer(image(PNG))[:100_000], "bad_response"),
    "a thought image that is not base64": (answer({**image(JPEG, text=BROKEN), "thought": True}, image(PNG)), [PNG]),
    "a thought image that is not JSON": (
        answer({**image(JPEG, text=BROKEN), "thought": True}, image(PNG)).replace(b"\\u0001", b"\x01"),
        "bad_response",
    ),
    "an error before one that is not JSON": (
        answer(image(PNG, text="!!!!"), image(PNG, text=BROKEN)).replace(b"\\u0001", b"\x01"),
        "bad_response",
    ),
    "a second candidate's image that is not JSON": (
        json.dumps(
            {
                "candidates": [
                    json.loads(answer(image(PNG)))["candidates"][0],
                    {"content": {"parts": [image(JPEG, text=BROKEN)]}},
                ]
            }
        )
        .encode()
        .replace(b"\\u0001", b"\x01"),
        "bad_response",
    ),
    "a second candidate's image": (
        json.dumps(
            {"candidates": [json.loads(answer(image(PNG)))["candidates"][0], {"content": {"parts": [image(JPEG)]}}]}
        ).encode(),
        [PNG],
    ),
    "a placeholder sent before a thought image": (
        answer(image(PNG, text="\x00nanobatch-lifted-0"), {**image(JPEG), "thought": True}),
        "bad_response",
    ),
    "a placeholder sent as the image": (
        answer({**image(JPEG), "thought": True}, image(PNG, text="\x00nanobatch-lifted-0")),
        "bad_response",
    ),
    "nested too deep": (b"[" * 100_000 + json.dumps(image(PNG)).encode(), "bad_response"),
}


def outcome(body: lifting.Buffer, size: int | None = None) -> Any:
    try:
        reply = parse_reply(body, size)
    except ApiError as exc:
        return exc.kind, str(exc)
    return [i.data for i in reply.images], reply.text, reply.usage


@pytest.mark.parametrize("case", CASES)
def test_an_image_decoded_from_the_body_is_the_one_parsing_it_whole_gives(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, expected = CASES[case]
    assert STANDARD.endswith("=")  # (PNG's base64 ends in "=": its last character's unused bits count)
    lifted = [outcome(body), outcome(bytearray(body))]
    with mmap.mmap(-1, len(body) + 4096) as block:  # a worker's block of shared memory: bigger than the body
        block[: len(body)] = body
        lifted.append(outcome(block, len(body)))
    monkeypatch.setattr(lifting, "lift", lambda body, size: None)
    whole = outcome(body)
    assert lifted == [whole] * 3
    assert whole[0] == expected


def line_outcome(line: bytes) -> Any:
    decoded = decoding.decode_text("line", line, len(line))
    if decoded is None or isinstance(decoded[1], ApiError):
        return decoded if decoded is None else (decoded[0], decoded[1].kind, str(decoded[1]))
    return decoded[0], [i.data for i in decoded[1].images], decoded[1].usage


@pytest.mark.parametrize("case", CASES)
def test_a_batch_results_line_is_decoded_as_parsing_it_whole_decodes_it(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = b'{"key": "lamp-01", "response": ' + CASES[case][0] + b"}"
    lifted = line_outcome(line)
    monkeypatch.setattr(lifting, "lift", lambda body, size: None)
    assert lifted == line_outcome(line)


def test_what_a_reply_keeps_as_sent_keeps_the_text_not_a_placeholder() -> None:
    # A long "data" string elsewhere (a proxy's own field) is not lifted, nor an escaped one in a text; an image
    # in the usage is lifted, but then kept as sent.
    other = "A" * 100_000
    body = answer(
        {"text": 'it said {\\"inlineData\\": {\\"data\\": \\"' + other + '\\"}}'},
        image(PNG),
        usageMetadata={"totalTokenCount": 7, "debug": {"data": other}, "echo": image(JPEG)},
    )
    lifted = lifting.lift(body, len(body))
    assert lifted is not None and len(lifted.spans) == 2
    reply = parse_reply(body)
    assert reply.images[0].data == PNG and other in (reply.text or "")
    assert reply.usage["debug"] == {"data": other} and reply.usage["echo"] == image(JPEG)


def test_a_batch_results_line_keeps_its_key_and_image_when_lifted() -> None:
    line = json.dumps({"key": "lamp-01", "response": json.loads(answer(image(JPEG, "image/jpeg")))}).encode()
    key, reply = decoding.decode_text("line", bytearray(line), len(line))  # type: ignore[misc]
    assert key == "lamp-01" and not isinstance(reply, ApiError) and reply.images[0].data == JPEG


def test_a_batch_results_line_whose_image_is_not_plain_says_why_as_parsing_it_whole_does() -> None:
    text = f'{STANDARD[:99_999]}"}}, "x": "{STANDARD[99_999:]}'  # an escaped quote: the lifted rest does not parse
    line = json.dumps({"key": "lamp-02", "response": json.loads(answer(image(PNG, text=text)))}).encode()
    key, reply = decoding.decode_text("line", line, len(line))  # type: ignore[misc]
    assert key == "lamp-02" and isinstance(reply, ApiError) and reply.kind == "bad_response"


def test_decoding_an_answer_makes_no_text_of_its_image() -> None:
    """The body, then the image: never the image's base64 as text beside them (a 4K answer: 32 MB more)."""
    picture = b"\x89PNG\r\n\x1a\n" + random.Random(3).randbytes(4 * 2**20)
    body = answer(image(picture))
    with mmap.mmap(-1, len(body)) as block:  # as a worker reads it: in shared memory, no copy of it made
        block[:] = body
        tracemalloc.start()
        try:
            key, reply = decoding.decode_text("answer", block, len(body))  # type: ignore[misc]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert not isinstance(reply, ApiError) and reply.images[0].data == picture
    # The image: 1.0x it. Its text too: 2.33x; a copy of the body as well, as before: 3.67x.
    assert peak < 1.2 * len(picture)


def test_an_answer_with_thought_images_is_not_parsed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts are checked where they are, not by falling back to the whole body (its images made text)."""

    loads = gemini._loads

    def whole_or_not(text: bytes | bytearray) -> Any:
        if len(text) > LIFTING_LEFT:
            raise AssertionError("parsed whole")
        return loads(text)

    monkeypatch.setattr(gemini, "_loads", whole_or_not)
    reply = parse_reply(answer({**image(JPEG), "thought": True}, image(PNG), {**image(JPEG), "thought": True}))
    assert [i.data for i in reply.images] == [PNG]
