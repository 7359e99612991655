"""The one way Egret reads YAML it is given (rule sets, policy, benefits, catalogue).

PyYAML's SafeLoader constructs no arbitrary objects, but it composes nested collections
recursively (deep nesting ends in RecursionError), shares aliased nodes (a "billion
laughs" document is small in memory and explodes for whoever walks it), and accepts any
size. `load_yaml` refuses, before constructing anything, a document over `max_bytes`, with
characters outside printable Unicode, nested deeper than `max_depth` or holding more than
`max_nodes` nodes once every alias is expanded. Every refusal is a `YamlError` naming the
line and column (1-based), never another exception.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import yaml

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000

# What YAML allows in a stream (YAML 1.1, as PyYAML), minus NEL: tab, line breaks and
# printable Unicode. Control characters are refused here, with their position.
_NOT_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

Loader = TypeVar("Loader", bound=yaml.SafeLoader)


class YamlError(ValueError):
    """A document refused by `load_yaml`; `line` and `column` are 1-based (0 if unknown)."""

    def __init__(self, problem: str, line: int = 0, column: int = 0) -> None:
        self.problem = problem
        self.line = line
        self.column = column
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(f"{where}{problem}")


def load_yaml(
    source: str | bytes,
    *,
    loader: type[Loader] = yaml.SafeLoader,  # type: ignore[assignment]
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> tuple[Any, Loader]:
    """The single document in `source`, and the loader that read it (a subclass may
    collect findings, such as duplicate keys)."""
    text = _text(source, max_bytes)
    bad = _NOT_PRINTABLE.search(text)
    if bad is not None:
        line, column = _position(text, bad.start())
        raise YamlError(f"character U+{ord(bad.group()):04X} is not allowed", line, column)
    try:
        _check_shape(text, loader, max_depth, max_nodes)
        reader = loader(text)
        try:
            node = reader.get_single_node()
            if node is not None:
                _check_expanded_size(node, max_nodes)
            data = reader.construct_document(node) if node is not None else None
        finally:
            reader.dispose()
    except yaml.MarkedYAMLError as error:
        problem = " ".join(p for p in (error.context, error.problem) if p) or "invalid YAML"
        raise YamlError(problem, *_at(error.problem_mark or error.context_mark)) from None
    except yaml.YAMLError as error:
        raise YamlError(f"invalid YAML: {error}") from None
    except RecursionError:  # a bound above should have caught it; never let it escape
        raise YamlError("the document is nested too deeply") from None
    return data, reader


def _text(source: str | bytes, max_bytes: int) -> str:
    size = len(source.encode("utf-8", "surrogatepass") if isinstance(source, str) else source)
    if size > max_bytes:
        raise YamlError(f"the document is {size} bytes, more than the {max_bytes} allowed")
    if isinstance(source, str):
        return source
    try:
        return source.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        prefix = source[: error.start].decode("utf-8-sig", "replace")
        raise YamlError("the document is not valid UTF-8", *_position(prefix, len(prefix))) from None


def _at(mark: Any) -> tuple[int, int]:
    """1-based line and column of a PyYAML mark (0, 0 without one)."""
    return (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _check_shape(text: str, loader: type[yaml.SafeLoader], max_depth: int, max_nodes: int) -> None:
    """Depth and size from the event stream, which PyYAML produces without recursion, so
    nothing recursive ever sees a document deeper than `max_depth`."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                raise YamlError(f"nested deeper than {max_depth} levels", *_at(event.start_mark))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > max_nodes:
                raise YamlError(f"more than {max_nodes} nodes", *_at(event.start_mark))


def _check_expanded_size(root: yaml.Node, max_nodes: int) -> None:
    """Nodes counted with every alias expanded: aliases share one node object, so the
    count per node is memoised and a billion laughs costs one pass over its few nodes."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if depth > MAX_DEPTH * 2:  # only a recursive alias gets here (depth is bounded otherwise)
            raise YamlError("an alias refers to itself", *_at(node.start_mark))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if total > max_nodes:
            raise YamlError(f"more than {max_nodes} nodes once aliases are expanded", *_at(node.start_mark))
        sizes[id(node)] = total
        return total

    size(root, 0)
