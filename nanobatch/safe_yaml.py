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
* Aliases may not add more than :data:`MAX_VALUES` values to a document (to one item of a streamed
  manifest, or one of its top-level keys), and nesting too deep for Python is an error, not a crash.

A manifest is streamed (:func:`read_top`, :func:`stream_items`): read event by event, each item of ``items:``
composed, checked and constructed on its own by the same loader, so memory does not grow with the items. Its
other top-level keys may come before or after ``items:`` (:func:`read_top` says how); each pass reads the
document again. Anchored nodes (``&name``) are kept for the rest of a pass: a later alias may use them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "C_LOADERS", "LOADERS", "MAX_VALUES", "PURE_LOADERS", "ItemsFound", "StreamedItem", "load_yaml", "read_top",
    "stream_items",
]  # fmt: skip

MAX_VALUES = 5_000_000  # what aliases may add to a document
_COUNT_UP_TO = 100 * MAX_VALUES  # expansion is counted no further (a billion laughs stops here)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _strict(base: type[Any]) -> type[Any]:
    """*base* (a safe loader), refusing a key given twice (config files: settings, where numbers are numbers)."""

    class Loader(base):  # type: ignore[misc]
        def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
            _refuse_duplicate_keys(node)
            return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]

    return Loader


def _refuse_duplicate_keys(node: MappingNode) -> None:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
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
    """(config loader, manifest loader) on the parser of *base*."""
    plain = _strict(base)
    return plain, _keeping_text(plain)


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
        sizes: dict[int, int] = {}
        added = _expanded_size(node, sizes) - len(sizes)  # what the aliases add to the values written
        if added > MAX_VALUES:
            raise yaml.YAMLError(
                f"its aliases (*name) expand it by more than {MAX_VALUES:,} values; write the values out instead"
            )
        return loader.construct_document(node)
    except (RecursionError, yaml.MarkedYAMLError) as exc:
        raise _too_deep(exc) from None
    finally:
        loader.dispose()


def _too_deep(exc: RecursionError | yaml.MarkedYAMLError) -> BaseException:
    """*exc*, or, for nesting too deep, the one error said the same way for both parsers."""
    if isinstance(exc, RecursionError):
        return yaml.YAMLError("it is nested too deeply")
    if "nesting depth" not in str(exc.problem):
        return exc
    # libyaml stops at 1,000 levels, before Python's recursion limit: the same error, said the same way.
    line = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
    return yaml.YAMLError(f"it is nested too deeply{line}")


def _expanded_size(node: Node, sizes: dict[int, int], known: dict[int, int] | None = None) -> int:
    """How many values *node* stands for once every alias is expanded (each shared node counted once per use).
    *known*: sizes of nodes counted before (anchored in an earlier item), not counted again in *sizes*."""
    if (size := sizes.get(id(node))) is not None:
        return size
    if known is not None and (size := known.get(id(node))) is not None:
        return size
    size = 1
    if isinstance(node, SequenceNode):
        size += sum(_expanded_size(child, sizes, known) for child in node.value)
    elif isinstance(node, MappingNode):
        size += sum(_expanded_size(k, sizes, known) + _expanded_size(v, sizes, known) for k, v in node.value)
    sizes[id(node)] = size = min(size, _COUNT_UP_TO)
    return size


# --- a manifest, streamed --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemsFound:
    """What the first pass learnt of ``items:`` (a list) without building its items: how many, and its line."""

    count: int | None  # None: not counted (see read_top)
    line: int


@dataclass(frozen=True, slots=True)
class StreamedItem:
    """One item of ``items:``: its value, or the error that kept it from being read; its line and an id, if its
    mapping gives one plainly (to name it in that error)."""

    value: Any
    error: yaml.YAMLError | None
    line: int
    id: str | None = None


_STR_TAG, _SEQ_TAG, _MAP_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
_NODE_STARTS = (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)


class _Slow(Exception):  # a node the fast reading leaves to PyYAML's constructor
    pass


_NOT_A_MAPPING = object()  # what _Pass.top_keys gives for a document that is not a mapping


