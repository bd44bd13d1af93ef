"""Images lifted out of a JSON body before it is parsed, and decoded straight from the body's own bytes.

A 2K answer is 8 MB of JSON, nearly all of it one string: the image in base64. Parsed whole, that string
becomes an 8 MB Python ``str`` beside the body, and the image's 6 MB beside that (a 4K answer: 32, 32 and 24 MB),
and decoding it costs 4.4 ms (pydantic-core; the standard library's ``binascii``: 14 ms). Lifted: each long
``"data"`` string of an ``inlineData`` object is left where it is, the rest of the body (a few hundred bytes) is
parsed with a placeholder in its place, and the image is decoded from the body's bytes by pybase64 (SIMD:
0.5 ms for 2K) when the answer's parts are read. No text of the image is ever made.

Only what is plain is lifted: standard base64, padded, with no JSON escape in it, as Google sends it. Anything
else is parsed whole, as before, so that both ways give the same reply or the same error: URL-safe or unpadded
base64, an escaped ``\\/``, a string cut short, a placeholder left unused (a lifted image where the reply keeps
what was sent, as in the usage), and any error (the whole body says why, in its own order).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from mmap import mmap
from typing import TypeAlias, TypeVar

import pybase64

from ..errors import ApiError

__all__ = ["LIFT_FROM", "Buffer", "Lifted", "Unlifted", "lift", "parsed"]

Buffer: TypeAlias = bytes | bytearray | mmap  # what is lifted from: a body, or the shared memory a worker reads it in

LIFT_FROM = 64 * 1024  # shorter strings are parsed with the rest: lifting them would save little
_KEY = re.compile(rb'"data"\s*:\s*"')
# What comes before the key, back to its object's opening brace: that object is an inlineData (either spelling).
_OPENS = re.compile(rb'"inline_?[dD]ata"\s*:\s*\{[^{}]*\Z')
_LOOK_BACK = 512  # bytes before a key searched for its object's name
_MARK = "\x00nanobatch-lifted-"  # a placeholder's text: a NUL, which base64 never holds
T = TypeVar("T")


class Unlifted(Exception):
    """A lifted image that is not plain base64 after all, or a placeholder left unused: parse the body whole."""


@dataclass
class Lifted:
    """A body's JSON with each lifted image's text replaced by a placeholder (*text*), and where each image's
    text is in the body (*spans*, by placeholder, each used once: :meth:`image` or :meth:`skip`)."""

    text: bytes
    body: Buffer
    spans: dict[str, tuple[int, int]]

    def image(self, data: str) -> bytes | None:
        """The image a placeholder stands for, decoded from the body; None if *data* is not a placeholder.
        :class:`Unlifted` if the text is not plain base64."""
        span = self.spans.pop(data, None) if data.startswith(_MARK) else None
        if span is None:
            return None
        with _piece(self.body, *span) as piece:
            try:
                image = pybase64.b64decode(piece, validate=True)
            except ValueError:  # binascii.Error: another alphabet, no padding, a JSON escape, a stray byte
                raise Unlifted from None
            # pybase64 lets the unused bits of the last character be anything; a strict decoder does not.
            if pybase64.b64encode(pybase64.b64decode(piece[-4:])) != piece[-4:]:
                raise Unlifted
        return image

    def skip(self, data: object) -> None:
        """A placeholder in a part that is not read (a thought's draft image): its text is checked all the same,
        as parsing the body whole would have."""
        if isinstance(data, str):
            self.image(data)

    def done(self) -> None:
        """:class:`Unlifted` if a placeholder was not used: it is somewhere a reply keeps as sent (the usage, a
        second candidate), where its text must be, not the placeholder."""
        if self.spans:
            raise Unlifted


def parsed(body: Buffer, size: int, parse: Callable[[bytes | bytearray, Lifted | None], T]) -> T:
    """``parse(text, lifted)`` of the first *size* bytes of *body*, its big images lifted out; or, if none is, or
    if that raises :class:`Unlifted` or :class:`~nanobatch.errors.ApiError` (not as plain as it looked, or not an
    answer), ``parse`` of the whole text with *lifted* None, which says why in its own order."""
    if (lifted := lift(body, size)) is not None:
        with contextlib.suppress(Unlifted, ApiError):
            return parse(lifted.text, lifted)
    return parse(body if isinstance(body, bytes | bytearray) and len(body) == size else body[:size], None)


def lift(body: Buffer, size: int) -> Lifted | None:
    """The first *size* bytes of *body* with its long images' text lifted out; None if there is none to lift
    (parse it whole)."""
    pieces: list[bytes | bytearray] = []
    spans: dict[str, tuple[int, int]] = {}
    at = searched = 0
    while (found := _KEY.search(body, searched, size)) is not None:
        start = searched = found.end()
        if not _OPENS.search(body, max(at, start - _LOOK_BACK), found.start()):
            continue
        end = body.find(b'"', start, size)
        # An escaped quote taken for the text's end leaves one quote too many in the rest: it does not parse, and
        # the body is parsed whole. Any other escape fails in Lifted.image.
        if end - start < LIFT_FROM:
            continue  # short, or cut short (-1): parsed with the rest
        if not spans:  # a token not one the body can hold: a placeholder it sends is just text
            mark = f"{_MARK}{secrets.token_hex(8)}-"
        placeholder = f"{mark}{len(spans)}"
        pieces += (body[at:start], placeholder.encode().replace(b"\x00", b"\\u0000"))
        spans[placeholder] = (start, end)
        at = searched = end  # the image's text is not searched for keys: it holds none
    if not spans:
        return None
    pieces.append(body[at:size])
    return Lifted(b"".join(pieces), body, spans)


@contextmanager
def _piece(body: Buffer, start: int, end: int) -> Iterator[memoryview]:
    """A view of ``body[start:end]``, released after use (a bytearray cannot be emptied while one is held)."""
    with memoryview(body) as whole, whole[start:end] as piece:
        yield piece
