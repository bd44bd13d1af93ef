from __future__ import annotations

if __name__ == "__main__":
    # Imported here, not at the top: worker processes (limits.workers) load this file as __mp_main__, and need
    # none of the command line.
    from nanobatch.cli.main import entrypoint

    entrypoint()
