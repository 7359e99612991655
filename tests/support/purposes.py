"""Stating a purpose in tests: every caller but a subject reading its own data must."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import pytest

from tests.support.status import bad_request

Stub = TypeVar("Stub")


class _Purposed:
    def __init__(self, stub: Any, purpose: str) -> None:
        self._stub = stub
        self._purpose = purpose

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(request: Any, **options: Any) -> Any:
            if "purpose" in request.DESCRIPTOR.fields_by_name and not request.purpose:
                request.purpose = self._purpose
            return method(request, **options)

        return call


def purposed(stub: Stub, purpose: str) -> Stub:
    """`stub`, stating `purpose` (a code of config/purposes.yaml) on every request that
    has a purpose field and states none."""
    return cast(Stub, _Purposed(stub, purpose))


# Purposes every read refuses, as (purpose, purpose_note), with the violation each gets.
BAD_PURPOSES: list[tuple[str, str, tuple[str, str]]] = [
    ("curiosity", "", ("purpose", "UNKNOWN_PURPOSE")),
    ("", "case 7", ("purpose", "REQUIRED")),
    ("operations", "x\ny", ("purpose_note", "INVALID_CHARACTERS")),
    ("operations", "key " + "c0" * 32, ("purpose_note", "LOOKS_LIKE_IDENTIFIER")),
]


async def assert_bad_purposes_refused(call: Callable[[str, str], Awaitable[object]]) -> None:
    """`call` (a read, given its purpose and note) refuses each of BAD_PURPOSES with
    INVALID_ARGUMENT naming the field."""
    for purpose, note, violation in BAD_PURPOSES:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(purpose, note)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (purpose, note)
        assert violation in bad_request(refused.value), (purpose, note)
