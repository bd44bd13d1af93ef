"""Nearest-rank percentiles: of a sorted sequence, and of one in any order without sorting a copy of it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["percentile", "unsorted_percentile"]


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank *q* quantile (0 < q <= 1) of an ascending, non-empty sequence."""
    return ordered[_rank(len(ordered), q)]


def _rank(n: int, q: float) -> int:
    return min(n - 1, max(0, math.ceil(q * n) - 1))


_BUCKETS = 1024
_SORTED_UP_TO = 4096  # values in the bucket that holds the rank, few enough to sort


def unsorted_percentile(values: Sequence[float], q: float) -> float:
    """:func:`percentile` of a non-empty sequence in any order, without a sorted copy of it (a run's latencies are
    8 bytes each in an array, 32 in a sorted list: 32 MB at a million items): the values are counted in buckets
    between the least and the greatest, then within the bucket that holds the rank, until few are left to sort."""
    rank, low, high = _rank(len(values), q), min(values), max(values)
    while high > low:
        width = (high - low) / _BUCKETS
        counts, below = [0] * _BUCKETS, 0
        for value in values:
            if value < low:
                below += 1
            elif value <= high:
                counts[min(_BUCKETS - 1, int((value - low) / width))] += 1
        for bucket, count in enumerate(counts):  # noqa: B007 (the one found, used below)
            if below + count > rank:
                break
            below += count
        inside = (v for v in values if low <= v <= high and min(_BUCKETS - 1, int((v - low) / width)) == bucket)
        if count <= _SORTED_UP_TO:
            return sorted(inside)[rank - below]
        low, high = _bounds(inside)  # those below it are below its least, those above above its greatest
    return low


def _bounds(values: Iterable[float]) -> tuple[float, float]:
    stream = iter(values)
    low = high = next(stream)
    for value in stream:
        low, high = min(low, value), max(high, value)
    return low, high
