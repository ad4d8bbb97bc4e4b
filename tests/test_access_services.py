"""Scoped tokens on real services (processes on loopback): each scope against each RPC of
both services, token rotation by SIGHUP with a call in flight, a renewed TLS certificate
served after SIGHUP, per-caller limits with a noisy and a quiet caller, the audit trail,
metrics by token name, and no token value in any log."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from client.channel import TlsFiles
from clipsearch.access import METHOD_SCOPES, SCOPES
from clipsearch.encoder.v1 import encoder_pb2
from clipsearch.search.v1 import search_pb2
from tests.certs import Certificates, make_certificates
from tests.servers import RunningService, free_port, running, tagged_processes

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


@pytest.fixture(scope="module")
def access_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access")


@pytest.fixture(scope="module")
def search_tokens(access_dir: Path) -> Path:
    return token_file(access_dir / "search.tokens", TOKENS)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def search(encoder_tiny: RunningService, access_dir: Path, search_tokens: Path,
           metrics_port: int) -> Iterator[RunningService]:
    """A search service with a token file, --token, limits (search: 2/s with a burst of 20;
    index: one stream at a time), JSON logs and metrics."""
    with running(["serve", "search", "--encoder", encoder_tiny.address, "--milvus",
                  str(access_dir / "milvus.db"), "--token-file", str(search_tokens),
                  "--rate-limit", "search=2/20", "--concurrency-limit", "index=1",
                  "--log-json", "--metrics-port", str(metrics_port)],
                 access_dir / "search.log", env={"CLIPSEARCH_SEARCH_TOKEN": LEGACY}) as service:
        yield service


@pytest.fixture
def channel(search: RunningService) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(search.address) as opened:
        yield opened


def _index_items(photos: list[Path], prefix: str) -> list[search_pb2.IndexItem]:
    return [search_pb2.IndexItem(image=p.read_bytes(), uri=f"{prefix}{p.name}") for p in photos]


def held_stream(items: list[search_pb2.IndexItem], release: threading.Event
                ) -> Iterator[search_pb2.IndexItem]:
    """An Index stream that stays open until `release`: two items in two batches (the
    service answers a batch once the next one is being prepared, so the first answer
    comes while the stream is held), then the third item once released."""
    yield items[0]
    time.sleep(0.3)  # longer than the service's pause that closes a batch
    yield items[1]
    if not release.wait(30):
        raise RuntimeError("the test never released the stream")
    yield items[2]


# ---- the matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reader", "indexer", "admin", "web", "legacy"])
def test_each_scope_against_each_search_rpc(channel: grpc.Channel, name: str) -> None:
    token, scopes = (LEGACY, ",".join(SCOPES)) if name == "legacy" else TOKENS[name]
    for rpc in SEARCH_SERVICE.methods:
        needed = METHOD_SCOPES[f"/{SEARCH_SERVICE.full_name}/{rpc.name}"]
        outcome = call(channel, SEARCH_SERVICE, rpc, token)
        if needed in scopes.split(","):
            # It reached the service (an empty request may well be INVALID_ARGUMENT).
            assert outcome.code not in AUTH_CODES, (name, rpc.name, outcome)
        else:
            assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, (name, rpc.name, outcome)
            assert f"'{needed}' scope" in outcome.details and repr(name) in outcome.details


def test_missing_or_unknown_token_is_unauthenticated(channel: grpc.Channel) -> None:
    for token in (None, "", "reader-secret-111", "reader-secret-11111",
                  "sha256:" + hashlib.sha256(b"reader-secret-1111").hexdigest()):
        for rpc in SEARCH_SERVICE.methods:
            outcome = call(channel, SEARCH_SERVICE, rpc, token)
            assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, (token, rpc.name, outcome)
    # Health needs no token.
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- the audit trail ----------------------------------------------------------------------


def test_audit_lines_of_index_and_delete(channel: grpc.Channel, search: RunningService,
                                         photos: list[Path]) -> None:
    index = method(SEARCH_SERVICE, "Index")
    items = _index_items(photos[:3], "/audit/")
    stub = channel.stream_stream("/clipsearch.search.v1.Search/Index",
                                 request_serializer=search_pb2.IndexItem.SerializeToString,
                                 response_deserializer=search_pb2.IndexResult.FromString)
    results = list(stub(iter(items), metadata=(("authorization", f"Bearer {TOKENS['indexer'][0]}"),
                                               ("x-request-id", "audit-index-1")), timeout=60))
    assert [r.status for r in results] == [search_pb2.IndexResult.ADDED] * 3, results
    delete = channel.unary_unary("/clipsearch.search.v1.Search/Delete",
                                 request_serializer=search_pb2.DeleteRequest.SerializeToString,
                                 response_deserializer=search_pb2.DeleteResponse.FromString)
    reply = delete(search_pb2.DeleteRequest(filter=search_pb2.Filter(uri_prefix="/audit/")),
                   metadata=(("authorization", f"Bearer {TOKENS['admin'][0]}"),
                             ("x-request-id", "audit-delete-1")), timeout=30)
    assert reply.deleted == 3
    refused = call(channel, SEARCH_SERVICE, index, TOKENS["reader"][0])
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    wait_for_log(search, "audit-delete-1")
    audit = [e for e in json_lines(search) if e.get("logger") == "clipsearch.audit"]
    [deleted] = [e for e in audit if e.get("request_id") == "audit-delete-1"]
    assert deleted["rpc"] == "Delete" and deleted["caller"] == "admin", deleted
    assert deleted["target"] == 'filter={"uri_prefix":"/audit/"}', deleted
    assert deleted["rows"] == 3 and deleted["status"] == "OK", deleted
    assert "127.0.0.1" in deleted["peer"], deleted
    [done] = [e for e in json_lines(search) if e.get("message") == "rpc done"
              and e.get("request_id") == "audit-delete-1"]
    assert done["caller"] == "admin", done  # the access log names the token too
    [indexed] = [e for e in audit if e.get("request_id") == "audit-index-1"]
    assert indexed["rpc"] == "Index" and indexed["caller"] == "indexer", indexed
    assert indexed["rows"] == 3 and indexed["target"] == "items=3 ADDED=3", indexed
    # A read is not audited; a refusal is logged (as a warning) with the token's name.
    assert not [e for e in audit if e.get("caller") == "reader"], audit
    assert any(e.get("level") == "warning" and e.get("caller") == "reader"
               and e.get("status") == "PERMISSION_DENIED" for e in json_lines(search))


# ---- limits -------------------------------------------------------------------------------


def test_a_noisy_caller_is_limited_and_a_quiet_one_is_not(channel: grpc.Channel) -> None:
    stats = method(SEARCH_SERVICE, "Stats")
    noisy, quiet = [], []
    for i in range(40):
        noisy.append(call(channel, SEARCH_SERVICE, stats, TOKENS["noisy"][0]))
        if i % 4 == 0:
            quiet.append(call(channel, SEARCH_SERVICE, stats, TOKENS["quiet"][0]))
    codes = [o.code for o in noisy]
    assert codes[:20] == [grpc.StatusCode.OK] * 20, codes  # the burst
    refused = [o for o in noisy if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) >= 15, codes  # 2/s refill: a few more pass while the loop runs
    assert all(o.code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
               for o in noisy), codes
    for outcome in refused:
        wait_ms = int(outcome.trailing["retry-after-ms"])
        assert 0 < wait_ms <= 500, outcome  # one token every 500 ms
        assert "'noisy'" in outcome.details and "rate limit" in outcome.details, outcome
    assert [o.code for o in quiet] == [grpc.StatusCode.OK] * 10, quiet
    # The wait it names is enough.
    time.sleep(int(refused[-1].trailing["retry-after-ms"]) / 1000 + 0.05)
    assert call(channel, SEARCH_SERVICE, stats, TOKENS["noisy"][0]).code == grpc.StatusCode.OK


def test_the_client_error_carries_the_retry_hint(search: RunningService) -> None:
    from client import ResourceExhausted, SearchClient

    with SearchClient(search.address, token=TOKENS["noisy"][0]) as client, \
            pytest.raises(ResourceExhausted) as caught:
        for _ in range(40):  # past the burst, if the test before left any
            client.stats()
    assert caught.value.retry_after_s is not None and 0 < caught.value.retry_after_s <= 0.5


def test_concurrency_limit_holds_back_the_same_caller_only(channel: grpc.Channel,
                                                           photos: list[Path]) -> None:
    index = method(SEARCH_SERVICE, "Index")
    release = threading.Event()
    items = _index_items(photos[3:6], "/held/")

    def slow_items() -> Iterator[search_pb2.IndexItem]:
        yield from held_stream(items, release)

    stub = channel.stream_stream("/clipsearch.search.v1.Search/Index",
                                 request_serializer=search_pb2.IndexItem.SerializeToString,
                                 response_deserializer=search_pb2.IndexResult.FromString)
    held: Iterator[search_pb2.IndexResult] = stub(  # type: ignore[assignment]
        slow_items(), metadata=(("authorization", f"Bearer {TOKENS['indexer'][0]}"),),
        timeout=60)
    try:
        first = next(held)  # the stream is running and holds the indexer's one slot
        assert first.status == search_pb2.IndexResult.ADDED
        second = call(channel, SEARCH_SERVICE, index, TOKENS["indexer"][0])
        assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED, second
        assert "already has 1 index call" in second.details
        assert int(second.trailing["retry-after-ms"]) > 0
        assert call(channel, SEARCH_SERVICE, index, LEGACY).code == grpc.StatusCode.OK
    finally:
        release.set()
    assert [r.status for r in held] == [search_pb2.IndexResult.ADDED] * 2
    assert call(channel, SEARCH_SERVICE, index, TOKENS["indexer"][0]).code == grpc.StatusCode.OK


# ---- rotation -----------------------------------------------------------------------------


def test_sighup_removes_a_token_while_its_call_in_flight_finishes(
        channel: grpc.Channel, search: RunningService, search_tokens: Path,
        photos: list[Path]) -> None:
    release = threading.Event()
    items = _index_items(photos[6:9], "/rotation/")

    def slow_items() -> Iterator[search_pb2.IndexItem]:
        yield from held_stream(items, release)

    stub = channel.stream_stream("/clipsearch.search.v1.Search/Index",
                                 request_serializer=search_pb2.IndexItem.SerializeToString,
                                 response_deserializer=search_pb2.IndexResult.FromString)
    doomed = TOKENS["doomed"][0]
    stats = method(SEARCH_SERVICE, "Stats")
    assert call(channel, SEARCH_SERVICE, stats, doomed).code == grpc.StatusCode.OK
    in_flight: Iterator[search_pb2.IndexResult] = stub(  # type: ignore[assignment]
        slow_items(), metadata=(("authorization", f"Bearer {doomed}"),), timeout=60)
    try:
        assert next(in_flight).status == search_pb2.IndexResult.ADDED
        reloads = search.log().count("reloaded")
        token_file(search_tokens, {k: v for k, v in TOKENS.items() if k != "doomed"})
        search.process.send_signal(signal.SIGHUP)
        wait_for_log(search, "reloaded", reloads + 1)
        assert search.process.poll() is None, "SIGHUP stopped the service"
        refused = call(channel, SEARCH_SERVICE, stats, doomed)
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED, refused
        assert call(channel, SEARCH_SERVICE, stats, TOKENS["web"][0]).code == \
            grpc.StatusCode.OK
    finally:
        release.set()
    # The call that began before the reload ends as it began.
    assert [r.status for r in in_flight] == [search_pb2.IndexResult.ADDED] * 2
    # A broken file is not taken: the tokens in force stay.
    search_tokens.write_text("reader nonsense-line\n")
    search.process.send_signal(signal.SIGHUP)
    wait_for_log(search, "token file not reloaded")
    assert call(channel, SEARCH_SERVICE, stats, TOKENS["web"][0]).code == grpc.StatusCode.OK
    token_file(search_tokens, TOKENS)
    search.process.send_signal(signal.SIGHUP)
    wait_for_log(search, "reloaded", reloads + 2)
    assert call(channel, SEARCH_SERVICE, stats, doomed).code == grpc.StatusCode.OK


# ---- metrics, the CLI, startup ------------------------------------------------------------


def test_metrics_by_token_name(channel: grpc.Channel, metrics_port: int) -> None:
    assert call(channel, SEARCH_SERVICE, method(SEARCH_SERVICE, "Stats"),
                TOKENS["reader"][0]).code == grpc.StatusCode.OK
    call(channel, SEARCH_SERVICE, method(SEARCH_SERVICE, "Stats"), "wrong")
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    assert 'clipsearch_caller_requests_total{caller="reader",method="Stats",status="OK"}' \
        in text
    assert ('clipsearch_caller_refusals_total{caller="unknown",method="Stats",'
            'reason="unauthenticated"}') in text
    assert 'caller="reader",method="Index",reason="permission"' in text


def test_cli_takes_the_token_from_a_file(search: RunningService, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKENS["reader"][0] + "\n")
    command = [sys.executable, "-m", "clipsearch.cli", "stats", "--address", search.address]
    done = subprocess.run([*command, "--token-file", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**_clean_env(), "CLIPSEARCH_TOKEN_FILE": str(path)})
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*command, "--token", "wrong"], capture_output=True, text=True,
                          timeout=60, env=_clean_env())
    assert done.returncode == 2 and "UNAUTHENTICATED" in done.stderr, done.stderr


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}


def test_a_bad_token_file_stops_the_start_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ok  good-secret-9999  search\nbad  bad-secret-9999  read,write\n")
    done = subprocess.run([sys.executable, "-m", "clipsearch.cli", "serve", "search",
                           "--encoder", "127.0.0.1:9", "--milvus", str(tmp_path / "m.db"),
                           "--token-file", str(path)], capture_output=True, text=True,
                          timeout=60, env=_clean_env())
    assert done.returncode == 2, done.stderr
    assert f"cannot start: {path}:2: token 'bad'" in done.stderr, done.stderr
    assert "secret" not in done.stderr.replace(str(path), "")


# ---- the encoder: scopes over TLS, certificate renewal ----------------------------------------


@pytest.fixture(scope="module")
def cert_sets(access_dir: Path) -> tuple[Certificates, Certificates]:
    return make_certificates(access_dir / "certs-a"), make_certificates(access_dir / "certs-b")


@pytest.fixture(scope="module")
def encoder(tiny_clip: Path, access_dir: Path,
            cert_sets: tuple[Certificates, Certificates]) -> Iterator[RunningService]:
    """An encoder with a token file, serving TLS from files that the test later renews;
    callers but the search service (`unlimited`) get 3 calls, then 1 a second."""
    first, _ = cert_sets
    cert, key = access_dir / "served.pem", access_dir / "served.key"
    shutil.copy(first.server_cert, cert)
    shutil.copy(first.server_key, key)
    tokens = token_file(access_dir / "encoder.tokens", ENCODER_TOKENS)
    with running(["serve", "encoder", "--model", str(tiny_clip), "--device", "cpu",
                  "--token-file", str(tokens), "--tls-cert", str(cert), "--tls-key", str(key),
                  "--rate-limit", "search=1/3", "--log-json"], access_dir / "encoder.log",
                 tls=TlsFiles(tls_ca=first.ca)) as service:
        yield service


def _tls_channel(address: str, ca: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes())
    # A channel of its own (no shared subchannel): each check makes a new handshake.
    return grpc.secure_channel(address, credentials, [("grpc.use_local_subchannel_pool", 1)])


@pytest.mark.parametrize("name", ["search-svc", "indexer", "admin"])
def test_each_scope_against_each_encoder_rpc(encoder: RunningService, name: str,
                                             cert_sets: tuple[Certificates, Certificates]
                                             ) -> None:
    token, scopes = ENCODER_TOKENS[name]
    with _tls_channel(f"localhost:{encoder.port}", cert_sets[0].ca) as tls:
        for rpc in ENCODER_SERVICE.methods:
            needed = METHOD_SCOPES[f"/{ENCODER_SERVICE.full_name}/{rpc.name}"]
            outcome = call(tls, ENCODER_SERVICE, rpc, token)
            if needed in scopes.split()[0].split(","):
                assert outcome.code not in AUTH_CODES, (name, rpc.name, outcome)
            else:
                assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, (name, rpc.name)
        outcome = call(tls, ENCODER_SERVICE, method(ENCODER_SERVICE, "GetModelInfo"), None)
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED


def test_encoder_limits_other_callers_than_the_search_service(
        encoder: RunningService, cert_sets: tuple[Certificates, Certificates]) -> None:
    info = method(ENCODER_SERVICE, "GetModelInfo")
    with _tls_channel(f"localhost:{encoder.port}", cert_sets[0].ca) as tls:
        tool = [call(tls, ENCODER_SERVICE, info, ENCODER_TOKENS["tool"][0]).code
                for _ in range(8)]
        service = [call(tls, ENCODER_SERVICE, info, ENCODER_TOKENS["search-svc"][0]).code
                   for _ in range(8)]
    assert tool[:3] == [grpc.StatusCode.OK] * 3, tool
    assert tool.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4, tool
    assert service == [grpc.StatusCode.OK] * 8, service


def _handshake_ok(address: str, ca: str) -> bool:
    with _tls_channel(address, ca) as tls:
        outcome = call(tls, ENCODER_SERVICE, method(ENCODER_SERVICE, "GetModelInfo"),
                       ENCODER_TOKENS["search-svc"][0], timeout_s=5)
    return outcome.code == grpc.StatusCode.OK


def test_sighup_serves_a_renewed_certificate(encoder: RunningService, access_dir: Path,
                                             cert_sets: tuple[Certificates, Certificates]
                                             ) -> None:
    first, renewed = cert_sets
    address = f"localhost:{encoder.port}"
    with _tls_channel(address, first.ca) as kept:  # a connection open across the renewal
        info = method(ENCODER_SERVICE, "GetModelInfo")
        assert call(kept, ENCODER_SERVICE, info, ENCODER_TOKENS["search-svc"][0]).code == \
            grpc.StatusCode.OK
        assert _handshake_ok(address, first.ca)
        assert not _handshake_ok(address, renewed.ca)
        reloads = encoder.log().count("TLS certificate")
        shutil.copy(renewed.server_cert, access_dir / "served.pem")
        shutil.copy(renewed.server_key, access_dir / "served.key")
        encoder.process.send_signal(signal.SIGHUP)
        wait_for_log(encoder, "TLS certificate", reloads + 1)
        assert encoder.process.poll() is None, "SIGHUP stopped the encoder"
        assert _handshake_ok(address, renewed.ca)
        assert not _handshake_ok(address, first.ca)
        # The call on the connection opened before still works (no downtime for it).
        assert call(kept, ENCODER_SERVICE, info, ENCODER_TOKENS["search-svc"][0]).code == \
            grpc.StatusCode.OK


# ---- clipsearch up ------------------------------------------------------------------------


def test_up_passes_sighup_on_to_a_service_with_a_token_file(tmp_path: Path,
                                                            tiny_clip: Path) -> None:
    from tests.test_up import assert_all_gone, start_up, wait_ready

    tokens = token_file(tmp_path / "tokens", {"reader": TOKENS["reader"]})
    up = start_up(tmp_path, tiny_clip, "--token-file", str(tokens))
    try:
        wait_ready(up)
        stats = method(SEARCH_SERVICE, "Stats")
        with grpc.insecure_channel(f"127.0.0.1:{up.ports[0]}") as opened:
            assert call(opened, SEARCH_SERVICE, stats, TOKENS["reader"][0]).code == \
                grpc.StatusCode.OK
            token_file(tokens, {"web": TOKENS["web"]})
            up.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while "reloaded: 1 token" not in up.log():
                assert time.monotonic() < deadline, up.log()
                time.sleep(0.1)
            assert up.process.poll() is None, up.log()
            assert call(opened, SEARCH_SERVICE, stats, TOKENS["reader"][0]).code == \
                grpc.StatusCode.UNAUTHENTICATED
            assert call(opened, SEARCH_SERVICE, stats, TOKENS["web"][0]).code == \
                grpc.StatusCode.OK
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(30) == 0, up.log()
        assert_all_gone(up)
        assert up.log().count("stopping: health NOT_SERVING") == 2, up.log()
    finally:
        for pid in tagged_processes(up.tag):
            os.kill(pid, signal.SIGKILL)
        up.process.wait()


# ---- last: what the logs hold -------------------------------------------------------------


def test_no_token_value_in_any_log(search: RunningService, encoder: RunningService) -> None:
    secrets = {LEGACY, *(t for t, _ in TOKENS.values()), *(t for t, _ in ENCODER_TOKENS.values())}
    logs = search.log() + encoder.log()
    assert "audit" in logs and "refused" in logs  # the logs saw the calls
    for secret in secrets:
        assert secret not in logs
        assert hashlib.sha256(secret.encode()).hexdigest() not in logs
