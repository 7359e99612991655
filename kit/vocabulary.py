"""The words every service shares for the domain's fixed sets, so they are spelled once."""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

# Persons and organizations are scored under separate policies.
SubjectKind: TypeAlias = Literal["person", "organization"]
SUBJECT_KINDS: Final[tuple[SubjectKind, ...]] = ("person", "organization")

# Severity decides visibility periods and repair eligibility (DOMAIN.md).
Severity: TypeAlias = Literal["positive", "minor", "general", "serious"]
SEVERITIES: Final[tuple[Severity, ...]] = ("positive", "minor", "general", "serious")
