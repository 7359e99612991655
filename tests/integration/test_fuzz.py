"""Fuzzing every RPC of the four real services (TLS, tokens) on loopback: random bytes and
structure-aware mutations of valid requests, with no token, with a token whose role may
not call the RPC, and with one that may.

What must hold for every call: the answer is never UNKNOWN, INTERNAL or a missed deadline;
without a token it is UNAUTHENTICATED and with a refused role PERMISSION_DENIED, whatever
the bytes (authentication comes before decoding); nothing is logged at ERROR. Afterwards
every service still reports SERVING and answers valid calls.

RPCs are enumerated from the generated descriptors (gen/egret/**), so a new RPC is fuzzed
without touching this file. The seed is printed; replay a failure with
EGRET_FUZZ_SEED=<seed>. EGRET_FUZZ_CALLS sets the number of calls (`make fuzz`).

Plain `random` rather than hypothesis: the calls go to long-lived servers whose state each
call may change, so hypothesis' shrinking would replay against a different system, and its
example database does not fit a seed-replayed run; a seeded generator replays exactly.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pkgutil
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2

import egret
from contracts.score_store import ScoreAuditHead, ScoreAuditLog
from devtools.localpki import LocalPki, create_local_pki
from kit.audit_chain import POLICY as AUDIT_CHAIN_POLICY
from kit.audit_chain import AuditChainServicer
from kit.auth import PUBLIC_METHODS, CallPolicy
from kit.decoding import TIMESTAMP_MAX_SECONDS, TIMESTAMP_MIN_SECONDS
from kit.principal import Role
from kit.server import Service
from services.ingest import bootstrap as ingest_bootstrap
from services.query import bootstrap as query_bootstrap
from services.rules import bootstrap as rules_bootstrap
from services.score import bootstrap as score_bootstrap
from tests.support.ingest import ingest_settings
from tests.support.query import query_settings
from tests.support.rules import rules_settings
from tests.support.score import score_settings
from tests.support.security import principal_for, request_for, secured
from tests.support.servers import running

SEED = int(os.environ.get("EGRET_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
# Calls over all services; `make test` keeps it small, `make fuzz FUZZ_CALLS=...` goes long.
CALLS = int(os.environ.get("EGRET_FUZZ_CALLS") or 1200)
FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED)
DEADLINE_S = 10.0
SERVICES = ("ingest", "rules", "score", "query")
# kit's own services, which every service serves from the same code (egret.common.v1
# AuditChainService): fuzzed on one server.
SHARED = {"common": "score"}


def rpcs() -> Iterator[tuple[str, MethodDescriptor]]:
    """(service name, method) for every RPC of every service under gen/egret."""
    for module in pkgutil.walk_packages(egret.__path__, "egret."):
        if not module.name.endswith("_pb2"):
            continue
        file: Any = importlib.import_module(module.name).DESCRIPTOR
        service: ServiceDescriptor
        for service in file.services_by_name.values():
            name = service.full_name.split(".")[1]
            yield from ((name, method) for method in service.methods)


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def package_of(method: MethodDescriptor) -> str:
    return str(method.containing_service.full_name.split(".")[1])


def server_of(method: MethodDescriptor) -> str:
    """The service whose server the method is called on."""
    return SHARED.get(package_of(method), package_of(method))


def valid_request(method: MethodDescriptor, role: Role) -> Any:
    if package_of(method) in SHARED:
        return message_factory.GetMessageClass(method.input_type)()
    return request_for(package_of(method), method.name, role)


def policies() -> dict[str, CallPolicy]:
    every: dict[str, CallPolicy] = {}
    for name in SERVICES:
        every.update(importlib.import_module(f"services.{name}.access").POLICY)
    every.update(AUDIT_CHAIN_POLICY)
    return every


# --- what is sent -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


_EDGE_INTS = (0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 2**32 - 1)
_EDGE_SECONDS = (
    TIMESTAMP_MIN_SECONDS,
    TIMESTAMP_MAX_SECONDS,
    TIMESTAMP_MIN_SECONDS - 1,
    TIMESTAMP_MAX_SECONDS + 1,
    2**62,
    -(2**62),
    0,
)
_STRINGS = ("", "library", "a" * 64, "person:resident-id:350200199001011230", "\u202e\u0000x", "é" * 300)


def _random_value(field: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _random_message(cast(Descriptor, field.message_type), rng, depth + 1)
    if kind == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in cast(Any, field.enum_type).values]
        return rng.choice([*values, 99, -7, 2**31 - 1])
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, 0.5, 1.0, -1.0, 1e308, float("nan"), float("inf")])
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(
            [*_STRINGS, "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(20)))]
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randrange(40))
    bits = (
        32
        if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)
        else 64
    )
    unsigned = kind in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    )
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    value = rng.choice([*_EDGE_INTS, rng.randrange(-1000, 1000)])
    return min(max(value, low), high)


def _random_message(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> Any:
    message: Any = message_factory.GetMessageClass(descriptor)()
    if descriptor.full_name == "google.protobuf.Timestamp":
        seconds = rng.choice([*_EDGE_SECONDS, 1_780_000_000 + rng.randrange(-(10**8), 10**8)])
        message.seconds = seconds
        message.nanos = rng.choice([0, 999_999_999, -1, 1_000_000_000, rng.randrange(10**9)])
        return message
    if descriptor.full_name == "google.protobuf.Duration":
        message.seconds = rng.choice([0, 60, -60, 315_576_000_001, 2**62])
        message.nanos = rng.choice([0, -1, 999_999_999, 10**9])
        return message
    if depth > 4:
        return message
    for field in descriptor.fields:
        if rng.random() < 0.4:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for _ in range(rng.randrange(3)):
                key = rng.choice(["days_late", "amount", "", "x" * 200])
                target = getattr(message, field.name)
                value = _random_value(value_field, rng, depth)
                if value_field.message_type is not None:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
            continue
        try:
            if field.is_repeated:
                items = [_random_value(field, rng, depth) for _ in range(rng.randrange(4))]
                getattr(message, field.name).extend(items)
            elif field.message_type is not None:
                getattr(message, field.name).CopyFrom(_random_value(field, rng, depth))
            else:
                setattr(message, field.name, _random_value(field, rng, depth))
        except (ValueError, TypeError):
            continue  # a value protobuf itself refuses to hold (an out-of-range open enum)
    return message


def _string_fields(descriptor: Descriptor) -> list[int]:
    return [f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]


def mutations(method: MethodDescriptor, rng: random.Random) -> tuple[str, bytes]:
    """One request's bytes and a name for what was done to them."""
    descriptor = method.input_type
    base: Any = valid_request(method, Role.ADMIN)
    if rng.random() < 0.6:
        base.MergeFrom(_random_message(descriptor, rng))
    valid = base.SerializeToString()
    choice = rng.randrange(10)
    numbers = [f.number for f in descriptor.fields] or [1]
    if choice == 0:
        return "random bytes", rng.randbytes(rng.randrange(300))
    if choice == 1:
        return "structured", valid
    if choice == 2 and valid:
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return "bit flips", bytes(data)
    if choice == 3 and valid:
        return "truncated", valid[: rng.randrange(len(valid))]
    if choice == 4:
        number = rng.choice(numbers)
        wire_type = rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
        return f"wire type {wire_type} on field {number}", valid + _field(number, wire_type, rng.randbytes(9))
    if choice == 5:
        strings = _string_fields(descriptor) or numbers
        return "bad UTF-8", valid + _length_delimited(rng.choice(strings), b"ok\xff\xfe\xc0\x80")
    if choice == 6:
        huge = b"\xff" * rng.choice([9, 10, 11, 20]) + b"\x01"
        return "huge varint", valid + _varint(rng.choice(numbers) << 3) + huge
    if choice == 7:
        nested = b""
        for _ in range(rng.choice([50, 101, 500, 3000])):
            nested = _length_delimited(rng.choice(numbers), nested)
        return "deep nesting", valid + nested
    if choice == 8:
        size = rng.choice([64 * 1024, 1024 * 1024 + 10, 3 * 1024 * 1024])
        strings = _string_fields(descriptor) or numbers
        return f"huge ({size} bytes)", valid + _length_delimited(rng.choice(strings), b"x" * size)
    seconds = rng.choice(_EDGE_SECONDS)
    stamp = _field(1, 0, _varint(seconds)) + _field(2, 0, _varint(rng.choice([-1, 10**9, 0])))
    return "timestamp", valid + _length_delimited(rng.choice(numbers), stamp)


