"""What a command prints: a Rich table for people, or JSON / YAML for programs.

Commands hand over protobuf messages or plain rows; `--output json|yaml` prints the
message itself (proto field names, enums by name) so scripts read the API's own shape.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

# stdout carries the result; stderr carries progress, warnings and errors.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


def as_data(value: Any) -> Any:
    """A protobuf message (or a list or mapping of them) as plain JSON-ready data."""
    if isinstance(value, Message):
        return MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, Mapping):
        return {key: as_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_data(item) for item in value]
    return value


def emit(
    fmt: Format,
    data: Any,
    *,
    columns: Sequence[str] = (),
    rows: Iterable[Sequence[Any]] = (),
    title: str | None = None,
    after: Callable[[], None] | None = None,
) -> None:
    """Print `data` as JSON or YAML, or, for a table, `rows` under `columns`
    (`after` then prints anything else a person should see, e.g. a next-page hint)."""
    if fmt is Format.JSON:
        sys.stdout.write(json.dumps(as_data(data), ensure_ascii=False, indent=2) + "\n")
        return
    if fmt is Format.YAML:
        sys.stdout.write(yaml.safe_dump(as_data(data), allow_unicode=True, sort_keys=False))
        return
    table(columns, rows, title=title)
    if after is not None:
        after()


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> None:
    grid = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for column in columns:
        # Fold, never cut: an id, a rule or a date cut to "library…" hides what it names.
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    out.print(grid)


def fields(pairs: Iterable[tuple[str, Any]], *, title: str | None = None) -> None:
    """A two-column table of one record's fields."""
    table(("field", "value"), ((name, value) for name, value in pairs), title=title)
