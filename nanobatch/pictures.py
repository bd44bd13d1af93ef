"""What a picture is: its type by its first bytes (:func:`sniff_mime`), and a cheap check that it can be
decoded: headers and sizes, never a full decode. Inputs, the manifest's check and answers all ask here.

:func:`picture_problem`, on bytes in memory (a picture about to be sent): PNG by
what Pillow's ``verify`` checks (every chunk's CRC, through IEND); JPEG by its headers, then an
EOI marker after the main image's start of scan (a truncated file has none; an EXIF
thumbnail's own EOI, before the scan, does not count); WEBP by the RIFF header's size.
:func:`file_problem`, on a file (``nanobatch validate``), and :func:`answer_problem`, on an answer's image:
the type, the same headers, and the end only (a PNG ends with IEND, a JPEG with EOI), so that checking a
catalog reads a few kilobytes per picture and checking a 6 MB answer costs what a small one does. A file's
headers are walked here, as Pillow's open walks them (chunk CRCs, the PNG's IHDR, the JPEG's frame header), at a
fraction of its cost: validate reads them for every input of a catalog.
HEIC/HEIF are not checked (Pillow cannot read them).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

__all__ = ["ACCEPTED_TYPES", "answer_problem", "file_problem", "picture_problem", "sniff_mime"]

# What Gemini takes as an input image; anything else is refused before it is sent (and by validate).
ACCEPTED_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})

# Markers without a length field: SOI, EOI, RSTn, TEM.
_STANDALONE = {0xD8, 0xD9, 0x01, *range(0xD0, 0xD8)}


def sniff_mime(data: bytes) -> str | None:
    """The image type from its first bytes: PNG, JPEG, WEBP, HEIC/HEIF, GIF; None if unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"):
            return "image/heic"
        if brand in (b"mif1", b"msf1", b"avif"):
            return "image/avif" if brand == b"avif" else "image/heif"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def picture_problem(data: bytes) -> str | None:
    """Why *data* cannot be decoded as the picture it claims to be, or None (also for types not checked)."""
    mime = sniff_mime(data)
    if mime == "image/webp":
        return _webp_problem(data, len(data))
    # What Pillow's open and verify check, walked here at a fraction of their cost; only a picture that does not
    # look right is opened by Pillow, which then says what is wrong (or that nothing is).
    if not _looks_right(data, mime) and (problem := _open_problem(data, mime, verify=True)):
        return problem
    if mime == "image/jpeg" and not _jpeg_scan_ends(data):
        return _damaged("JPEG", "the image data stops before its end marker")
    return None


_HEAD_BYTES = 64  # enough to tell the type and a WEBP's size
_FIRST_READ = 64 << 10  # a file's first read: its headers, most often, and the whole of a small picture
_TAIL_BYTES = 16  # enough for an end marker and a little padding after it
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def file_problem(path: str) -> str | None:
    """Why the picture at *path* cannot be decoded, reading its first and last bytes only; OSError if unreadable.

    Its first :data:`_FIRST_READ` bytes are read at once, and its headers walked in them; a file whose headers
    run past them is walked in the file itself. A JPEG that does not end with EOI (data appended after the
    image, as in motion photos) is read whole and its scan looked through for EOI.
    """
    # os.pread rather than a buffered file: validate does this for every input of a catalog, and a buffered
    # file's opening, reads and seeks cost twice the system calls themselves.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        first = os.pread(fd, _FIRST_READ, 0)
        tail = first[-_TAIL_BYTES:] if len(first) >= size else os.pread(fd, _TAIL_BYTES, max(0, size - _TAIL_BYTES))
        mime = sniff_mime(first[:_HEAD_BYTES])
        if mime not in ACCEPTED_TYPES:
            what = f"it is {mime}" if mime else "not a picture by its first bytes"
            return f"it is not a PNG, JPEG, WEBP or HEIC/HEIF image ({what})"

        def headers(_: object, kind: str | None) -> str | None:
            if _headers_right(io.BytesIO(first), kind):  # a walk that stays within the first read
                return None
            if len(first) >= size:
                return _open_problem(first, kind, verify=False)
            with io.FileIO(fd, closefd=False) as f:
                return _header_problem(io.BufferedReader(f), kind)

        def whole() -> bytes:
            return first if len(first) >= size else b"".join(_chunks(fd, size))

        return _ends_problem(mime, first[:_HEAD_BYTES], tail, size, None, whole, headers)
    finally:
        os.close(fd)


