"""Scoped tokens on a real search service (a process on loopback): each scope against
each RPC, token rotation by SIGHUP with a call in flight, per-caller limits with a noisy
and a quiet caller, the audit trail, metrics by token name, `clipsearch up` passing SIGHUP
on, and no token value in the log. The encoder's side is in test_access_encoder.py."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clipsearch.access import METHOD_SCOPES, SCOPES
from clipsearch.search.v1 import search_pb2
from tests.access_calls import (
    AUTH_CODES,
    LEGACY,
    SEARCH_SERVICE,
    TOKENS,
    assert_no_secret_in,
    call,
    json_lines,
    method,
    token_file,
    wait_for_log,
)
from tests.servers import RunningService, free_port, running, tagged_processes


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


def index_stub(channel: grpc.Channel) -> Any:
    """The Index method of `channel`, a stream in both directions."""
    return channel.stream_stream("/clipsearch.search.v1.Search/Index",
                                 request_serializer=search_pb2.IndexItem.SerializeToString,
                                 response_deserializer=search_pb2.IndexResult.FromString)


def held_index(channel: grpc.Channel, items: list[search_pb2.IndexItem], token: str,
               release: threading.Event) -> Iterator[search_pb2.IndexResult]:
    """An Index call with `token` whose stream `held_stream` holds open until `release`."""
    results: Iterator[search_pb2.IndexResult] = index_stub(channel)(
        held_stream(items, release), metadata=(("authorization", f"Bearer {token}"),),
        timeout=60)
    return results


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
    metadata = (("authorization", f"Bearer {TOKENS['indexer'][0]}"),
                ("x-request-id", "audit-index-1"))
    results = list(index_stub(channel)(iter(items), metadata=metadata, timeout=60))
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
    held = held_index(channel, _index_items(photos[3:6], "/held/"), TOKENS["indexer"][0],
                      release)
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
    doomed = TOKENS["doomed"][0]
    stats = method(SEARCH_SERVICE, "Stats")
    assert call(channel, SEARCH_SERVICE, stats, doomed).code == grpc.StatusCode.OK
    in_flight = held_index(channel, _index_items(photos[6:9], "/rotation/"), doomed, release)
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


# ---- last: what the log holds -------------------------------------------------------------


def test_no_token_value_in_the_log(search: RunningService) -> None:
    log = search.log()
    assert "audit" in log and "refused" in log  # the log saw the calls
    assert_no_secret_in(log)
