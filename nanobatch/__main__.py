from __future__ import annotations

from nanobatch.cli.main import entrypoint  # absolute: worker processes load this file as __mp_main__

if __name__ == "__main__":
    entrypoint()
