"""The package's layout holds: folders import only from folders below them, every name is imported from the
module that defines it, and no module or function outgrows one sitting (README, Development)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanobatch"

# From the top down; a folder may import from any folder on a lower floor, and from the top-level modules.
FLOORS = [("cli",), ("run",), ("job", "inputs", "output"), ("api",)]
TOP_LEVEL = {"errors", "config", "config_file", "models", "costs", "item", "names", "pictures", "safe_yaml",
             "templates", "scratch", "loopback", "qa", "checks", "children", "percentiles"}  # fmt: skip
FACES = {"nanobatch", "nanobatch.simulator"}  # the public API's faces: users import from them


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return found


MODULES = _modules()


def _imports(module: str, tree: ast.Module) -> list[tuple[str, str, int]]:
    """(module imported from, name, line) for every ``from ... import`` of the package's own modules."""
    is_package = module in MODULES and (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "nanobatch" or target.startswith("nanobatch."):
                found += [(target, alias.name, node.lineno) for alias in node.names]
    return found


def _defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _room(module: str) -> str:
    """The folder a module is in (``run``), or the module itself at the top level (``config``)."""
    return module.split(".")[1] if module.count(".") >= 1 else "nanobatch"


def _floor(room: str) -> int:
    for height, rooms in enumerate(reversed(FLOORS), 1):
        if room in rooms:
            return height
    return 0  # the top-level modules and the simulator: the ground


def test_folders_import_only_from_folders_below_them() -> None:
    upward = []
    for module, tree in MODULES.items():
        room = _room(module)
        if room in ("nanobatch", "__main__") or module == "nanobatch.__main__":
            continue
        for target, name, line in _imports(module, tree):
            other = _room(target)
            if target == "nanobatch" and f"nanobatch.{name}" not in MODULES:
                upward.append(f"{module}:{line} takes {name} from the package's face, the top floor")
                continue
            if other == room or other == "nanobatch":
                continue
            if room in TOP_LEVEL or room == "simulator":
                ok = other in TOP_LEVEL or other == "simulator" and room == "simulator"
            else:
                ok = other in TOP_LEVEL or _floor(other) < _floor(room) or other == "simulator" and room == "run"
            if not ok:
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


def test_every_name_is_imported_from_the_module_that_defines_it() -> None:
    handed_on = []
    for module, tree in MODULES.items():
        for target, name, line in _imports(module, tree):
            if target in FACES or f"{target}.{name}" in MODULES:
                continue  # a public face, or a module imported as such
            if target in MODULES and name not in _defined(MODULES[target]):
                handed_on.append(f"{module}:{line} takes {name} from {target}, which does not define it")
    assert handed_on == []


@pytest.mark.parametrize("limit", [450])
def test_no_module_outgrows_one_sitting(limit: int) -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit}  # fmt: skip
    assert long == {}


def test_no_function_outgrows_one_screen() -> None:
    long = [
        f"{module}:{node.lineno} {node.name}"
        for module, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50
    ]
    assert long == []


def test_subpackage_init_files_are_empty() -> None:
    filled = [str(p) for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "simulator" and p.read_text()]
    filled += [str(p) for p in PACKAGE.glob("*/*/__init__.py") if p.read_text()]
    assert filled == []


def test_every_top_level_module_is_on_the_ground_floor_list() -> None:
    # A module left off TOP_LEVEL would count as the ground and escape the floor check.
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"} == TOP_LEVEL
