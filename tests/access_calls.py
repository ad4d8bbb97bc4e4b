"""What the access tests share: the token sets, token files, one call of any RPC with a
token, and reading the services' JSON logs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from clipsearch.encoder.v1 import encoder_pb2
from clipsearch.search.v1 import search_pb2
from tests.servers import RunningService

SEARCH_SERVICE = search_pb2.DESCRIPTOR.services_by_name["Search"]
ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"]
LEGACY = "legacy-secret-0000"  # --token: every scope
# name -> (token, scopes); "web" is stored in the file as plain text, the rest as hashes.
TOKENS = {
    "reader": ("reader-secret-1111", "search"),
    "indexer": ("indexer-secret-2222", "index"),
    "admin": ("admin-secret-3333", "admin"),
    "noisy": ("noisy-secret-4444", "search"),
    "quiet": ("quiet-secret-5555", "search"),
    "doomed": ("doomed-secret-6666", "search,index"),
    "web": ("web-secret-7777", "search"),
}
ENCODER_TOKENS = {
    "search-svc": ("svc-secret-8888", "search  unlimited"),
    "tool": ("tool-secret-9999", "search"),
    "indexer": ("indexer-secret-2222", "index"),
    "admin": ("admin-secret-3333", "admin"),
}
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.RESOURCE_EXHAUSTED)


def token_file(path: Path, tokens: dict[str, tuple[str, str]]) -> Path:
    lines = ["# name  token-or-hash  scopes"]
    for name, (token, scopes) in tokens.items():
        stored = token if name == "web" else \
            "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        lines.append(f"{name}  {stored}  {scopes}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailing: dict[str, str]


def call(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor,
         token: str | None, request: Any = None, timeout_s: float = 30.0) -> Outcome:
    """Calls one method with its empty request (an empty stream for Index)."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    kind: Any = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (method.client_streaming, method.server_streaming)]
    stub = kind(f"/{service.full_name}/{method.name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString)
    if request is None:
        request = iter(()) if method.client_streaming else request_cls()
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    try:
        result = stub(request, metadata=metadata, timeout=timeout_s)
        if method.server_streaming:
            list(result)
    except grpc.RpcError as error:
        pairs: Any = error.trailing_metadata() or ()  # type: ignore[attr-defined]
        trailing = {str(k): str(v) for k, v in pairs}
        return Outcome(error.code(), error.details() or "", trailing)  # type: ignore[attr-defined]
    return Outcome(grpc.StatusCode.OK, "", {})


def method(service: ServiceDescriptor, name: str) -> MethodDescriptor:
    return service.methods_by_name[name]


def json_lines(service: RunningService) -> list[dict[str, Any]]:
    entries = []
    for line in service.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


def wait_for_log(service: RunningService, text: str, count: int = 1,
                 timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while service.log().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{service.log()}"
        time.sleep(0.05)


def assert_no_secret_in(log: str) -> None:
    """No token of either token set appears in `log`, in clear or hashed."""
    secrets = {LEGACY, *(t for t, _ in TOKENS.values()), *(t for t, _ in ENCODER_TOKENS.values())}
    for secret in secrets:
        assert secret not in log
        assert hashlib.sha256(secret.encode()).hexdigest() not in log
