"""Database metrics, at a cost that does not grow with the work a statement does.

- `db.client.connections.usage` (OpenTelemetry's name; `state` used or idle, `pool_name` the
  database's name): read from each engine's own pool counters when Prometheus scrapes, so
  checking a connection in or out costs nothing extra. Every engine kit.db makes is watched.
- `egret.db.query.duration` by operation (SELECT, INSERT, UPDATE, DELETE, other): one
  statement in EGRET_METRICS_STATEMENT_SAMPLE (default 10) is timed by two cursor-execute
  hooks. Its distribution is that of all statements; its count is a tenth of them (multiply
  by the sample to estimate statements per second).

Why not OpenTelemetry's SQLAlchemy instrumentation: it hooks every statement (even with a
no-op tracer) and so did the first version of this module's timing; with both, the pipeline
bench ran at 0.90 of its throughput without metrics, without either at 0.99 (docs/benchmarks.md,
"Observability on and off"): per-row statements made them cost 25-40 µs per event in ingest.
"""

from __future__ import annotations

import itertools
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from kit.env import SettingsError
from kit.metrics import Reading, gauge, histogram, meter

DEFAULT_SAMPLE = 10
_OPERATIONS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
_STARTED = "egret_statement_started"

_meter = meter("egret.db")
_query_duration = histogram(
    _meter, "egret.db.query.duration", description="Sampled database statements, by operation"
)
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@dataclass
class _Sampling:
    every: int = DEFAULT_SAMPLE
    turn: Iterator[int] = field(default_factory=itertools.count)


_sampling = _Sampling()


def watch_pool(engine: Engine) -> None:
    """Count `engine`'s pooled connections in db.client.connections.usage (kit.db does)."""
    _engines.add(engine)


def _pool_name(engine: Engine) -> str:
    database = engine.url.database or ""
    return os.path.basename(database) if engine.url.get_backend_name() == "sqlite" else database


def _usage() -> Reading:
    usage: dict[tuple[tuple[str, str], ...], float] = {}
    for engine in list(_engines):
        pool = engine.pool
        if not isinstance(pool, QueuePool):
            continue  # e.g. an in-memory database's single connection
        name = _pool_name(engine)
        for state, count in (("used", pool.checkedout()), ("idle", pool.checkedin())):
            labels = (("state", state), ("pool_name", name))
            usage[labels] = usage.get(labels, 0.0) + count
    return usage


gauge(_meter, "db.client.connections.usage", _usage, unit="connections", description="Pooled connections")


def _operation(statement: str) -> str:
    operation = statement.lstrip()[:6].upper()
    return operation if operation in _OPERATIONS else "other"


def _before(_conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool) -> None:
    if context is not None and next(_sampling.turn) % _sampling.every == 0:
        setattr(context, _STARTED, time.perf_counter())


def _after(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
    started = getattr(context, _STARTED, None)
    if started is not None:
        _query_duration.record(time.perf_counter() - started, {"operation": _operation(statement)})


def statement_sample() -> int:
    raw = os.environ.get("EGRET_METRICS_STATEMENT_SAMPLE", "").strip()
    try:
        value = int(raw) if raw else DEFAULT_SAMPLE
    except ValueError:
        value = 0
    if not 1 <= value <= 1000:
        raise SettingsError([f"EGRET_METRICS_STATEMENT_SAMPLE={raw!r} is not a whole number in 1-1000"])
    return value


def time_statements(sample: int) -> None:
    """Time one statement in `sample` on every engine: two cursor-execute hooks on Engine."""
    _sampling.every = sample
    if not event.contains(Engine, "before_cursor_execute", _before):
        event.listen(Engine, "before_cursor_execute", _before)
        event.listen(Engine, "after_cursor_execute", _after)
