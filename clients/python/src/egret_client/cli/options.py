"""How commands declare themselves: the options every read shares (purpose, paging, a past
instant) with their help, and `@reflowed`, which lets a command's help text wrap to the
terminal."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf.timestamp_pb2 import Timestamp

Purpose = Annotated[
    str | None,
    typer.Option(
        "--purpose",
        help="Why you read, a code of config/purposes.yaml (e.g. dispute-review); default: the"
        " profile's purpose. Recorded with the read; required of everyone but a subject reading"
        " its own data.",
        show_default=False,
    ),
]
PurposeNote = Annotated[
    str,
    typer.Option(
        "--purpose-note",
        help="A case or ticket number recorded with the purpose (at most 200 characters; never an"
        " identifier).",
    ),
]
PageSize = Annotated[
    int, typer.Option("--page-size", min=0, max=500, help="Items per page, 1 to 500; 0: the service's 50.")
]
PageToken = Annotated[
    str, typer.Option("--page-token", help="Continue from a previous page's next_page_token.")
]
AllPages = Annotated[bool, typer.Option("--all", help="Follow next_page_token to the last page.")]
AsOf = Annotated[
    str | None,
    typer.Option(
        "--as-of",
        help="Read at a past instant, ISO 8601 (2026-03-01 or 2026-03-01T12:00:00+08:00; UTC when no"
        " offset is given); default: now.",
        show_default=False,
    ),
]


def instant(text: str | None, option: str = "--as-of") -> Timestamp | None:
    """An ISO 8601 instant from the command line (UTC when it has no offset)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 date or instant", param_hint=f"'{option}'"
        ) from None
    stamp = Timestamp()
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return stamp


F = TypeVar("F", bound=Callable[..., Any])


def reflowed(command: F) -> F:
    """Typer (0.29, rich mode) keeps the line breaks of a help text's later paragraphs, which
    then wrap badly in a narrow terminal: join each paragraph's lines so it wraps to fit.
    Put it under the `@app.command()` line:

        @app.command("list")
        @reflowed
        def list_things(...) -> None:
    """
    text = inspect.cleandoc(command.__doc__ or "")
    command.__doc__ = "\n\n".join(" ".join(part.split()) for part in text.split("\n\n"))
    return command
