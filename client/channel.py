"""Channel setup shared by the client stubs: limits, TLS and the bearer token."""

from __future__ import annotations

from pathlib import Path
from typing import Self, TypedDict

import grpc

from clipsearch.serving import message_options


class TlsFiles(TypedDict, total=False):
    """PEM files for a TLS connection: the CA to trust, and a client certificate for mTLS."""

    tls_ca: str
    tls_cert: str
    tls_key: str


class ClientOptions(TlsFiles, total=False):
    """Keyword options of EncoderClient and SearchClient."""

    token: str  # sent as `authorization: Bearer <token>`
    timeout_s: float  # deadline of each call (default 60)


def open_channel(address: str, *, token: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", max_message_mb: float = 64.0) -> grpc.Channel:
    """A channel to `address`; TLS when a CA or client certificate is given, and the
    token sent as `authorization: Bearer <token>` on every call."""
    options = message_options(max_message_mb)
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
    """What both clients share: one channel (limits, TLS, token), a default deadline,
    and closing as a context manager."""

    def __init__(self, address: str, *, token: str = "", timeout_s: float = 60.0,
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_channel(address, token=token, tls_ca=tls_ca, tls_cert=tls_cert,
                                     tls_key=tls_key)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
