"""Points expressions and text templates: compiled once when a rule set is read, applied per firing.

A points expression is arithmetic over attributes, compiled into closures by a small safe
evaluator (never eval()); a template quotes attributes as ``{name}``.
"""

from __future__ import annotations

import ast
import math
import operator
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeAlias

from domain.documents import Problems
from domain.ruleset.model import AttributeScalar, EvaluationProblem, is_attribute_name

# Outcome.points is an int32 on the wire.
MAX_POINTS: Final = 2**31 - 1
_MAX_EXPRESSION_LENGTH: Final = 500

_Evaluator: TypeAlias = Callable[[Mapping[str, AttributeScalar]], int | float]


@dataclass(frozen=True)
class PointsExpression:
    """Arithmetic over attributes (``+ - * / //``, unary minus, min/max/abs), compiled once."""

    source: str
    names: frozenset[str]
    _evaluate: _Evaluator = field(compare=False, repr=False)

    def evaluate(self, attributes: Mapping[str, AttributeScalar]) -> int:
        try:
            value = self._evaluate(attributes)
        except ZeroDivisionError:
            raise EvaluationProblem(f"points {self.source!r}: division by zero") from None
        except OverflowError:
            raise EvaluationProblem(f"points {self.source!r}: result out of range") from None
        return _as_points(value, self.source)


def _as_points(value: int | float, source: str) -> int:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EvaluationProblem(f"points {source!r}: result is not a finite number")
        # Half away from zero: 2.5 points is 3 and -2.5 is -3, as a reader would expect
        # (Python's round() would give 2 and -2).
        value = int(math.copysign(math.floor(abs(value) + 0.5), value))
    if abs(value) > MAX_POINTS:
        raise EvaluationProblem(f"points {source!r}: {value} is out of range")
    return value


# A template compiled once: (literal text, attribute or None, format spec, conversion).
_TemplatePart: TypeAlias = tuple[str, str | None, str, str | None]
_CONVERSIONS: Final[dict[str, Callable[[object], str]]] = {"s": str, "r": repr, "a": ascii}


def _format_value(value: object, format_spec: str) -> str:
    if not format_spec:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, datetime):
            return value.isoformat()
    try:
        return format(value, format_spec)
    except (ValueError, TypeError) as error:
        raise EvaluationProblem(f"cannot format {value!r} with {format_spec!r}: {error}") from None


@dataclass(frozen=True)
class Template:
    """Text quoting attributes as ``{name}`` (format specs such as ``{amount:.2f}`` allowed)."""

    source: str
    names: frozenset[str]
    _parts: tuple[_TemplatePart, ...] = field(compare=False, repr=False)

    def render(self, attributes: Mapping[str, AttributeScalar]) -> str:
        # string.Formatter would re-parse the source on every call; this runs per firing.
        pieces: list[str] = []
        for literal, name, format_spec, conversion in self._parts:
            pieces.append(literal)
            if name is None:
                continue
            if name not in attributes:
                raise EvaluationProblem(f"attribute {name!r} is missing")
            value: object = attributes[name]
            if conversion is not None:
                value = _CONVERSIONS[conversion](value)
            pieces.append(_format_value(value, format_spec))
        return "".join(pieces)


