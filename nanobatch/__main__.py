from __future__ import annotations

from .cli.main import entrypoint

if __name__ == "__main__":
    entrypoint()
