"""*Download my data*: everything the pages show, as JSON and as CSV (the right of access).

Built from the records, so it holds exactly what the services gave the person's own token:
no subject key, no raw identifier (the person knows their own id; the file may travel).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from datetime import datetime
from typing import Any

from services.portal import records as r


def _columns(record: type, *, leave_out: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in fields(record) if f.name not in leave_out)


# The CSV files offered, by name, with their columns: the records' own fields, so a field
# the portal reads is a column; nested parts (evidence, an entry's dispute) are in the JSON.
_HISTORY = _columns(r.ScoreChange)
CSV_SECTIONS: Mapping[str, Sequence[str]] = {
    "entries": _columns(r.Entry, leave_out=("evidence", "dispute", "repair")),
    "history": _HISTORY,
    "history-corrected": _HISTORY,
    "access-log": _columns(r.AccessRecord),
    "disputes": _columns(r.Dispute),
    "repairs": _columns(r.Repair),
    "benefits": _columns(r.Eligibility, leave_out=("reasons",)),
}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def document(
    *,
    exported_at: datetime,
    explanation: r.Explanation | None,
    entries: tuple[r.Entry, ...],
    history: tuple[r.ScoreChange, ...],
    history_corrected: tuple[r.ScoreChange, ...],
    access_log: tuple[r.AccessRecord, ...],
    disputes: tuple[r.Dispute, ...],
    repairs: tuple[r.Repair, ...],
    eligibility: tuple[r.Eligibility, ...],
) -> dict[str, Any]:
    return {
        "exported_at": exported_at.isoformat(),
        "score": _plain(explanation),
        "entries": _plain(entries),
        "history": _plain(history),
        "history_corrected": _plain(history_corrected),
        "access_log": _plain(access_log),
        "disputes": _plain(disputes),
        "repairs": _plain(repairs),
        "benefits": _plain(eligibility),
    }


def to_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False, indent=2)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return " ".join(_cell(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # A cell starting with = + - @ is a formula to a spreadsheet (CSV injection): quote it.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _number(text) else text


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_csv(section: str, rows: Iterable[Mapping[str, Any]]) -> str:
    columns = CSV_SECTIONS[section]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    # A byte order mark, so spreadsheet programs read the Chinese text as UTF-8.
    return "\ufeff" + buffer.getvalue()


def section_rows(section: str, doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The rows of one CSV section, from the JSON document."""
    key = {"history-corrected": "history_corrected", "access-log": "access_log"}.get(section, section)
    return list(doc.get(key) or ())
