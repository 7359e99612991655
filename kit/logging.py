"""structlog on top of the standard library, JSON in production, console in development.

Every line carries the service name and, inside a span, the trace and span ids, so a
log line can be joined to its trace. Subject identifiers are never logged in raw form;
services log subject keys (pseudonyms) at most.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

from kit.rate_limit import RateLimiter


def _add_trace_ids(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


class Throttle:
    """Drops the lines logged with `throttle=<key>` beyond `burst` per key, then `rate` per
    second per key (a token bucket each); the next line of a key that passes carries
    `suppressed=<n>`, the number dropped since. For what callers can provoke at will
    (rejected requests), so a flood of bad calls cannot flood the log."""

    def __init__(self, rate: float = 1.0, burst: float = 20.0, clock: Callable[[], float] = time.monotonic):
        self._limiter = RateLimiter(rate, burst, clock)
        self._dropped: dict[str, int] = {}

    def __call__(self, _: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        key = event_dict.pop("throttle", None)
        if key is None:
            return event_dict
        name = repr(key)
        if self._limiter.acquire(name) > 0:
            self._dropped[name] = self._dropped.get(name, 0) + 1
            raise structlog.DropEvent
        dropped = self._dropped.pop(name, 0)
        if dropped:
            event_dict["suppressed"] = dropped
        return event_dict


def configure_logging(service: str, *, log_format: str = "json", level: str = "info") -> None:
    """Route structlog and stdlib logging through one handler on stderr."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        # Throttled lines are dropped first, before any work (a traceback) is spent on them.
        processors=[Throttle(), *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
