"""A manifest's YAML, streamed: read event by event with the manifest loader of :mod:`nanobatch.safe_yaml` (its
rules: safe, strict, numbers as written, aliases bounded), each item of ``items:`` built on its own, so memory
does not grow with the items.

:func:`read_top` reads the top-level keys, passing over ``items:``; :func:`stream_items` then gives the items,
one at a time. The other top-level keys may come before or after ``items:`` (:func:`read_top` says how); each
pass reads the document again. Anchored nodes (``&name``) are kept for the rest of a pass: a later alias may
use them.

An item of plain text, lists and mappings (what manifests hold) is built straight from its events. Anything
else (an anchor, an alias, a tag, a merge, a key given twice, a value a constructor refuses) is composed from
the same events into nodes and built by PyYAML's constructor, whose rules and errors are the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import GeneratorType
from typing import IO, Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .. import safe_yaml
from ..safe_yaml import MERGE_TAG, too_deep

__all__ = ["ItemsFound", "StreamedItem", "read_top", "stream_items"]


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
        self.loader = safe_yaml.LOADERS[True](stream)
        self.get: Callable[[], Any] = self.loader.get_event  # where compose takes its events (see item)
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
            if node.tag == MERGE_TAG:
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
        """The next node (or *node*, composed since :attr:`aliased` was last reset) as plain data, its aliases'
        expansion checked."""
        if node is None:
            self.aliased = False
            node = self.compose()
        if not self.aliased:  # nothing shared: plain data straight from the nodes (the constructor's rules)
            try:
                return self._plain(node)
            except _Slow:
                pass
        sizes: dict[int, int] = {}
        safe_yaml.refuse_expansion(node, sizes, self.known)
        for anchored in self.anchors.values():
            if (size := sizes.get(id(anchored))) is not None:
                self.known[id(anchored)] = size
        loader = self.loader
        try:
            return loader.construct_document(node)
        except BaseException:  # what it left half built (its steps to come, its nodes under way) is forgotten,
            loader.state_generators, loader.constructed_objects, loader.recursive_objects = [], {}, {}
            loader.deep_construct = False  # not run with, nor taken for, the next item's
            raise

    def item(self, first: Any) -> StreamedItem:
        """The item whose first event is *first* (taken already): built from its events where it can be
        (:meth:`built`), else composed from the same events and built by the constructor (:meth:`value`)."""
        line, taken = first.start_mark.line + 1, [first]
        try:
            return StreamedItem(self.built(first, taken), None, line)
        except _Slow:
            pass
        replay, live = iter(taken), self.loader.get_event
        self.get, self.aliased = (lambda: next(replay, None) or live()), False  # the events built from, then on
        try:
            node = self.compose()
        finally:
            self.get = live
        try:
            return StreamedItem(self.value(node), None, line)
        except (RecursionError, yaml.YAMLError) as exc:
            error = too_deep(exc) if isinstance(exc, RecursionError | yaml.MarkedYAMLError) else exc
            return StreamedItem(None, error, line, _plain_id(node))  # type: ignore[arg-type]

    def built(self, first: Any, taken: list[Any]) -> Any:
        """The node that starts with the event *first* (taken) as plain data, straight from its events, each one
        taken added to *taken*; :class:`_Slow` for anything but plain text, numbers, lists and mappings without
        anchors, aliases, tags, merges or a key given twice."""
        kind = type(first)
        if kind is yaml.ScalarEvent:
            return self._scalar(first)
        if first.anchor is not None or first.tag not in (None, "!") or self.starts is None:  # an alias has an anchor
            raise _Slow
        get = self.loader.get_event
        if kind is yaml.SequenceStartEvent:
            values = []
            while type(event := get()) is not yaml.SequenceEndEvent:
                taken.append(event)
                values.append(self.built(event, taken))
            taken.append(event)
            return values
        data: dict[Any, Any] = {}
        while type(event := get()) is not yaml.MappingEndEvent:
            taken.append(event)
            if type(event) is not yaml.ScalarEvent or type(key := self._scalar(event)) is not str or key in data:
                # A key that is a list, a mapping or not text (1 and '1' are one key to the constructor's check
                # of keys given twice), or a key given twice: the constructor says what it makes of it.
                raise _Slow
            taken.append(event := get())
            data[key] = self._scalar(event) if type(event) is yaml.ScalarEvent else self.built(event, taken)
        taken.append(event)
        return data

    def _scalar(self, event: Any) -> Any:
        """A scalar's event as the constructor would build it (as :meth:`compose` resolves its tag)."""
        value, starts = event.value, self.starts
        if event.anchor is not None or event.tag not in (None, "!") or starts is None:
            raise _Slow
        if not event.implicit[0] or value and value[0] not in starts:
            return value  # text: no resolver may apply
        tag = self.loader.resolve(ScalarNode, value, event.implicit)
        if tag == _STR_TAG:
            return value
        return self._constructed(ScalarNode(tag, value, event.start_mark, event.end_mark, style=event.style))

    def _constructed(self, node: Node) -> Any:
        """*node* built by its tag's constructor; :class:`_Slow` when there is none (a merge key, <<, among
        others), when it refuses the value (the constructor's own reading then says so, with its line), or when
        it would make a list or a mapping of a text ("!!set x")."""
        if (construct := self.scalars.get(node.tag)) is None:
            raise _Slow
        try:
            value = construct(self.loader, node)
        except yaml.YAMLError:
            raise _Slow from None
        if isinstance(value, GeneratorType):
            raise _Slow
        return value

    def _plain(self, node: Node) -> Any:
        """*node* (without aliases) as the loader's constructor would make it, for the usual tags; :class:`_Slow`
        for anything else (a merge, a key given twice, another tag), which the constructor itself then reads."""
        tag, kind = node.tag, type(node)
        if kind is ScalarNode:
            return node.value if tag == _STR_TAG else self._constructed(node)
        if kind is SequenceNode and tag == _SEQ_TAG:
            return [self._plain(child) for child in node.value]
        if kind is not MappingNode or tag != _MAP_TAG:
            raise _Slow
        data: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG or type(key_node) is not ScalarNode:
                raise _Slow
            if type(key := self._plain(key_node)) is not str or key in data:  # as in built()
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
        event: Any = self.get() if first is None else first
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
        children, get, compose = node.value, self.get, self.compose
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
            raise too_deep(exc) from None
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
            raise too_deep(exc) from None
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
            yield reading.item(loader.get_event())
        loader.get_event()  # the list's end; then the rest of the document, read to its end for its mistakes


def _plain_id(node: Node) -> str | None:
    """The ``id:`` an item's mapping node gives as a plain scalar, if any."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == "id" and isinstance(value, ScalarNode):
                return str(value.value)
    return None
