"""Why a subject's data is read: a purpose code from a configured list, plus a short note.

A purpose is data, not free text: the caller names one of the codes in the purposes file
(`config/purposes.yaml`, `EGRET_PURPOSES_FILE`), each with a description in zh-CN and en
and the roles that may state it, and may add a note of at most `MAX_NOTE_LENGTH`
characters from a restricted set. A note that looks like an identifier (a configured id
scheme's pattern, or the value of the subject the request names) is refused: records are
hash-chained, so what is written can never be redacted. Only the code is ever logged.
The size of what a read records is thereby bounded (docs/security.md, "Purposes").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.errors import InvalidArgument, Violation
from kit.principal import Principal, Role
from kit.safeyaml import YamlError, load_yaml

MAX_CODE_LENGTH = 64
MAX_NOTE_LENGTH = 200
LANGUAGES = ("zh-CN", "en")
# Subjects read their own data and need not say why; every other role must.
PURPOSE_OPTIONAL = frozenset({Role.SUBJECT})

_CODE = re.compile(r"[a-z][a-z0-9-]{0,63}")
# Letters and digits of any script, space, and a few punctuation marks (ASCII and CJK): no
# line breaks, no control or format characters, no markup.
_NOTE = re.compile(r"[\w .,:;/()#'\-、，。：；（）《》“”]*")  # noqa: RUF001 (CJK punctuation, meant)
_SEPARATORS = re.compile(r"[\s\-./:]")


class PurposesError(ValueError):
    """The purposes file is unusable; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Purpose:
    code: str
    descriptions: Mapping[str, str]
    roles: frozenset[Role]


@dataclass(frozen=True)
class StatedPurpose:
    """A checked purpose: what a record of the read carries."""

    code: str = ""
    note: str = ""

    def detail(self) -> dict[str, str]:
        """The note as an audit record's detail (empty when none was given)."""
        return {"purpose_note": self.note} if self.note else {}


@dataclass(frozen=True)
class Purposes:
    by_code: Mapping[str, Purpose]
    # Scheme → pattern of identifiers a note must not contain.
    identifier_patterns: Mapping[str, re.Pattern[str]]

    def codes_for(self, role: Role) -> list[str]:
        return sorted(code for code, p in self.by_code.items() if role in p.roles)

    def check(
        self,
        principal: Principal | None,
        code: str,
        note: str = "",
        *,
        identifiers: Iterable[str] = (),
        code_field: str = "purpose",
        note_field: str = "purpose_note",
    ) -> StatedPurpose:
        """The stated purpose, or INVALID_ARGUMENT naming every bad field. Never echoes what
        was sent (it may be huge, or an identifier). `identifiers` are values the note must
        not contain (the raw ids and subject keys the request names). Without a principal
        (insecure development mode) a purpose is optional and any configured code goes."""
        problems: list[Violation] = []
        role = principal.role if principal is not None else None
        if not code.strip():
            if note or (role is not None and role not in PURPOSE_OPTIONAL):
                problems.append(Violation(code_field, self._expected(role), "REQUIRED"))
        elif len(code) > MAX_CODE_LENGTH or code not in self.by_code:
            problems.append(Violation(code_field, self._expected(role), "UNKNOWN_PURPOSE"))
        elif role is not None and role not in self.by_code[code].roles:
            problems.append(Violation(code_field, self._expected(role), "NOT_PERMITTED"))
        problems += self._note_problems(note, identifiers, note_field)
        if problems:
            raise InvalidArgument("invalid purpose", problems)
        return StatedPurpose(code, note.strip())

    def _expected(self, role: Role | None) -> str:
        codes = self.codes_for(role) if role is not None else sorted(self.by_code)
        if not codes:
            return "no purpose is configured for this role"
        return "must be one of the configured purpose codes: " + ", ".join(codes)

    def _note_problems(self, note: str, identifiers: Iterable[str], field: str) -> list[Violation]:
        if not note:
            return []
        if len(note) > MAX_NOTE_LENGTH:
            return [Violation(field, f"must be at most {MAX_NOTE_LENGTH} characters", "TOO_LONG")]
        if not _NOTE.fullmatch(note):
            return [
                Violation(
                    field,
                    "may hold only letters, digits, spaces and the punctuation . , : ; / ( ) # ' -",
                    "INVALID_CHARACTERS",
                )
            ]
        if self.names_identifier(note, identifiers):
            return [
                Violation(
                    field,
                    "must not contain a subject's identifier (the access log cannot be redacted)",
                    "LOOKS_LIKE_IDENTIFIER",
                )
            ]
        return []

    def names_identifier(self, text: str, identifiers: Iterable[str] = ()) -> bool:
        """True when `text`, as written or with separators taken out, matches an identifier
        pattern or contains one of `identifiers`."""
        forms = {text.casefold(), _SEPARATORS.sub("", text).casefold()}
        for pattern in self.identifier_patterns.values():
            if any(pattern.search(form) for form in forms):
                return True
        for identifier in identifiers:
            value = _SEPARATORS.sub("", identifier).casefold()
            if len(value) >= 4 and any(value in _SEPARATORS.sub("", form) for form in forms):
                return True
        return False


def load_purposes(path: Path) -> Purposes:
    """The purposes file at `path`; PurposesError listing every problem otherwise."""
    try:
        document, _ = load_yaml(path.read_bytes())
    except (OSError, YamlError) as exc:
        raise PurposesError([f"{path}: {exc}"]) from exc
    return parse_purposes(document)


def parse_purposes(document: Any) -> Purposes:
    problems: list[str] = []
    if not isinstance(document, dict):
        raise PurposesError(["the purposes file must be a mapping with 'purposes' and 'identifier_patterns'"])
    by_code: dict[str, Purpose] = {}
    entries = document.get("purposes")
    if not isinstance(entries, list) or not entries:
        problems.append("'purposes' must be a non-empty list")
        entries = []
    for index, entry in enumerate(entries):
        where = f"purposes[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be a mapping")
            continue
        code = entry.get("code")
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            problems.append(
                f"{where}.code must be 1 to {MAX_CODE_LENGTH} lower-case letters, digits or dashes"
            )
            continue
        if code in by_code:
            problems.append(f"{where}.code {code!r} is listed twice")
        descriptions = entry.get("description")
        if not isinstance(descriptions, dict) or any(
            not isinstance(descriptions.get(language), str) or not descriptions[language].strip()
            for language in LANGUAGES
        ):
            problems.append(f"{where}.description must give a text for each of {', '.join(LANGUAGES)}")
            descriptions = {}
        roles = entry.get("roles")
        known = {r.value for r in Role}
        if not isinstance(roles, list) or not roles or any(r not in known for r in roles):
            problems.append(f"{where}.roles must list roles among {', '.join(sorted(known))}")
            roles = []
        by_code[code] = Purpose(code, dict(descriptions), frozenset(Role(r) for r in roles))
    patterns: dict[str, re.Pattern[str]] = {}
    listed = document.get("identifier_patterns", {})
    if not isinstance(listed, dict):
        problems.append("'identifier_patterns' must map an id scheme to a regular expression")
        listed = {}
    for scheme, pattern in listed.items():
        try:
            patterns[str(scheme)] = re.compile(str(pattern), re.IGNORECASE)
        except re.error as exc:
            problems.append(f"identifier_patterns.{scheme}: {exc}")
    if problems:
        raise PurposesError(problems)
    return Purposes(by_code, patterns)