_BINARY_OPERATORS: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARY_OPERATORS: Final[dict[type[ast.unaryop], Callable[[Any], Any]]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_FUNCTIONS: Final[dict[str, tuple[Callable[..., Any], int, int | None]]] = {
    # name: (function, fewest arguments, most arguments)
    "min": (min, 2, None),
    "max": (max, 2, None),
    "abs": (abs, 1, 1),
}


def compile_points(source: str, path: str, problems: Problems) -> PointsExpression | None:
    """The expression ``source`` compiled, or None with its problems added under ``path``."""
    if len(source) > _MAX_EXPRESSION_LENGTH:
        problems.add(path, f"expression longer than {_MAX_EXPRESSION_LENGTH} characters")
        return None
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as error:
        message = error.msg if isinstance(error, SyntaxError) else type(error).__name__
        problems.add(path, f"cannot parse {source!r}: {message}")
        return None
    names: set[str] = set()
    before = len(problems)
    evaluate = _compile_node(tree.body, names, f"{path} ({source!r})", problems)
    if evaluate is None or len(problems) > before:
        return None
    return PointsExpression(source=source, names=frozenset(names), _evaluate=evaluate)


def _compile_node(node: ast.expr, names: set[str], where: str, problems: Problems) -> _Evaluator | None:
    """A closure computing the node, so that evaluation never walks the tree again (and never eval()s)."""
    if isinstance(node, ast.Constant):
        constant = node.value
        if isinstance(constant, bool) or not isinstance(constant, int | float):
            problems.add(where, f"only numbers may appear as constants, got {constant!r}")
            return None
        return lambda _attributes: constant
    if isinstance(node, ast.Name):
        if not is_attribute_name(node.id) or node.id in _FUNCTIONS:
            problems.add(where, f"{node.id!r} is not an attribute name")
            return None
        names.add(node.id)
        return _attribute_reader(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left = _compile_node(node.left, names, where, problems)
        right = _compile_node(node.right, names, where, problems)
        apply = _BINARY_OPERATORS[type(node.op)]
        if left is None or right is None:
            return None
        return lambda attributes: apply(left(attributes), right(attributes))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        operand = _compile_node(node.operand, names, where, problems)
        apply_unary = _UNARY_OPERATORS[type(node.op)]
        if operand is None:
            return None
        return lambda attributes: apply_unary(operand(attributes))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        function, fewest, most = _FUNCTIONS[node.func.id]
        count = len(node.args)
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            problems.add(where, f"{node.func.id}() takes plain positional arguments")
            return None
        if count < fewest or (most is not None and count > most):
            wanted = f"{fewest}" if most == fewest else f"{fewest} or more"
            problems.add(where, f"{node.func.id}() takes {wanted} arguments")
            return None
        arguments = [_compile_node(a, names, where, problems) for a in node.args]
        compiled = [a for a in arguments if a is not None]
        if len(compiled) != count:
            return None
        return lambda attributes: function(*(a(attributes) for a in compiled))
    allowed = "numbers, attribute names, + - * / //, min, max, abs"
    problems.add(where, f"{ast.unparse(node)!r} is not allowed ({allowed})")
    return None


def _attribute_reader(name: str) -> _Evaluator:
    def read(attributes: Mapping[str, AttributeScalar]) -> int | float:
        value = attributes.get(name)
        if value is None:
            raise EvaluationProblem(f"attribute {name!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EvaluationProblem(f"attribute {name!r} is not a number: {value!r}")
        return value

    return read


def parse_template(value: object, path: str, problems: Problems) -> Template | None:
    """The template ``value`` compiled, or None with its problems added under ``path``."""
    if not isinstance(value, str):
        problems.add(path, "must be a string")
        return None
    try:
        parts: list[_TemplatePart] = [
            (literal, name, format_spec or "", conversion)
            for literal, name, format_spec, conversion in string.Formatter().parse(value)
        ]
    except ValueError as error:
        problems.add(path, f"invalid template ({error}); write {{{{ and }}}} for literal braces")
        return None
    before = len(problems)
    for _literal, name, format_spec, _conversion in parts:
        if name is None:
            continue
        if not is_attribute_name(name):
            problems.add(path, f"{{{name}}} must name an attribute (no positions, dots or indexes)")
        elif format_spec and ("{" in format_spec or "}" in format_spec):
            problems.add(path, f"{{{name}}} may not nest fields in its format spec")
    if len(problems) > before:
        return None
    names = frozenset(name for _literal, name, _spec, _conversion in parts if name is not None)
    return Template(source=value, names=names, _parts=tuple(parts))
