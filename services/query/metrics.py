"""What the query service tells Prometheus (kit.metrics): reads of subject data by method, the
caller's role and stated purpose, and the access-log records written and failed.

Labels: RPC names, the role enumeration and purpose codes the purposes catalogue allows
(a code not in it is refused before any read), nothing about a subject.
"""

from __future__ import annotations

from kit.metrics import meter
from kit.principal import current_principal

_meter = meter("egret.query")
_reads = _meter.create_counter(
    "egret.query.reads", unit="{read}", description="Reads of subject data, by method, role and purpose"
)
_written = _meter.create_counter(
    "egret.query.access_log.written", unit="{record}", description="Access records committed"
)
_failed = _meter.create_counter(
    "egret.query.access_log.failed", unit="{record}", description="Access records whose commit failed"
)


def read(method: str, purpose: str) -> None:
    principal = current_principal()
    role = principal.role.value if principal is not None else "none"
    _reads.add(1, {"method": method, "role": role, "purpose": purpose})


def access_records(count: int, *, committed: bool) -> None:
    (_written if committed else _failed).add(count)
