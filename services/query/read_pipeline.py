"""The one way a read naming subjects is served: the stated purpose is checked, then one
access record per subject is committed with the read, and only then is the answer sent.

Every record is `read:<Method>` with the principal, role and stated purpose
(kit.audit.record), in query's own hash-chained log (services.query.stores.access_log).
A read whose record cannot be written fails with UNAVAILABLE (record-then-serve).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from egret.common.v1 import subject_pb2
from kit import audit
from kit.errors import Unavailable
from kit.principal import current_principal
from kit.pseudonym import Pseudonymiser
from kit.purposes import Purposes, StatedPurpose
from services.query import metrics
from services.query.messages import identifiers
from services.query.stores.access_log import READ_PREFIX, AccessRecorder
from services.query.subjects import SubjectKey, current_key

T = TypeVar("T")


class ReadPipeline:
    """Purpose → access record → read, for every RPC that names subjects."""

    def __init__(self, recorder: AccessRecorder, purposes: Purposes, pseudonymiser: Pseudonymiser) -> None:
        self._recorder = recorder
        self._purposes = purposes
        self._pseudonymiser = pseudonymiser

    def now(self) -> datetime:
        """The access log's clock."""
        return self._recorder.now()

    def purpose(self, request: Any, *subjects: subject_pb2.SubjectRef) -> StatedPurpose:
        """The request's purpose code and note, checked before any read (INVALID_ARGUMENT
        naming the field): a configured code the caller's role may state, required from
        all but a subject reading its own data, and a short note naming no identifier."""
        return self._purposes.check(
            current_principal(), request.purpose, request.purpose_note, identifiers=identifiers(subjects)
        )

    async def record(self, method: str, subject_keys: Sequence[str | None], purpose: StatedPurpose) -> None:
        """Commit one access record per subject before the answer is sent; a record that
        cannot be written fails the read with UNAVAILABLE.

        A record names the subject by its current generation's key when query derived the
        key (from a raw id or the subject's token; also while score still holds the subject
        under the previous one), with that generation. A key given by the caller or read from
        score's rows is recorded as it is, its generation unknown (NULL): ListAccessLog
        matches keys, not generations (services.query.stores.access_log)."""
        if not subject_keys:
            return
        metrics.read(method, purpose.code)
        at = self._recorder.now()
        generation = self._pseudonymiser.current_key_id
        records = [
            audit.record(
                READ_PREFIX + method,
                at,
                subject_key=None if key is None else current_key(key),
                purpose=purpose.code,
                target="" if key is None else current_key(key),
                detail=purpose.detail(),
                subject_key_id=generation if isinstance(key, SubjectKey) else None,
            )
            for key in subject_keys
        ]
        try:
            await self._recorder.record(records)
        except Exception as exc:  # whatever the store raised: the read must not be served
            raise Unavailable("the access log cannot be written; the read was not served") from exc

    async def serve(self, method: str, keys: Sequence[str], purpose: StatedPurpose, read: Awaitable[T]) -> T:
        """Run the read and commit its access records together: the answer leaves only
        once both succeeded (the read's own error first, else UNAVAILABLE for the log)."""
        answer, recorded = await asyncio.gather(
            read, self.record(method, keys, purpose), return_exceptions=True
        )
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(recorded, BaseException):
            raise recorded
        return answer
