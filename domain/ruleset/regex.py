"""The regular-expression dialect durable-rules accepts, checked before a pattern reaches it.

durable-rules' dialect is a subset of Python's: printable ASCII literals, ``.``, classes
such as ``[a-z0-9]`` or ``[^x]``, groups with ``|``, ``* + ?`` and ``{m,n}`` (n <= 100).
There are no escapes and no anchors (the match is already anchored); ``.`` and classes
match one ASCII character, never a non-ASCII one.
"""

from __future__ import annotations

import re
from typing import Final

# durable-rules refuses (error 502-507) or misbehaves beyond this interval bound.
_MAX_REGEX_INTERVAL: Final = 100


def regex_problem(pattern: str) -> str | None:
    """Why durable-rules would reject or misread a pattern that Python accepts, if it would."""
    if not all(" " <= c <= "~" for c in pattern):
        return "a pattern may only contain printable ASCII (durable-rules matches bytes)"
    if "\\" in pattern:
        return "escapes (\\) are not supported by durable-rules; use a class such as [.] or [0-9]"
    if "$" in pattern or re.search(r"(?<!\[)\^", pattern):
        return "anchors (^ and $) are not supported; the whole value is always matched"
    if "(?" in pattern:
        return "(?...) groups are not supported"
    if "()" in pattern or re.search(r"\[\^?\]", pattern):
        return "empty groups and classes are not supported"
    for match in re.finditer(r"\{(\d*)(,?)(\d*)\}", pattern):
        bounds = [int(n) for n in (match[1], match[3]) if n]
        if any(n > _MAX_REGEX_INTERVAL for n in bounds):
            return f"repetition bounds may not exceed {_MAX_REGEX_INTERVAL}"
    outside_classes = re.sub(r"\[[^\]]*\]", "x", pattern)
    if re.search(r"[*+?}][*+?{]", outside_classes):
        return "a quantifier may not follow another quantifier (no lazy or possessive forms)"
    try:
        re.compile(pattern)
    except re.error as error:
        return f"invalid regular expression: {error}"
    return None
