"""Server reflection under both of its names: grpc.reflection.v1 (what grpcurl, Postman and
buf curl ask first) and grpc.reflection.v1alpha (what older tools ask).

grpcio-reflection implements v1alpha only. The two protocols' messages are the same on the
wire (v1 is v1alpha renamed), so one servicer answers both: its handler is registered under
the v1 name too, and the v1 file descriptor, v1alpha's with the package renamed, is added
to the descriptor pool so that reflection can describe itself under either name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection of `service_names` (and of both reflection services) on `server`."""
    _add_v1_descriptor(descriptor_pool.Default())
    servicer: Any = reflection.aio.ReflectionServicer([*service_names, V1, V1ALPHA])
    for name in (V1, V1ALPHA):
        handlers = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    if _has_file(pool, _V1_FILE):  # a second server in the same process
        return
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, V1.rsplit(".", 1)[0]
    proto.name, proto.package = _V1_FILE, new
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{old}."):
                field.type_name = f".{new}." + field.type_name.removeprefix(f".{old}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{new}." + method.input_type.removeprefix(f".{old}.")
            method.output_type = f".{new}." + method.output_type.removeprefix(f".{old}.")
    pool.Add(proto)


def _has_file(pool: descriptor_pool.DescriptorPool, name: str) -> bool:
    try:
        pool.FindFileByName(name)
    except KeyError:
        return False
    return True
