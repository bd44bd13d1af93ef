"""A Gemini-compatible ``generateContent`` server that edits images with Pillow.

It validates requests like the real API, answers in Google's formats, and
injects latency, faults and quota errors on demand, so nanobatch can be
tested and demonstrated without a key or network.

>>> import httpx2
>>> app = create_app(SimulatorConfig(seed=1, rate_503=0.1))
>>> client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://sim")
"""

from __future__ import annotations

from .app import SimulatorStats, create_app
from .config import FAULT_KINDS, SimulatorConfig
from .errors import SimulatedDrop
from .server import run_in_thread, serve

__all__ = [
    "FAULT_KINDS",
    "SimulatedDrop",
    "SimulatorConfig",
    "SimulatorStats",
    "create_app",
    "run_in_thread",
    "serve",
]
