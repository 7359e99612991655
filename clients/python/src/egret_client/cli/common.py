"""What every subcommand shares: the connection of the chosen profile, running a coroutine
(or a paged read, page after page), turning a refusal into words and an exit code, naming a
subject, and showing what came back (enum values and instants in words, a page with how to
read the next). The shared options are in options.py."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol, Self, TypeVar

import grpc
import typer
from google.protobuf.timestamp_pb2 import Timestamp

from egret.common.v1 import subject_pb2
from egret_client.cli.output import Format, emit, err
from egret_client.connection import Connection
from egret_client.errors import error_report
from egret_client.profile import Profile, ProfileError, load_profile

T = TypeVar("T")


class Exit(IntEnum):
    """Exit codes, as scripts see them (docs/cli.md)."""

    OK = 0
    FAILED = 1  # the service refused or failed the call (NOT_FOUND, FAILED_PRECONDITION, ...)
    USAGE = 2  # bad arguments or bad input (Click's own code for usage errors too)
    CONFIG = 3  # no config file, bad profile, unreadable TLS or token file
    DENIED = 4  # UNAUTHENTICATED or PERMISSION_DENIED
    UNAVAILABLE = 5  # the service could not be reached in time (UNAVAILABLE, DEADLINE_EXCEEDED)


_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: Exit.USAGE,
    grpc.StatusCode.UNAUTHENTICATED: Exit.DENIED,
    grpc.StatusCode.PERMISSION_DENIED: Exit.DENIED,
    grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Exit.UNAVAILABLE,
}


@dataclass
class State:
    """The global options, and the profile and connection they lead to (opened on first use)."""

    config: str | None = None
    profile_name: str | None = None
    output: Format = Format.TABLE
    _profile: Profile | None = field(default=None, repr=False)

    @property
    def profile(self) -> Profile:
        if self._profile is None:
            self._profile = load_profile(self.profile_name, self.config)
        return self._profile

    def purpose(self, explicit: str | None) -> str:
        """The purpose stated for a read: the option, else the profile's default."""
        return explicit if explicit is not None else self.profile.purpose


def state(ctx: typer.Context) -> State:
    found = ctx.find_object(State)
    assert found is not None, "the root command sets the state"
    return found