# --- running it ---------------------------------------------------------------------------


@dataclass
class Fleet:
    pki: LocalPki
    addresses: dict[str, str]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    pki = create_local_pki(tmp_path / "pki")
    url = {name: f"sqlite:///{tmp_path / name}.db" for name in SERVICES}
    addresses: dict[str, str] = {}
    async with AsyncExitStack() as stack:
        for name, settings, bootstrap in (
            ("score", lambda: score_settings(url["score"], tmp_path), score_bootstrap),
            ("rules", lambda: rules_settings(url["rules"], tmp_path, addresses["score"]), rules_bootstrap),
            (
                "ingest",
                lambda: ingest_settings(url["ingest"], tmp_path, addresses["rules"]),
                ingest_bootstrap,
            ),
            ("query", lambda: query_settings(url["score"], tmp_path), query_bootstrap),
        ):
            build = _with_audit_chain if name == SHARED["common"] else bootstrap.build
            addresses[name] = await stack.enter_async_context(
                running(secured(settings(), pki, name), build, bootstrap.MIGRATIONS)
            )
        yield Fleet(pki, addresses)


def _with_audit_chain(settings: Any) -> Service:
    """Score as `python -m services.score` serves it: with its audit chain's read (kit.app)."""
    service = score_bootstrap.build(settings)
    service.audit_chain = AuditChainServicer(settings.common, ScoreAuditLog, ScoreAuditHead)
    return service


