"""Asking a service for its grpc.health.v1 status: `clipsearch health`, `clipsearch up`, tests."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def health_status(address: str, service: str = "", timeout_s: float = 2.0, *,
                  tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> str:
    """SERVING / NOT_SERVING / SERVICE_UNKNOWN, or DOWN when nothing answers.
    Health needs no token; over TLS give the CA (and a client certificate for mTLS)."""
    from client.channel import open_channel

    with open_channel(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

