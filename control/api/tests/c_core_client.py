"""A stock gRPC C-core client (Python grpcio) against xlbd's API, as a user would write it.

Usage: c_core_client.py TARGET [FRONTEND_NAME]

TARGET is a gRPC target such as unix:/run/xlb/xlbd.sock. The channel gets no options (no
authority override): C-core then sends the percent-encoded socket path as :authority. The
script checks the health service, finds xlb.v1.Xlb through server reflection, and calls
ListFrontends (and, with FRONTEND_NAME, CreateFrontend) with message classes built from the
reflected descriptors only. It prints one JSON object on stdout; exit code 0 when every call
succeeded, 1 otherwise (the failing call and its status on stderr).
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

# Older C-core sent "localhost" for unix: targets; from 1.57 on it sends the path. Refuse to
# pass with an old library, which would not exercise what this test is about.
MIN_GRPC = (1, 57)


def message_class(descriptor):
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:
        return get(descriptor)
    return message_factory.MessageFactory().GetPrototype(descriptor)


def unary(channel, service, method, request):
    """Calls SERVICE/METHOD with a dict REQUEST, using only reflected descriptors."""
    m = service.methods_by_name[method]
    req_cls = message_class(m.input_type)
    resp_cls = message_class(m.output_type)
    call = channel.unary_unary(
        f"/{service.full_name}/{method}",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    response = call(json_format.ParseDict(request, req_cls()), timeout=10)
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


def main():
    target = sys.argv[1]
    create = sys.argv[2] if len(sys.argv) > 2 else None
    version = tuple(int(p) for p in grpc.__version__.split(".")[:2])
    if version < MIN_GRPC:
        print(f"grpcio {grpc.__version__} is older than {MIN_GRPC}", file=sys.stderr)
        return 1
    out = {"grpcio": grpc.__version__}
    step = "connect"
    try:
        with grpc.insecure_channel(target) as channel:
            step = "grpc.health.v1.Health/Check"
            health = health_pb2_grpc.HealthStub(channel)
            overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            xlb = health.Check(health_pb2.HealthCheckRequest(service="xlb.v1.Xlb"), timeout=10)
            out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(overall.status)
            out["health_xlb"] = health_pb2.HealthCheckResponse.ServingStatus.Name(xlb.status)

            step = "reflection: list services"
            db = ProtoReflectionDescriptorDatabase(channel)
            out["services"] = sorted(db.get_services())
            step = "reflection: xlb.v1.Xlb descriptors"
            pool = descriptor_pool.DescriptorPool(db)
            service = pool.FindServiceByName("xlb.v1.Xlb")

            step = "xlb.v1.Xlb/ListFrontends"
            listed = unary(channel, service, "ListFrontends", {})
            out["frontends"] = [f["name"] for f in listed.get("frontends", [])]
            out["generation"] = int(listed.get("generation", 0))
            if create:
                step = "xlb.v1.Xlb/CreateFrontend"
                created = unary(
                    channel,
                    service,
                    "CreateFrontend",
                    {
                        "frontend": {
                            "name": create,
                            "address": "198.18.0.99",
                            "kind": "FRONTEND_KIND_PUBLIC",
                        }
                    },
                )
                out["created_generation"] = int(created.get("generation", 0))
    except grpc.RpcError as e:
        print(f"{step}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
