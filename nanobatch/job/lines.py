"""A source file's lines, decoded one at a time so that a byte that is not UTF-8 is named by its line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..api import storage
from ..errors import StorageError

__all__ = ["NotUtf8Line", "Utf8Lines", "file_stamp", "json_line"]


class NotUtf8Line(ValueError):
    """A line of a source file holds a byte that is not UTF-8."""

    def __init__(self, line: int, byte: int) -> None:
        super().__init__(f"line {line} is not UTF-8 text (byte {byte:#04x})")
        self.line = line
        self.byte = byte


class Utf8Lines:
    """A source file's lines, each decoded as it is read (a UTF-8 BOM is dropped), so that a byte that is
    not UTF-8 is reported with its line number rather than an offset in a buffer."""

    def __init__(self, path: Path | str) -> None:
        if isinstance(path, str):  # a bucket URL: read in blocks as the lines are consumed
            try:
                self._file: BinaryIO = storage.open_read(path)
            except StorageError as exc:
                raise OSError(str(exc).removeprefix(f"{path}: ")) from None
        else:
            self._file = path.open("rb")
        self.line = 0

    def __iter__(self) -> Utf8Lines:
        return self

    def __next__(self) -> str:
        raw = self._file.readline()
        if not raw:
            raise StopIteration
        self.line += 1
        if self.line == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotUtf8Line(self.line, raw[exc.start]) from None

    def skip_to(self, offset: int, line: int) -> None:
        """Go on reading at byte *offset* (the start of a line), *line* lines having been read before it."""
        self._file.seek(offset)
        self.line = line

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Utf8Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def json_line(line: str) -> Any:
    """*line* as ``json.loads`` reads it (orjson, faster, where the two agree: everywhere but integers beyond 64
    bits, which orjson makes floats of), but for ``NaN``: not JSON, though Python's ``json.dumps`` writes a
    missing value (pandas' NaN) so; read as no value, like ``null``, not as the text "nan". ``Infinity`` is
    refused."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:  # json reads NaN and 1e400, and its message is the one given
        return json.loads(line, parse_constant=_constant)
    return json.loads(line) if _may_be_big_int(value) else value


def _constant(name: str) -> None:
    if name == "NaN":
        return None
    raise ValueError(f"{name} is not JSON (nor a value an item field takes)")


def _may_be_big_int(value: Any) -> bool:
    """Whether *value* holds a float as big as an integer orjson would not keep (``0.5`` is read alike)."""
    if type(value) is dict:
        return any(map(_may_be_big_int, value.values()))
    if type(value) is list:
        return any(map(_may_be_big_int, value))
    return type(value) is float and abs(value) >= 2**63


def file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of the file at *path*: it changed if they did."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
