"""Telling the operator what fails while requests are retried (the first failure at once, then summaries),
and answers whose cost their usage cannot tell.

A run that cannot reach its API (a wrong base URL: "connection refused") must
say so as soon as it starts, not after ten minutes of progress lines; a run of
10,000 requests through a flaky proxy must not print a warning per retry.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import anyio

from ..errors import ApiError

__all__ = ["FailureLog"]

logger = logging.getLogger("nanobatch")

# Not told: 429s are the throttle's business (they shrink the window and show in the retry count), and a
# 200 without an image is the model's answer, not a failing API.
_QUIET_KINDS = frozenset({"rate_limited", "no_image"})


class FailureLog:
    """The first retried failure of each kind at warning level, saying what fails and where; later ones are
    counted and told together at most once per *interval_s* (at the first failure after it has passed).

    >>> failures = FailureLog()
    >>> failures.failed(error)     # "a request failed: cannot connect to http://...: connection refused; ..."
    """

    def __init__(self, where: str = "", *, interval_s: float = 60.0) -> None:
        self.where = where  # the API's URL, named in the first warning unless the error already says it
        self.interval_s = interval_s
        self._told: set[str] = set()  # kinds whose first failure was told
        self._repeats: Counter[str] = Counter()  # failures not told yet, by kind
        self._latest: dict[str, str] = {}
        self._told_at = -math.inf

    def failed(self, error: ApiError) -> None:
        """A request failed and will be retried."""
        if error.kind in _QUIET_KINDS:
            return
        now = anyio.current_time()
        if error.kind not in self._told:
            self._told.add(error.kind)
            self._told_at = now
            to = f" to {self.where}" if self.where and self.where not in error.message else ""
            logger.warning(
                "a request%s failed: %s; retrying (more %s failures are summarised, at most once a minute)",
                to,
                error.message,
                error.kind,
            )
            return
        self._repeats[error.kind] += 1
        self._latest[error.kind] = error.message
        if now - self._told_at >= self.interval_s:
            for kind, count in self._repeats.most_common():
                logger.warning(
                    "%d more %s failures in the last %.0f s, retried (latest: %s)",
                    count,
                    kind,
                    now - self._told_at,
                    self._latest[kind],
                )
            self._repeats.clear()
            self._told_at = now

    def unpriced(self, problem: str, worst_case_usd: float) -> None:
        """An answer's usage could not be priced: told once a run, as it is likely true of every answer."""
        if "unpriced" in self._told:
            return
        self._told.add("unpriced")
        logger.warning(
            "%s: such answers are counted at the request's worst case ($%.4f here), so that --max-cost holds; "
            "a proxy that strips usageMetadata makes every cost an upper bound",
            problem,
            worst_case_usd,
        )