def _chunks(fd: int, size: int) -> Iterator[bytes]:
    offset = 0
    while offset < size and (chunk := os.pread(fd, min(size - offset, 1 << 24), offset)):
        yield chunk
        offset += len(chunk)


def answer_problem(data: bytes) -> str | None:
    """Why an image an answer carries cannot be decoded, or None: checked like :func:`file_problem`, at a cost
    that does not grow with the image (a damaged middle of a PNG's pixel data goes unseen: only a full decode
    finds it, at 70 ms per 2K image)."""
    head = data[:_HEAD_BYTES]
    if (mime := sniff_mime(head)) is None:
        return "it is not a picture by its first bytes"
    return _ends_problem(mime, head, data[-_TAIL_BYTES:], len(data), io.BytesIO(data), lambda: data, _header_problem)


def _ends_problem(
    mime: str,
    head: bytes,
    tail: bytes,
    size: int,
    source: Any,
    whole: Callable[[], bytes],
    headers: Callable[[Any, str | None], str | None] | None = None,
) -> str | None:
    """Why a picture of type *mime* is damaged, by its *head*, *tail* and *size*, its headers read from *source*
    (by *headers*; else by Pillow opening it), and only for a JPEG whose *tail* is not EOI, a look through
    *whole* for the end of its scan."""
    if mime == "image/png" and not tail.endswith(_PNG_END):
        return _damaged("PNG", "the file stops before its end chunk")
    if mime == "image/webp" and len(head) >= 8:
        return _webp_problem(head, size)
    if headers is not None:
        if problem := headers(source, mime):
            return problem
    elif problem := _open_problem(source, mime, verify=False):  # Pillow reads only the headers it needs
        return problem
    if mime == "image/jpeg" and not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9") and not _jpeg_scan_ends(whole()):
        return _damaged("JPEG", "the image data stops before its end marker")
    return None


def _open_problem(source: bytes | BinaryIO, mime: str | None, *, verify: bool) -> str | None:
    """What Pillow says opening (and, with *verify*, verifying) *source*; None for types not checked."""
    if mime not in ("image/png", "image/jpeg"):
        return None
    from PIL import Image, UnidentifiedImageError  # only when a picture is checked: the CLI starts without Pillow

    kind = "PNG" if mime == "image/png" else "JPEG"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as picture:
            if verify:
                picture.verify()  # PNG: chunk CRCs; JPEG: nothing more than the headers read by open()
    except UnidentifiedImageError:
        return _damaged(kind, "its headers cannot be read")
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        return _damaged(kind, str(exc) or type(exc).__name__)
    except Image.DecompressionBombError as exc:
        return f"it cannot be decoded: {exc}"
    return None


# What Pillow refuses to open as a decompression bomb: twice its default Image.MAX_IMAGE_PIXELS.
_MAX_PIXELS = 2 * 89_478_485
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # by colour type
_HEADERS_UP_TO = 1 << 20  # headers (metadata, colour profiles) walked before the image data


def _header_problem(f: BinaryIO, mime: str | None) -> str | None:
    """What Pillow's open finds wrong in the headers of the PNG or JPEG file *f*. They are walked here first,
    without Pillow (a few small reads; validate does this for every input of a catalog): only a file whose
    headers do not look right is opened by Pillow, which then says what is wrong (or that nothing is)."""
    if _headers_right(f, mime):
        return None
    f.seek(0)
    return _open_problem(f, mime, verify=False)


def _headers_right(f: BinaryIO, mime: str | None) -> bool:
    """Whether the headers of the PNG or JPEG in *f* look right, walked without Pillow; False when the walk
    runs past the end of *f*."""
    try:
        return (_png_headers_right if mime == "image/png" else _jpeg_headers_right)(f)
    except struct.error:
        return False


