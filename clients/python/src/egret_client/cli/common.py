"""What every subcommand shares: the connection of the chosen profile, the output format,
running a coroutine, turning a refusal into words and an exit code, naming a subject."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

import grpc
import typer
from google.protobuf.timestamp_pb2 import Timestamp

from egret.common.v1 import subject_pb2
from egret_client.cli.output import Format, err
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


async def gather(*calls: Awaitable[T]) -> list[T]:
    return list(await asyncio.gather(*calls))


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


def when(stamp: Timestamp) -> str:
    """A timestamp for a table: ISO 8601 in UTC to the second, or empty when unset."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
