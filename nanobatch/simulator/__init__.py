"""A Gemini-compatible ``generateContent`` server that edits images with Pillow.

It validates requests like the real API, answers in Google's formats, and
injects latency, faults and quota errors on demand, so nanobatch can be
tested and demonstrated without a key or network.

>>> import httpx2
>>> app = create_app(SimulatorConfig(seed=1, rate_503=0.1))
>>> client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://sim")
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from .config import FAULT_KINDS, SimulatorConfig

if _typing.TYPE_CHECKING:
    from .app import SimulatorStats, create_app
    from .errors import SimulatedDrop
    from .server import run_in_thread, serve

# The app and the server (starlette, uvicorn, Pillow) are imported when first used (PEP 562), so that
# the CLI, which registers the `simulate` command, starts without them.
_LAZY = {"SimulatorStats": "app", "create_app": "app", "SimulatedDrop": "errors", "run_in_thread": "server",
         "serve": "server"}  # fmt: skip


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nanobatch.simulator' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "FAULT_KINDS",
    "SimulatedDrop",
    "SimulatorConfig",
    "SimulatorStats",
    "create_app",
    "run_in_thread",
    "serve",
]
