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

from nanobatch.api import decoding, lifting
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
}


def outcome(body: lifting.Buffer, size: int | None = None) -> Any:
    try:
        reply = parse_reply(body, size)
    except ApiError as exc:
        return exc.kind
    return [i.data for i in reply.images]


@pytest.mark.parametrize("case", CASES)
def test_an_image_decoded_from_the_body_is_the_one_parsing_it_whole_gives(case: str) -> None:
    body, expected = CASES[case]
    assert expected == "bad_response" or PNG in expected  # (PNG's base64 ends in "=": its last bits count)
    assert STANDARD.endswith("=")
    assert outcome(body) == expected
    assert outcome(bytearray(body)) == expected
    with mmap.mmap(-1, len(body) + 4096) as block:  # a worker's block of shared memory: bigger than the body
        block[: len(body)] = body
        assert outcome(block, len(body)) == expected


def test_only_the_data_of_an_inline_image_is_lifted() -> None:
    # A long "data" string elsewhere (a proxy's own field) is kept as sent, and an escaped one in a text too.
    other = "A" * 100_000
    body = answer(
        {"text": 'it said {\\"inlineData\\": {\\"data\\": \\"' + other + '\\"}}'},
        image(PNG),
        usageMetadata={"totalTokenCount": 7, "debug": {"data": other}},
    )
    lifted = lifting.lift(body, len(body))
    assert lifted is not None and len(lifted.spans) == 1
    reply = parse_reply(body)
    assert reply.images[0].data == PNG
    assert reply.usage["debug"] == {"data": other} and other in (reply.text or "")


def test_a_batch_results_line_keeps_its_key_and_image_when_lifted() -> None:
    line = json.dumps({"key": "lamp-01", "response": json.loads(answer(image(JPEG, "image/jpeg")))}).encode()
    key, reply = decoding.decode_text("line", bytearray(line), len(line))  # type: ignore[misc]
    assert key == "lamp-01" and not isinstance(reply, ApiError) and reply.images[0].data == JPEG


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