def _tokens(pki: LocalPki, policy: CallPolicy) -> tuple[str, str | None]:
    """A token whose role may call the RPC, and one whose role may not (if any role may not)."""
    allowed = sorted(policy.roles)[0]
    scopes = tuple(policy.service_scopes)
    refused = next((r for r in Role if r not in policy.roles and r is not Role.SERVICE), None)
    return (
        pki.token(principal_for(allowed), allowed, scopes=scopes),
        pki.token(principal_for(refused), refused) if refused is not None else None,
    )


async def _call(channels: Channels, method: MethodDescriptor, payload: bytes, token: str | None) -> Any:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    name = server_of(method)
    try:
        if method.client_streaming:
            # The blocking client, in a thread: the asyncio client may report INTERNAL
            # instead of the server's status when the server ends a call while the client is
            # still writing (grpc/grpc issue 36066), as it does when it refuses a caller.
            valid = valid_request(method, Role.ADMIN).SerializeToString()
            stream: Any = channels.blocking[name].stream_stream(path_of(method), _as_is, _as_is)
            # The bad message in the middle of a stream of good ones.
            messages = [valid, payload, valid]
            await asyncio.to_thread(
                lambda: list(stream(iter(messages), timeout=DEADLINE_S, metadata=metadata))
            )
        elif method.server_streaming:
            # Read every response: the call's status comes at the end of the stream.
            responses = channels.aio[name].unary_stream(path_of(method), _as_is, _as_is)
            _ = [r async for r in responses(payload, timeout=DEADLINE_S, metadata=metadata)]
        else:
            await channels.aio[name].unary_unary(path_of(method), _as_is, _as_is)(
                payload, timeout=DEADLINE_S, metadata=metadata
            )
    except grpc.RpcError as error:
        call: Any = error
        return call.code(), call.details()
    return grpc.StatusCode.OK, ""


def _as_is(data: bytes) -> bytes:
    return data


@dataclass
class Channels:
    aio: dict[str, grpc.aio.Channel]
    blocking: dict[str, grpc.Channel]

    @classmethod
    def to(cls, fleet: Fleet) -> Channels:
        return cls(
            {name: grpc.aio.secure_channel(a, fleet.pki.tls()) for name, a in fleet.addresses.items()},
            {name: grpc.secure_channel(a, fleet.pki.tls()) for name, a in fleet.addresses.items()},
        )

    async def close(self) -> None:
        for channel in self.aio.values():
            await channel.close()
        for blocking in self.blocking.values():
            blocking.close()


async def test_no_malformed_call_gets_unknown_or_internal_and_services_stay_up(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    print(f"\nfuzz seed {SEED} ({CALLS} calls); replay with EGRET_FUZZ_SEED={SEED}")
    rng = random.Random(SEED)
    policy = policies()
    methods = list(rpcs())
    assert {name for name, _ in methods} == {*SERVICES, *SHARED}, "a service without a running server"
    assert {path_of(m) for _, m in methods} == set(policy), "every RPC in a policy and fuzzed"
    channels = Channels.to(fleet)
    tokens = {path_of(m): _tokens(fleet.pki, policy[path_of(m)]) for _, m in methods}
    failures: list[str] = []
    started = time.monotonic()
    caplog.set_level(logging.WARNING)
    try:
        for index in range(CALLS):
            name, method = methods[index % len(methods)]
            what, payload = mutations(method, rng)
            mode = rng.choice(["no token", "refused role", "allowed role", "allowed role"])
            allowed, refused = tokens[path_of(method)]
            if refused is None and mode == "refused role":
                mode = "allowed role"
            token = {"no token": None, "refused role": refused, "allowed role": allowed}[mode]
            code, details = await _call(channels, method, payload, token)
            expected = {
                "no token": grpc.StatusCode.UNAUTHENTICATED,
                "refused role": grpc.StatusCode.PERMISSION_DENIED,
            }
            # A request over the size limit is refused before anything reads it, by gRPC
            # itself or by kit.limits, whoever the caller is.
            refused_first = code == grpc.StatusCode.RESOURCE_EXHAUSTED and what.startswith("huge")
            bad = code in FORBIDDEN or (
                mode in expected
                and code != expected[mode]
                and not refused_first
                and path_of(method) not in PUBLIC_METHODS
            )
            if bad:
                failures.append(f"#{index} {path_of(method)} [{mode}, {what}] -> {code.name}: {details}")
        elapsed = time.monotonic() - started
        print(f"fuzz: {CALLS} calls in {elapsed:.1f} s, {len(failures)} failures")
        for name, channel in channels.aio.items():
            check: Any = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            health = await check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, name
        # Valid calls still answer: every RPC's plain request with an allowed token.
        for _, method in methods:
            valid = valid_request(method, Role.ADMIN).SerializeToString()
            code, details = await _call(channels, method, valid, tokens[path_of(method)][0])
            if code in FORBIDDEN:
                failures.append(f"after the fuzz {path_of(method)} [valid] -> {code.name}: {details}")
    finally:
        await channels.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, f"seed {SEED}: {len(failures)} failures\n" + "\n".join(failures[:40])
    assert not errors, f"seed {SEED}: logged at ERROR: {[r.getMessage()[:200] for r in errors[:10]]}"
