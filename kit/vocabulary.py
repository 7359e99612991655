"""The words every service shares for the domain's fixed sets, so they are spelled once."""

from __future__ import annotations

# Persons and organizations are scored under separate policies.
SUBJECT_KINDS: tuple[str, ...] = ("person", "organization")

# Severity decides visibility periods and repair eligibility (DOMAIN.md).
SEVERITIES: tuple[str, ...] = ("positive", "minor", "general", "serious")
