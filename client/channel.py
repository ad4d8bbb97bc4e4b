"""Channel setup shared by the client stubs: limits, TLS and the bearer token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self, TypedDict

import grpc

from clipsearch.grpc_options import message_options


class TlsFiles(TypedDict, total=False):
    """PEM files for a TLS connection: the CA to trust, and a client certificate for mTLS."""

    tls_ca: str
    tls_cert: str
    tls_key: str


class ClientOptions(TlsFiles, total=False):
    """Keyword options of EncoderClient and SearchClient."""

    token: str  # sent as `authorization: Bearer <token>`
    timeout_s: float  # deadline of each call (default 60)


def balancing_options(health_service: str = "") -> list[tuple[str, str | int]]:
    """Channel options that spread calls round-robin over every address of the target
    (`dns:///encoder:50051`, `ipv4:10.0.0.1:50051,10.0.0.2:50051`) and send them only to
    addresses whose `grpc.health.v1` status for `health_service` is SERVING: client-side
    health checking (gRPC A17) over the health service's Watch. A replica still loading its
    model, or draining after SIGTERM, gets no calls; it gets them again as soon as it
    reports SERVING. A server without a health service counts as healthy."""
    config = {"loadBalancingConfig": [{"round_robin": {}}],
              "healthCheckConfig": {"serviceName": health_service}}
    return [("grpc.service_config", json.dumps(config)),
            # this config, not one a DNS TXT record might carry
            ("grpc.service_config_disable_resolution", 1),
            # A server's max connection age (GOAWAY) makes the channel re-resolve its DNS
            # name; gRPC's default spacing of 30 s between resolutions would delay finding
            # a new replica by that much.
            ("grpc.dns_min_time_between_resolutions_ms", 2000)]


def open_channel(address: str, *, token: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", max_message_mb: float = 64.0,
                 health_service: str | None = None) -> grpc.Channel:
    """A channel to `address`; TLS when a CA or client certificate is given, and the
    token sent as `authorization: Bearer <token>` on every call. With `health_service`,
    calls go round-robin to the addresses that report it SERVING (`balancing_options`);
    without, the channel talks to whatever answers (as a health probe must)."""
    options: list[tuple[str, str | int]] = [*message_options(max_message_mb)]
    if health_service is not None:
        options += balancing_options(health_service)
    if not (tls_ca or tls_cert):
        if token:
            # A bearer token over plaintext is allowed only on loopback-style local use;
            # grpc refuses call credentials on insecure channels, so add it as metadata.
            return grpc.intercept_channel(grpc.insecure_channel(address, options),
                                          _TokenInterceptor(token))
        return grpc.insecure_channel(address, options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials, options)


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._metadata]
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request_iterator)


class StubClient:
    """What both clients share: one channel (limits, TLS, token, health-aware
    round-robin), a default deadline, and closing as a context manager."""

    # The grpc.health.v1 service name whose SERVING status admits calls to an address
    # ("": the server as a whole; None: no health checking).
    health_service: str | None = ""

    def __init__(self, address: str, *, token: str = "", timeout_s: float = 60.0,
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_channel(address, token=token, tls_ca=tls_ca, tls_cert=tls_cert,
                                     tls_key=tls_key, health_service=self.health_service)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