def _png_headers_right(f: BinaryIO) -> bool:
    """The chunks before the image data: each whole with its CRC right, the first an IHDR Pillow opens."""
    f.seek(8)
    first, read = True, 0
    while read < _HEADERS_UP_TO:
        top = f.read(8)
        (length,), kind = struct.unpack(">I", top[:4]), top[4:]
        if kind == b"IDAT":
            return not first
        data = f.read(length + 4)
        if len(data) < length + 4 or zlib.crc32(data[:length], zlib.crc32(kind)) != struct.unpack(">I", data[-4:])[0]:
            return False
        if first:
            if kind != b"IHDR" or length != 13:
                return False
            width, height, depth, colour = struct.unpack(">IIBB", data[:10])
            if not width or not height or depth not in _PNG_DEPTHS.get(colour, ()) or width * height > _MAX_PIXELS:
                return False
        first, read = False, read + length + 12
    return False


def _looks_right(data: bytes, mime: str | None) -> bool:
    try:
        if mime == "image/png":
            return _png_chunks_right(data)
        return mime != "image/jpeg" or _jpeg_headers_right(io.BytesIO(data))
    except struct.error:
        return False


def _png_chunks_right(data: bytes) -> bool:
    """Every chunk of the PNG *data* whole with its CRC right, from an IHDR Pillow opens to the IEND:
    what Pillow's ``verify`` checks, at a fraction of its cost."""
    if not _png_headers_right(io.BytesIO(data)):
        return False
    pos, end, crc32, unpack = 8, len(data), zlib.crc32, struct.unpack_from
    while pos + 12 <= end:
        (length,) = unpack(">I", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end or crc32(data[pos + 4 : stop]) != unpack(">I", data, stop)[0]:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos = stop + 4
    return False


def _jpeg_headers_right(f: BinaryIO) -> bool:
    """The segments before the scan, walked by their lengths: one frame header (SOFn) Pillow opens, the scan
    after it, every segment whole."""
    frame, size = False, f.seek(0, os.SEEK_END)
    f.seek(2)
    while f.tell() < _HEADERS_UP_TO:
        top = f.read(4)
        if len(top) < 4 or top[0] != 0xFF or top[1] in _STANDALONE or top[1] < 0xC0 or top[1] == 0xFF:
            return False  # fill bytes, junk, restart markers: Pillow's open knows them all
        marker, (length,) = top[1], struct.unpack(">H", top[2:])
        if marker == 0xDA:
            return frame
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if frame or length < 8:
                return False
            bits, height, width, layers = struct.unpack(">BHHB", f.read(6))
            if bits != 8 or layers not in (1, 3, 4) or not width or not height or width * height > _MAX_PIXELS:
                return False
            frame, length = True, length - 6
        elif marker == 0xDB:  # quantization tables, each 64 values of the size its first byte says
            if length < 2 or not _tables_right(f.read(length - 2)):
                return False
            length = 2
        if length < 2 or f.seek(length - 2, os.SEEK_CUR) > size:
            return False
    return False


def _tables_right(tables: bytes) -> bool:
    """A JPEG's DQT segment holds whole tables: 64 bytes each, or 128 if its first byte's high half says so."""
    pos = 0
    while pos < len(tables):
        pos += 1 + (64 if tables[pos] < 16 else 128)
    return pos == len(tables) > 0


def _damaged(kind: str, detail: str) -> str:
    return f"it cannot be decoded (a {kind} whose data is damaged or cut short: {detail})"


def _jpeg_scan_ends(data: bytes) -> bool:
    """True if an EOI marker follows the first start-of-scan of the main image (segments walked by length)."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xDA:  # start of scan: entropy-coded data, where 0xFF 0xD9 appears only as EOI
            return data.find(b"\xff\xd9", pos + 2 + length) != -1
        pos += 2 + length
    return False


def _webp_problem(head: bytes, size: int) -> str | None:
    """A WEBP of *size* bytes is shorter than its RIFF header (in *head*) says: cut off."""
    (riff_size,) = struct.unpack("<I", head[4:8])
    return None if size >= 8 + riff_size else _damaged("WEBP", "the file is shorter than its header says")
