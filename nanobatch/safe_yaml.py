"""YAML for manifests and config files: PyYAML's safe loader, made stricter where YAML 1.1 surprises.

Parsed by libyaml (``yaml.CSafeLoader``, faster: bench/RESULTS.md) where PyYAML was built with it, else by
PyYAML's pure-Python parser; every rule below is applied the same way on both (it lives in the constructor
and the node walk, which both share).

* Safe: only plain data (mappings, lists, strings, numbers, booleans, null); a ``!!python/...`` tag is an
  error, as with ``yaml.safe_load``.
* A key written twice in one mapping is an error (the second would silently win).
* In a manifest, a number whose text YAML 1.1 would change stays the text the user wrote: ``00123`` (octal
  83), ``1_000``, ``12:30`` (base 60: 750), ``1.50``, ``0x1A``; so do ``yes``, ``no``, ``on`` and ``off`` (only
  ``true`` and ``false`` are booleans) and dates. An id or a ratio keeps what was written. Config files hold
  settings, so there numbers stay numbers.
* A tag on a value it does not fit (``!!int ''``, ``!!bool maybe``, ``!!set [a]``) is a YAML error with its
  line, whatever PyYAML's constructor raised.
* Aliases may not add more than :data:`MAX_VALUES` values to a document (to one item of a streamed
  manifest, or one of its top-level keys), and nesting too deep for Python is an error, not a crash.

A manifest is streamed, item by item, with these loaders and rules: :mod:`nanobatch.job.yaml_stream`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from types import GeneratorType
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "C_LOADERS", "LOADERS", "MAX_VALUES", "MERGE_TAG", "PURE_LOADERS", "load_yaml", "refuse_expansion", "too_deep",
]  # fmt: skip

MAX_VALUES = 5_000_000  # what aliases may add to a document
_COUNT_UP_TO = 100 * MAX_VALUES  # expansion is counted no further (a billion laughs stops here)
MERGE_TAG = "tag:yaml.org,2002:merge"


def _strict(base: type[Any]) -> type[Any]:
    """*base* (a safe loader), refusing a key given twice (config files: settings, where numbers are numbers)."""

    class Loader(base):  # type: ignore[misc]
        def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, MappingNode):  # else ("!!set [a]") PyYAML's says it expected a mapping
                _refuse_duplicate_keys(node)
            return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]

    return Loader


def _refuse_duplicate_keys(node: MappingNode) -> None:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
            continue  # keys merged in with "<<: *base" may be overridden: that is what merging is for
        if key_node.value in seen:
            raise ConstructorError("while reading a mapping", node.start_mark,
                                   f"the key {key_node.value!r} is given twice (the second would silently win)",
                                   key_node.start_mark)  # fmt: skip
        seen.add(key_node.value)


def _as_written(constructor: Any) -> Any:
    def construct(loader: SafeConstructor, node: ScalarNode) -> Any:
        value = constructor(loader, node)
        text = str(node.value)
        return value if str(value) == text.lower() else text

    return construct


def _bool(loader: SafeConstructor, node: ScalarNode) -> Any:
    # YAML 1.1 also reads yes/no/on/off as booleans: "name: on" or "id: no" would not be text.
    text = str(node.value)
    return loader.construct_yaml_bool(node) if text.lower() in ("true", "false") else text


def _text(loader: SafeConstructor, node: ScalarNode) -> Any:
    return str(node.value)


def _keeping_text(base: type[Any]) -> type[Any]:
    """Also keeps what YAML 1.1 would turn into another value as the text written (manifests: ids, names,
    ratios, instructions; none of their fields is a number)."""

    class AsWrittenLoader(base):  # type: ignore[misc]
        pass

    AsWrittenLoader.add_constructor("tag:yaml.org,2002:bool", _bool)
    AsWrittenLoader.add_constructor("tag:yaml.org,2002:int", _as_written(SafeConstructor.construct_yaml_int))
    AsWrittenLoader.add_constructor("tag:yaml.org,2002:float", _as_written(SafeConstructor.construct_yaml_float))
    AsWrittenLoader.add_constructor("tag:yaml.org,2002:timestamp", _text)  # id: 2024-01-15 is an id, not a date
    return AsWrittenLoader


def _loaders(base: type[Any]) -> tuple[type[Any], type[Any]]:
    """(config loader, manifest loader) on the parser of *base*, each constructor of either refusing with a
    YAML error what it cannot read."""
    plain = _strict(base)
    loaders = plain, _keeping_text(plain)
    for loader in loaders:
        for tag, constructor in list(loader.yaml_constructors.items()):
            if not hasattr(constructor, "refusing"):  # not one the loader it extends has wrapped already
                loader.add_constructor(tag, _refusing(constructor))
    return loaders


def _refusing(constructor: Any) -> Any:
    """*constructor*, raising :class:`ConstructorError` (with the node's line) for a value it cannot read, for
    whatever it raised (PyYAML's own let ``!!int x`` raise ValueError, ``!!int ''`` IndexError, ``!!bool x``
    KeyError, ``!!timestamp x`` AttributeError), also in the steps a constructor takes later (a generator)."""

    def construct(loader: SafeConstructor, node: Node) -> Any:
        with _refused(node):
            data = constructor(loader, node)
        return _steps(data, node) if isinstance(data, GeneratorType) else data

    construct.refusing = constructor  # type: ignore[attr-defined]
    return construct


def _steps(steps: Generator[Any, None, None], node: Node) -> Generator[Any, None, None]:
    with _refused(node):
        yield from steps


@contextlib.contextmanager
def _refused(node: Node) -> Iterator[None]:
    try:
        yield
    except (yaml.YAMLError, RecursionError):
        raise
    except Exception as exc:
        raise _unreadable(node) from exc


def _unreadable(node: Node) -> ConstructorError:
    what = "a list" if isinstance(node, SequenceNode) else "a mapping"
    if isinstance(node, ScalarNode):
        what = repr(node.value)
    return ConstructorError(None, None, f"{what} cannot be read as {node.tag.rsplit(':', 1)[-1]}", node.start_mark)


PURE_LOADERS = _loaders(yaml.SafeLoader)
C_LOADERS = _loaders(yaml.CSafeLoader) if getattr(yaml, "__with_libyaml__", False) else None
LOADERS = C_LOADERS or PURE_LOADERS  # the pair load_yaml uses


def load_yaml(text: str, *, as_written: bool = True) -> Any:
    """The document in *text* as plain data; :class:`yaml.YAMLError` (with a line) when it is not acceptable.

    *as_written* (manifests): numbers, yes/no and dates that YAML 1.1 would change stay the text written.
    Without it (config files), they are YAML's values, as settings want them."""
    loader = LOADERS[as_written](text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        refuse_expansion(node, {})
        return loader.construct_document(node)
    except (RecursionError, yaml.MarkedYAMLError) as exc:
        raise too_deep(exc) from None
    finally:
        loader.dispose()


def too_deep(exc: RecursionError | yaml.MarkedYAMLError) -> BaseException:
    """*exc*, or, for nesting too deep, the one error said the same way for both parsers."""
    if isinstance(exc, RecursionError):
        return yaml.YAMLError("it is nested too deeply")
    if "nesting depth" not in str(exc.problem):
        return exc
    # libyaml stops at 1,000 levels, before Python's recursion limit: the same error, said the same way.
    line = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
    return yaml.YAMLError(f"it is nested too deeply{line}")


def refuse_expansion(node: Node, sizes: dict[int, int], known: dict[int, int] | None = None) -> None:
    """Raises :class:`yaml.YAMLError` when *node*'s aliases add more than :data:`MAX_VALUES` values to what is
    written; fills *sizes* (see :func:`expanded_size`)."""
    if expanded_size(node, sizes, known) - len(sizes) > MAX_VALUES:
        raise yaml.YAMLError(
            f"its aliases (*name) expand it by more than {MAX_VALUES:,} values; write the values out instead"
        )


def expanded_size(node: Node, sizes: dict[int, int], known: dict[int, int] | None = None) -> int:
    """How many values *node* stands for once every alias is expanded (each shared node counted once per use).
    *known*: sizes of nodes counted before (anchored in an earlier item), not counted again in *sizes*."""
    if (size := sizes.get(id(node))) is not None:
        return size
    if known is not None and (size := known.get(id(node))) is not None:
        return size
    size = 1
    if isinstance(node, SequenceNode):
        size += sum(expanded_size(child, sizes, known) for child in node.value)
    elif isinstance(node, MappingNode):
        size += sum(expanded_size(k, sizes, known) + expanded_size(v, sizes, known) for k, v in node.value)
    sizes[id(node)] = size = min(size, _COUNT_UP_TO)
    return size
