"""Mutual TLS and bearer tokens on a service's settings, and the principal and request each RPC needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf import message_factory

from devtools.localpki import ISSUER, LocalPki
from egret.ingest.v1 import ingest_service_pb2
from egret.query.v1 import query_service_pb2
from egret.rules.v1 import rules_service_pb2
from egret.score.v1 import score_service_pb2
from kit.principal import Role
from kit.settings import SecuritySettings

DESCRIPTORS = {
    "ingest": ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"],
    "rules": rules_service_pb2.DESCRIPTOR.services_by_name["RulesService"],
    "score": score_service_pb2.DESCRIPTOR.services_by_name["ScoreService"],
    "query": query_service_pb2.DESCRIPTOR.services_by_name["QueryService"],
}


def secured(settings: Any, pki: LocalPki, name: str, **changes: Any) -> Any:
    env = pki.env(name)
    security = SecuritySettings(
        insecure=False,
        tls_cert_file=Path(env["EGRET_TLS_CERT_FILE"]),
        tls_key_file=Path(env["EGRET_TLS_KEY_FILE"]),
        tls_client_ca_file=Path(env["EGRET_TLS_CLIENT_CA_FILE"])
        if "EGRET_TLS_CLIENT_CA_FILE" in env
        else None,
        tls_ca_file=pki.ca_file,
        jwt_issuer=ISSUER,
        jwt_audience="egret",
        jwt_public_key_file=pki.jwt_public_key_file,
        service_token_file=pki.service_token_file(name),
        **changes,
    )
    return replace(settings, common=replace(settings.common, security=security))


def request_for(name: str, rpc: str, role: Role) -> Any:
    method = DESCRIPTORS[name].methods_by_name[rpc]
    request: Any = message_factory.GetMessageClass(method.input_type)()
    if name == "ingest":
        # The department token below is library's: submissions name it as their source,
        # retractions and corrections in the event they refer to.
        if "source" in request.DESCRIPTOR.fields_by_name:
            request.source = "library"
        else:
            request.ref.source = "library"
    return request


def principal_for(role: Role) -> str:
    return {
        Role.DEPARTMENT: "library",
        Role.SUBJECT: "person:resident-id:350200199001011230",
        Role.BENEFIT_PROVIDER: "library",
        Role.SERVICE: "egret-ingest",
    }.get(role, f"a-{role.value}")
