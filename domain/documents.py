"""Checking a YAML document Egret is given, collecting every problem at once with its field path.

Rule sets, the event catalogue, the score policy and the benefits catalogue are refused with every
problem listed, each as ``"<path>: <message>"`` (``rules[0] (r1).window.count: ...``), so that an
author fixes a file in one go. `Problems` collects them; its checks keep the wording every loader
shares. `read_strict` reads YAML through kit.safeyaml and also notes duplicate mapping keys,
which PyYAML would silently overwrite.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any, Final, Literal, TypeGuard

import yaml

from kit.safeyaml import load_yaml

_DURATION: Final = re.compile(r"\s*([0-9]{1,9})\s*([smhdw])\s*")
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def child(path: str, key: object) -> str:
    """The path of ``key`` inside the mapping at ``path`` (``""`` is the document itself)."""
    return f"{path}.{key}" if path else str(key)


def item(path: str, index: int) -> str:
    """The path of the ``index``-th item of the list at ``path``."""
    return f"{path}[{index}]"


def is_text(value: object) -> TypeGuard[str]:
    """A string with something other than white space in it."""
    return isinstance(value, str) and bool(value.strip())


def is_whole(value: object) -> TypeGuard[int]:
    """An integer that is not a boolean (YAML's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


class Problems:
    """Every problem found so far, each ``"<path>: <message>"``, in the order found.

    ``len(problems)`` before and after a part tells whether that part was sound.
    """

    def __init__(self, earlier: Iterable[str] = ()) -> None:
        self.messages: list[str] = list(earlier)

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[str]:
        return iter(self.messages)

    def add(self, path: str, message: str) -> None:
        self.messages.append(f"{path}: {message}" if path else message)

    def mapping(
        self,
        value: object,
        path: str,
        known: Iterable[str],
        required: Iterable[str] = (),
        *,
        message: str = "must be a mapping",
        unknown: Literal["each", "together"] = "each",
    ) -> dict[Any, Any] | None:
        """``value`` if it is a mapping, its missing fields noted as `required` does and its unknown
        ones as `unknown_fields` (``each``) or `unknown_keys` (``together``) do; None (with
        ``message``) if it is no mapping."""
        if not isinstance(value, dict):
            self.add(path, message)
            return None
        if unknown == "each":
            self.unknown_fields(value, known, path)
        else:
            self.unknown_keys(value, known, path)
        self.required(value, required, path)
        return value

    def unknown_fields(self, node: Mapping[Any, Any], known: Iterable[str], path: str = "") -> None:
        """One problem per unknown key: ``<path>.<key>: unknown field``."""
        allowed = set(known)
        for key in node:
            if key not in allowed:
                self.add(child(path, key), "unknown field")

    def unknown_keys(self, node: Mapping[Any, Any], known: Iterable[str], path: str) -> None:
        """One problem naming every unknown key, sorted: ``<path>: unknown keys a, b``."""
        unknown = sorted(str(key) for key in set(node) - set(known))
        if unknown:
            self.add(path, f"unknown keys {', '.join(unknown)}")

    def required(self, node: Mapping[Any, Any], keys: Iterable[str], path: str = "") -> None:
        """One problem per missing key: ``<path>.<key>: is required``."""
        for key in keys:
            if key not in node:
                self.add(child(path, key), "is required")

    def text(
        self, value: object, path: str, *, max_length: int | None = None, message: str = ""
    ) -> str | None:
        """``value`` if it is non-blank text (of at most ``max_length`` characters)."""
        if is_text(value) and (max_length is None or len(value) <= max_length):
            return value
        if not message:
            limit = f" of at most {max_length} characters" if max_length is not None else ""
            message = f"must be a non-empty string{limit}"
        self.add(path, message)
        return None

    def whole(self, value: object, path: str, low: int, high: int, *, message: str = "") -> int | None:
        """``value`` if it is an integer from ``low`` to ``high`` (booleans are not integers)."""
        if is_whole(value) and low <= value <= high:
            return value
        self.add(path, message or f"must be an integer from {low} to {high}")
        return None

    def integer(self, value: object, path: str, bounds: tuple[int, int] | None = None) -> int | None:
        """``value`` if it is an integer (booleans are not) within ``bounds``, if any, said in two
        steps: ``must be a whole number``, then ``must lie between <low> and <high>``."""
        if not is_whole(value):
            self.add(path, "must be a whole number")
            return None
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            self.add(path, f"must lie between {bounds[0]} and {bounds[1]}")
            return None
        return value

    def flag(self, value: object, path: str) -> bool | None:
        """``value`` if it is true or false."""
        if isinstance(value, bool):
            return value
        self.add(path, "must be true or false")
        return None

    def duration(self, value: object, path: str, *, most: timedelta) -> timedelta | None:
        """A duration written as a whole number and a unit (90d, 12h, 30m, 45s, 2w), more than 0."""
        match = _DURATION.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            self.add(
                path,
                "must be a duration such as 90d, 12h, 30m, 45s or 2w (a whole number and a unit), "
                f"got {value!r}",
            )
            return None
        duration = timedelta(seconds=int(match[1]) * _DURATION_UNITS[match[2]])
        if not timedelta(0) < duration <= most:
            self.add(path, f"must be more than 0 and at most {most.days}d")
            return None
        return duration

    def distinct(
        self, value: object, path: str, *, empty: str, wrong: Callable[[object], str | None]
    ) -> tuple[Any, ...]:
        """A non-empty list whose items ``wrong`` finds nothing wrong with, none listed twice.

        ``empty`` is the problem with anything but a non-empty list; ``wrong(item)`` says what is
        wrong with one item, or None. Returns the list as a tuple (empty when it is no list).
        """
        if not isinstance(value, list) or not value:
            self.add(path, empty)
            return ()
        for position, entry in enumerate(value):
            problem = wrong(entry)
            if problem is not None:
                self.add(item(path, position), problem)
            elif value.index(entry) != position:
                self.add(item(path, position), f"{entry!r} is listed twice")
        return tuple(value)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that notes duplicate mapping keys, which PyYAML would silently overwrite."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *defaults" merges keys that the mapping's own keys override
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            mark = key_node.start_mark
            loader.duplicates.append(f"line {mark.line + 1}: duplicate key {key!r}")
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_strict(source: str | bytes) -> tuple[Any, list[str]]:
    """The document in ``source`` and its duplicate keys (``line N: duplicate key 'k'``).

    Raises kit.safeyaml.YamlError for what load_yaml refuses.
    """
    document, loader = load_yaml(source, loader=_StrictLoader)
    return document, loader.duplicates