class _Pass:
    """One reading of a manifest's document, event by event, with the manifest loader's resolver and
    constructor: a node is composed only where it is wanted, the rest skipped event by event."""

    def __init__(self, stream: IO[str]) -> None:
        self.loader = LOADERS[True](stream)
        self.anchors: dict[str, Node] = {}
        self.known: dict[int, int] = {}  # expanded sizes of anchored nodes, by id (kept alive by self.anchors)
        self.aliased = False  # whether the node being read holds an alias
        self.top_block = False  # whether the document is a block mapping at the left margin
        self.scalars = type(self.loader).yaml_constructors
        resolvers = type(self.loader).yaml_implicit_resolvers
        self.starts = None if type(self.loader).yaml_path_resolvers or None in resolvers else frozenset(resolvers)

    def top_keys(self) -> Iterator[tuple[Any, Any]]:
        """Each top-level key and the first event of its value (not taken); raises if the document is not a
        mapping, or has a key twice. The caller takes the value (:meth:`value`, :meth:`skip` or its own way)."""
        loader = self.loader
        loader.get_event()  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            yield _NOT_A_MAPPING, None  # an empty document
            return
        loader.get_event()  # document start
        if not loader.check_event(yaml.MappingStartEvent):
            yield _NOT_A_MAPPING, loader.peek_event()  # the caller reads the value and says what is wrong
            return
        start: Any = loader.get_event()
        self.top_block = not start.flow_style and start.start_mark.column == 0
        if start.tag not in (None, "!", "tag:yaml.org,2002:map"):
            raise ConstructorError(None, None, f"could not determine a constructor for the tag {start.tag!r}",
                                   start.start_mark)  # fmt: skip
        seen: set[Any] = set()
        while not loader.check_event(yaml.MappingEndEvent):
            node = self.compose()
            if node.tag == _MERGE_TAG:
                raise ConstructorError(None, None, "a merge (<<) at the top level of a manifest is not supported",
                                       node.start_mark)  # fmt: skip
            key = self.value(node)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise ConstructorError("while reading the manifest", start.start_mark, "a key must be plain text",
                                       node.start_mark)  # fmt: skip
            if key in seen:
                raise ConstructorError("while reading a mapping", start.start_mark,
                                       f"the key {key!r} is given twice (the second would silently win)",
                                       node.start_mark)  # fmt: skip
            seen.add(key)
            yield key, loader.peek_event()
        loader.get_event()  # mapping end
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            event: Any = loader.get_event()
            raise ComposerError("expected a single document in the stream", start.start_mark,
                                "but found another document", event.start_mark)  # fmt: skip

    def value(self, node: Node | None = None) -> Any:
        """The next node (or *node*) as plain data, its aliases' expansion checked."""
        self.aliased = False
        node = self.compose() if node is None else node
        if not self.aliased:  # nothing shared: plain data straight from the nodes (the constructor's rules)
            try:
                return self._plain(node)
            except _Slow:
                pass
        sizes: dict[int, int] = {}
        if _expanded_size(node, sizes, self.known) - len(sizes) > MAX_VALUES:
            raise yaml.YAMLError(
                f"its aliases (*name) expand it by more than {MAX_VALUES:,} values; write the values out instead"
            )
        for anchored in self.anchors.values():
            if (size := sizes.get(id(anchored))) is not None:
                self.known[id(anchored)] = size
        return self.loader.construct_document(node)

    def _plain(self, node: Node) -> Any:
        """*node* (without aliases) as the loader's constructor would make it, for the usual tags; :class:`_Slow`
        for anything else (a merge, a key given twice, another tag), which the constructor itself then reads."""
        tag, kind = node.tag, type(node)
        if kind is ScalarNode:
            if tag == _STR_TAG:
                return node.value
            if (construct := self.scalars.get(tag)) is None:
                raise _Slow
            return construct(self.loader, node)
        if kind is SequenceNode and tag == _SEQ_TAG:
            return [self._plain(child) for child in node.value]
        if kind is not MappingNode or tag != _MAP_TAG:
            raise _Slow
        data: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or type(key_node) is not ScalarNode:
                raise _Slow
            key = self._plain(key_node)
            if key in data:
                raise _Slow
            data[key] = self._plain(value_node)
        return data

    def skip(self) -> int:
        """Pass over the next node without building it (anchored nodes inside are composed: a later alias may
        use them); returns how many entries it has, if a list or mapping."""
        get, depth, entries = self.loader.get_event, 0, 0
        while True:
            event: Any = get()
            kind = type(event)
            if kind is yaml.AliasEvent or (kind in _NODE_STARTS and event.anchor is not None):
                node = self.compose(event)
                if depth == 0:  # the whole node, composed
                    return len(node.value) if isinstance(node, SequenceNode | MappingNode) else 0
                entries += depth == 1
            elif kind is yaml.ScalarEvent:
                entries += depth == 1
            elif kind is yaml.SequenceStartEvent or kind is yaml.MappingStartEvent:
                entries += depth == 1
                depth += 1
            else:
                depth -= 1
            if depth == 0:
                return entries

    def compose(self, first: yaml.Event | None = None) -> Node:
        """The next node (starting with *first*, if taken already), as PyYAML's composer builds it (an alias is
        the anchored node itself)."""
        loader = self.loader
        event: Any = loader.get_event() if first is None else first
        kind = type(event)
        if kind is yaml.AliasEvent:
            self.aliased = True
            if event.anchor not in self.anchors:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
            return self.anchors[event.anchor]
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            raise ComposerError(f"found duplicate anchor {anchor!r}; first occurrence",
                                self.anchors[anchor].start_mark, "second occurrence", event.start_mark)  # fmt: skip
        node: Node
        if kind is yaml.ScalarEvent:
            tag, value, starts = event.tag, event.value, self.starts
            if tag in (None, "!"):  # as resolve(): text, if no resolver (by path, for any text, by start) may apply
                plain = starts is not None and (not event.implicit[0] or value and value[0] not in starts)
                tag = _STR_TAG if plain else loader.resolve(ScalarNode, value, event.implicit)
            node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
            if anchor is not None:
                self.anchors[anchor] = node
            return node
        node_kind = SequenceNode if kind is yaml.SequenceStartEvent else MappingNode
        tag = event.tag if event.tag not in (None, "!") else loader.resolve(node_kind, None, event.implicit)
        node = node_kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        children, get, compose = node.value, loader.get_event, self.compose
        if node_kind is SequenceNode:
            while type(child := get()) is not yaml.SequenceEndEvent:
                children.append(compose(child))
        else:
            while type(child := get()) is not yaml.MappingEndEvent:
                children.append((compose(child), compose()))
        node.end_mark = child.end_mark
        return node

    def dispose(self) -> None:
        self.loader.dispose()


