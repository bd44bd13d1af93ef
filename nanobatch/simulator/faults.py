"""Chance and time: latency, injected faults, per-minute and per-day quotas."""

from __future__ import annotations

import math
import random
import string
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .config import SimulatorConfig

__all__ = ["DailyQuota", "Draw", "SlidingWindow", "draw", "pick_fault", "sample_latency"]

_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True, kw_only=True)
class Draw:
    """Every random choice for one request, drawn at once so a seed replays a run."""

    fault: str | None
    latency_s: float  # simulated seconds, before time_scale
    thought_image: bool
    thought_tokens: int
    response_id: str
    signature: bytes
    image_seed: int


def sample_latency(config: SimulatorConfig, rng: random.Random) -> float:
    """One latency in simulated seconds, never negative."""
    if config.latency == "uniform":
        return max(0.0, rng.uniform(config.latency_s - config.latency_spread, config.latency_s + config.latency_spread))
    if config.latency == "lognormal" and config.latency_s > 0:
        return rng.lognormvariate(math.log(config.latency_s), config.latency_spread)
    return config.latency_s


def pick_fault(config: SimulatorConfig, roll: float) -> str | None:
    """The fault kind (a FAULT_KINDS key) that *roll* in [0, 1) lands on, or None."""
    edge = 0.0
    for kind, rate in config.fault_rates().items():
        edge += rate
        if roll < edge:
            return kind
    return None


def draw(config: SimulatorConfig, rng: random.Random) -> Draw:
    """Draw one request's random choices, always the same number of them."""
    return Draw(
        fault=pick_fault(config, rng.random()),
        latency_s=sample_latency(config, rng),
        thought_image=rng.random() < 0.5,
        thought_tokens=rng.randint(120, 480),
        response_id="".join(rng.choices(_ID_ALPHABET, k=23)),
        signature=rng.randbytes(48),
        image_seed=rng.getrandbits(32),
    )


class SlidingWindow:
    """At most *limit* requests in any *window_s* seconds (a requests-per-minute quota)."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()

    def acquire(self) -> float | None:
        """Take a slot and return None, or return the seconds until one frees."""
        now = self._clock()
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        if len(self._times) < self.limit:
            self._times.append(now)
            return None
        return self._times[0] + self.window_s - now


class DailyQuota:
    """Counts successful requests; exhausted after *limit* of them (no reset: runs are short)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit
