"""Rows of the manifest that turned bad since the run's check, told when the run reaches where they were.

A run reads its items ahead of the workers (their records in batches, bucket objects in batches), so the
manifest's reader meets such a row before any worker gets there. It is told (logged, counted as failed) only
when the item after it is taken, as if read one at a time: a run stopped before then (a deadline, a signal,
a budget) does not count rows it never reached."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from ..errors import Problem
from .stats import RunStats

__all__ = ["ChangedRows"]

logger = logging.getLogger("nanobatch")

T = TypeVar("T")


class ChangedRows:
    """:meth:`note` is the reader's ``on_problem``; :meth:`read` wraps the reader's items, :meth:`taken` the
    items as the workers take them (after any reading ahead)."""

    def __init__(self, stats: RunStats) -> None:
        self.stats = stats
        self._read = 0  # items the reader has given so far
        self._found: collections.deque[tuple[int, list[Problem]]] = collections.deque()  # (items before it, ...)

    def note(self, problems: list[Problem]) -> None:
        self._found.append((self._read, problems))

    def read(self, items: Iterable[T]) -> Iterator[T]:
        for item in items:
            self._read += 1
            yield item

    def taken(self, items: Iterable[T]) -> Iterator[T]:
        for taken, item in enumerate(items):
            self._tell(taken)
            yield item
        self._tell(self._read)  # all read and taken: the rows after the last item too

    def _tell(self, up_to: int) -> None:
        while self._found and self._found[0][0] <= up_to:
            problems = self._found.popleft()[1]
            for problem in problems:
                logger.error("%s (changed since the check at the start of the run: skipped)", problem)
            self.stats.failed += 1  # counted as failed (exit 1), with no record
            self.stats.failures["manifest"] += 1