def read_top(path: str) -> Any:
    """The manifest document in the file at *path*, every top-level key but ``items:`` as plain data;
    ``items:``, when a list, as :class:`ItemsFound` (its items are not built: :func:`stream_items` reads them).
    Anything but a mapping is returned as read. Raises :class:`yaml.YAMLError` (with a line) for what is not
    acceptable, :class:`OSError` and :class:`UnicodeDecodeError` for a file that cannot be read as UTF-8 text.

    When no line after the start of ``items:`` begins at the left margin (other than a ``-`` entry or a
    comment), nothing can follow the list: reading stops there and each :func:`stream_items` pass finds any
    mistake in the items (a run checks every item before it sends anything). Otherwise the list is passed over,
    event by event, to read the keys after it."""
    with open(path, encoding="utf-8") as stream:
        reading = _Pass(stream)
        try:
            data: dict[Any, Any] = {}
            for key, first in reading.top_keys():
                if key is _NOT_A_MAPPING:
                    return None if first is None else reading.value()
                if key != "items" or not isinstance(first, yaml.SequenceStartEvent):
                    data[key] = reading.value()
                    continue
                line: int = first.start_mark.line  # type: ignore[union-attr]
                if reading.top_block and not first.flow_style and _last_at_margin(path, line):
                    data[key] = ItemsFound(count=None, line=line + 1)
                    return data
                data[key] = ItemsFound(count=reading.skip(), line=line + 1)
            return data
        except (RecursionError, yaml.MarkedYAMLError) as exc:
            raise _too_deep(exc) from None
        finally:
            reading.dispose()


# A line that starts at the left margin with anything but a "-" entry, a comment or nothing: a top-level key
# may start there (and so may "---" or "...").
_AT_MARGIN = re.compile(rb"\n(?:[^ \t#\r\n-]|-[^ \t\r\n])")


def _last_at_margin(path: str, line: int) -> bool:
    """Whether no line from *line* (0-based) on starts at the left margin but with "-" or "#" (a scan, in C)."""
    with open(path, "rb") as f:
        for _ in range(line):
            if not f.readline():
                return False
        before = b"\n"  # the end of the block before (1 MiB): a line may start in one and go on in the next
        while block := f.read(1 << 20):
            if _AT_MARGIN.search(before + block):
                return False
            before = block[-2:]
        return True


def stream_items(path: str) -> Iterator[StreamedItem]:
    """The items of the ``items:`` list of the manifest document in the file at *path*, one at a time (reading
    stops at the end of the list). An item that cannot be read is given with its error; an error in the
    document around it is raised, as :class:`yaml.YAMLError` (or :class:`OSError`, :class:`UnicodeDecodeError`)."""
    with open(path, encoding="utf-8") as stream:
        reading = _Pass(stream)
        try:
            yield from _items_of(reading)
        except (RecursionError, yaml.MarkedYAMLError) as exc:
            raise _too_deep(exc) from None
        finally:
            reading.dispose()


def _items_of(reading: _Pass) -> Iterator[StreamedItem]:
    """The items of the document *reading* reads, then the rest of the document, passed over."""
    loader = reading.loader
    for key, first in reading.top_keys():
        if key is _NOT_A_MAPPING:
            return
        if key != "items" or not isinstance(first, yaml.SequenceStartEvent):
            reading.skip()
            continue
        loader.get_event()
        while not loader.check_event(yaml.SequenceEndEvent):
            start: Any = loader.peek_event()
            node = reading.compose()
            try:
                yield StreamedItem(reading.value(node), None, start.start_mark.line + 1)
            except (RecursionError, yaml.YAMLError) as exc:
                error = _too_deep(exc) if isinstance(exc, RecursionError | yaml.MarkedYAMLError) else exc
                yield StreamedItem(None, error, start.start_mark.line + 1, _plain_id(node))  # type: ignore[arg-type]
        loader.get_event()  # the list's end; then the rest of the document, read to its end for its mistakes


def _plain_id(node: Node) -> str | None:
    """The ``id:`` an item's mapping node gives as a plain scalar, if any."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == "id" and isinstance(value, ScalarNode):
                return str(value.value)
    return None
