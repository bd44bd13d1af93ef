from __future__ import annotations

import nanobatch


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in dir(nanobatch) if not name.startswith("_")} - {"annotations"}
    modules = {name for name in public if type(getattr(nanobatch, name)).__name__ == "module"}
    assert set(nanobatch.__all__) == public - modules
    assert nanobatch.__all__ == sorted(nanobatch.__all__)
