"""Asking a service for its grpc.health.v1 status, from scripts, `clipsearch up` and tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import TlsFiles


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


def wait_serving(address: str, processes: Sequence[subprocess.Popen[bytes]] = (),
                 timeout_s: float = 600.0, **tls: Unpack[TlsFiles]) -> None:
    """Returns once `address` is SERVING; raises if a watched process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with "
                                   f"{process.returncode}")
        if health_status(address, **tls) == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f} s")