def fail(message: str, code: Exit = Exit.FAILED) -> typer.Exit:
    """Print `message` to stderr and return the exit to raise."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(int(code))


def refused(error: grpc.RpcError) -> typer.Exit:
    """A refused call in words (status, message, field violations, reason) and its exit code."""
    report = error_report(error)
    for line in report.lines():
        err.print(line, highlight=False, markup=False)
    return typer.Exit(int(_EXIT_BY_CODE.get(report.code, Exit.FAILED)))


def run(ctx: typer.Context, work: Callable[[Connection, State], Coroutine[Any, Any, T]]) -> T:
    """Run `work(connection, state)` on the profile's connection; a refused call becomes its
    words on stderr and an exit code, a profile problem exit 3.

        @app.command()
        def get(ctx: typer.Context, subject: str) -> None:
            async def work(egret: Connection, settings: State) -> None: ...
            run(ctx, work)
    """
    settings = state(ctx)
    try:
        profile = settings.profile
    except ProfileError as exc:
        raise fail(str(exc), Exit.CONFIG) from None

    async def main() -> T:
        async with Connection(profile) as connection:
            return await work(connection, settings)

    try:
        return asyncio.run(main())
    except grpc.RpcError as exc:
        raise refused(exc) from None
    except ProfileError as exc:
        raise fail(str(exc), Exit.CONFIG) from None


_KINDS = {
    "person": subject_pb2.SUBJECT_KIND_PERSON,
    "organization": subject_pb2.SUBJECT_KIND_ORGANIZATION,
}
# The scheme names a kind: resident ids and passports are persons, USCCs organizations.
_KIND_OF_SCHEME = {"resident-id": "person", "passport": "person", "uscc": "organization"}


def subject_ref(text: str) -> subject_pb2.SubjectRef:
    """A subject named on the command line: `SCHEME:VALUE` (resident-id:3502…, uscc:91…),
    `KIND/SCHEME:VALUE` for another scheme, or `key:HEX` for a pseudonymous subject key."""
    if text.startswith("key:"):
        return subject_pb2.SubjectRef(subject_key=text[4:])
    kind, _, rest = text.rpartition("/")
    scheme, sep, value = rest.partition(":")
    if not sep or not scheme or not value:
        raise typer.BadParameter(f"{text!r}: name a subject as SCHEME:VALUE (resident-id:…), or key:HEX")
    kind = kind or _KIND_OF_SCHEME.get(scheme.lower(), "")
    if kind not in _KINDS:
        raise typer.BadParameter(f"{text!r}: say the kind, person/{scheme}:… or organization/{scheme}:…")
    return subject_pb2.SubjectRef(
        subject=subject_pb2.Subject(kind=_KINDS[kind], id_scheme=scheme, id_value=value)
    )


def optional_subject(text: str | None) -> subject_pb2.SubjectRef | None:
    """A subject the command line may leave out, or None (the request leaves it unset: a
    subject reads its own; for anyone else the service refuses it, naming `subject`)."""
    return None if text is None else subject_ref(text)


class Paged(Protocol):
    next_page_token: str

    def MergeFrom(self, other_msg: Self, /) -> None: ...


P = TypeVar("P", bound=Paged)


async def pages(fetch: Callable[[str], Awaitable[P]], token: str, follow: bool) -> P:
    """The page at `token`; with `follow`, it and every later page as one response (repeated
    fields appended, next_page_token empty at the end)."""
    response = await fetch(token)
    while follow and response.next_page_token:
        page = await fetch(response.next_page_token)
        response.MergeFrom(page)
        response.next_page_token = page.next_page_token
    return response


class PagedRequest(Protocol):
    page_token: str
    purpose: str


R = TypeVar("R", bound=PagedRequest)


def read_pages(
    ctx: typer.Context,
    rpc: Callable[[Connection], Callable[[R], Awaitable[P]]],
    request: R,
    *,
    page_token: str,
    follow: bool,
    purpose: str | None,
) -> P:
    """A paged read (`request` without its page token and purpose): the page at `page_token`,
    or with `follow` every page from there, stating the purpose given or the profile's."""

    async def work(egret: Connection, settings: State) -> P:
        request.purpose = settings.purpose(purpose)
        call = rpc(egret)

        def fetch(token: str) -> Awaitable[P]:
            # Pages are read one after another, so the one request is re-sent with each token.
            request.page_token = token
            return call(request)

        return await pages(fetch, page_token, follow)

    return run(ctx, work)


def listing(ctx: typer.Context, response: Any, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A page as a table (with how to read the next one) or as the response itself."""
    emit(ctx.obj.output, response, columns=columns, rows=rows, after=more_hint(response.next_page_token))


def more_hint(token: str) -> Callable[[], None]:
    """After a table: how to read the next page, on stderr (stdout keeps only the table)."""

    def hint() -> None:
        if token:
            err.print(f"more: --page-token {token} (or --all)", highlight=False, markup=False)

    return hint


def show(fmt: Format, data: Any, draw: Callable[[], None]) -> None:
    """JSON/YAML of `data`, or for a table whatever `draw` prints (several tables)."""
    if fmt is Format.TABLE:
        draw()
    else:
        emit(fmt, data)


def word(enum: Any, value: int) -> str:
    """An enum value in words: EntryStatus ENTRY_STATUS_ACTIVE → "active"."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"
    name = name.removeprefix(prefix)
    return "" if name == "UNSPECIFIED" else name.lower().replace("_", " ")


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def joined(items: Iterable[Any], empty: str = "") -> str:
    text = ", ".join(str(item) for item in items)
    return text or empty


def day(stamp: Timestamp) -> str:
    """A timestamp's date (UTC) for a wide table, or empty when unset."""
    return when(stamp)[:10]


def when(stamp: Timestamp) -> str:
    """A timestamp for a table: ISO 8601 in UTC to the second, or empty when unset."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
