"""Stating a purpose in tests: every caller but a subject reading its own data must."""

from __future__ import annotations

from typing import Any, TypeVar, cast

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
