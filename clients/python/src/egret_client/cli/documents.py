"""YAML documents given on the command line (rule sets, score policies): reading one, and
placing each problem the service reports on the line of the file it concerns.

The services own the formats and check them; the command line reads a document only to
turn a violation's field path ("source.rules[2] (traffic.red_light).points",
"policy_yaml.policies.person.tiers") into a line number a person can go to.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml

from egret_client.cli.common import Exit, fail
from egret_client.cli.output import err, table
from egret_client.errors import error_report

T = TypeVar("T")

# One step of a path: a key, an index, or a label in parentheses (a rule's id; not a step).
_STEP = re.compile(r"\.?([^.\[\s(]+)|\[(\d+)\]|\s*\([^)]*\)")
# A YAML syntax error names its place: "line 6, column 1: ...".
_STATED_LINE = re.compile(r"\bline (\d+)\b")


def read_document(path: str) -> str:
    """The file named on the command line (`-`: stdin); an unreadable one is bad input."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {path}: {exc}", Exit.USAGE) from None


def problem_lines(document: str, problems: Sequence[Any], field: str) -> list[int]:
    """For each problem (a FieldViolation of the request field `field` holding the
    document), the 1-based line its path leads to: its deepest node found in the document,
    or the line a syntax error states; 0 when there is none."""
    try:
        root: yaml.Node | None = yaml.compose(document, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None
    lines = []
    for problem in problems:
        stated = _STATED_LINE.search(problem.description) if problem.field == field else None
        lines.append(int(stated.group(1)) if stated else _line_of(root, problem.field.removeprefix(field)))
    return lines


def _line_of(node: yaml.Node | None, path: str) -> int:
    line = 0
    for step in _STEP.finditer(path):
        key, index = step.groups()
        if key is None and index is None:
            continue
        child: yaml.Node | None = None
        if key is not None and isinstance(node, yaml.MappingNode):
            for name, value in node.value:
                if isinstance(name, yaml.ScalarNode) and name.value == key:
                    child, line = value, name.start_mark.line + 1
                    break
        elif index is not None and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            child = node.value[int(index)]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def placed(document: str, problems: Sequence[Any], field: str) -> list[tuple[str, int, str]]:
    """(path inside the document, line, description) for each problem."""
    return [
        (p.field.removeprefix(field + ".") or p.field, line, p.description)
        for p, line in zip(problems, problem_lines(document, problems, field), strict=True)
    ]


def problems_table(document: str, problems: Sequence[Any], field: str) -> None:
    rows = ((path, line or "", description) for path, line, description in placed(document, problems, field))
    table(("path", "line", "problem"), rows, title="Problems")


async def refused_in_place(call: Awaitable[T], document: str, file: str, field: str) -> T:
    """The answer of `call`, which sends `document` as `field`; when the service refuses
    the document (INVALID_ARGUMENT), its problems with their lines on stderr, and exit 2."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() is not grpc.StatusCode.INVALID_ARGUMENT:
            raise
        report = error_report(exc)
        err.print(f"{report.code.name}: {report.message}", highlight=False, markup=False)
        for path, line, description in placed(document, report.violations, field):
            where = f"{path} (line {line})" if line else path
            err.print(f"  {where}: {description}", highlight=False, markup=False)
        raise fail(f"{file}: refused, nothing changed", Exit.USAGE) from None
