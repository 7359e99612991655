"""The staff console's calls to the services: one module per area, each building its
requests, calling through Backend.call with the staff member's own token and converting
the answers to plain records (services.portal.staff_records). The stated purposes are
those of config/purposes.yaml that each area's work is."""

from __future__ import annotations

from egret.common.v1 import subject_pb2

_KINDS = {"person": subject_pb2.SUBJECT_KIND_PERSON, "organization": subject_pb2.SUBJECT_KIND_ORGANIZATION}


def typed_subject(kind: str, scheme: str, value: str) -> subject_pb2.SubjectRef:
    """The subject a staff member typed the identifier of, as a SubjectRef: the service
    hashes it as ingest does; the portal never does, and never logs, traces or links it."""
    return subject_pb2.SubjectRef(
        subject=subject_pb2.Subject(kind=_KINDS[kind], id_scheme=scheme, id_value=value)
    )
