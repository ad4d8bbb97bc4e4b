"""Health-aware balancing (issue 17, defect 3): with two encoder replicas behind one target,
one of them still loading its model, no call reaches the loading one and none is retried.

The loading replica is a real encoder process whose first download of ViT-B/32 is held
stalled by a local weights mirror (tests/weights_server.py): exactly a replica on its first
start, listening with health NOT_SERVING."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import EncoderClient, SearchClient
from clipsearch.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from encoder_service import weights
from search_service.encoder_pool import split_targets
from tests.servers import RunningService, free_port, health_status, running, start_service
from tests.weights_server import WeightsServer, save_small_clip, serving


def rpc_count(metrics_port: int, method: str, host: str = "127.0.0.1") -> int:
    """Finished calls of `method`, any status, from the service's Prometheus metrics."""
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    pattern = rf'^clipsearch_requests_total\{{[^}}]*method="{method}"[^}}]*\}} ([0-9.e+]+)$'
    return int(sum(float(v) for v in re.findall(pattern, text, re.MULTILINE)))


class Replicas:
    """A serving encoder and a loading one, with their metrics ports."""

    def __init__(self, ready: RunningService, loading: RunningService, ready_metrics: int,
                 loading_metrics: int) -> None:
        self.ready, self.loading = ready, loading
        self.ready_metrics, self.loading_metrics = ready_metrics, loading_metrics

    @property
    def target(self) -> str:
        return f"ipv4:127.0.0.1:{self.ready.port},127.0.0.1:{self.loading.port}"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    folder = tmp_path_factory.mktemp("balancing")
    model = save_small_clip(folder / "small.pt")
    ready_metrics, loading_metrics = free_port(), free_port()
    with serving(WeightsServer(b"never served in full", modes=["stall"])) as mirror, \
            running(["serve", "encoder", "--model", str(model), "--device", "cpu",
                     "--precision", "fp32", "--metrics-port", str(ready_metrics)],
                    folder / "ready.log") as ready:
        loading = start_service(
            ["serve", "encoder", "--model", "ViT-B/32", "--weights-dir", str(folder / "w"),
             "--metrics-port", str(loading_metrics)], folder / "loading.log", wait=False,
            env={weights.MIRROR_ENV: mirror.base, weights.TIMEOUT_ENV: "600"})
        try:
            deadline = time.monotonic() + 60
            while not (mirror.requests and health_status(loading.address) == "NOT_SERVING"):
                assert loading.process.poll() is None, loading.log()
                assert time.monotonic() < deadline, loading.log()
                time.sleep(0.2)
            yield Replicas(ready, loading, ready_metrics, loading_metrics)
        finally:
            loading.stop()


def test_targets_with_several_addresses_stay_one_channel() -> None:
    assert split_targets("ipv4:127.0.0.1:1,127.0.0.1:2") == ["ipv4:127.0.0.1:1,127.0.0.1:2"]
    assert split_targets("dns:///encoder:50051") == ["dns:///encoder:50051"]
    assert split_targets("a:1, b:2") == ["a:1", "b:2"]


def test_the_loading_replica_gets_no_calls(replicas: Replicas) -> None:
    assert health_status(replicas.loading.address) == "NOT_SERVING"
    with EncoderClient(replicas.target, timeout_s=30) as client:
        for i in range(40):
            assert client.encode_texts([f"a photo number {i}"]).shape == (1, 64)
    assert rpc_count(replicas.ready_metrics, "EncodeText") >= 40
    assert rpc_count(replicas.loading_metrics, "EncodeText") == 0


def test_without_health_checking_the_loading_replica_refuses_calls(replicas: Replicas) -> None:
    """The control: plain round_robin (what the channels had before) sends every other call
    to the loading replica, which answers UNAVAILABLE; so the test above can fail."""
    before = rpc_count(replicas.loading_metrics, "GetModelInfo")
    options = [("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 0)]
    refused = 0
    with grpc.insecure_channel(replicas.target, options) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = encoder_pb2_grpc.EncoderStub(channel)
        time.sleep(0.5)  # both subchannels connected
        for _ in range(10):
            try:
                stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in (exc.details() or "")
                refused += 1
    assert refused >= 1
    assert rpc_count(replicas.loading_metrics, "GetModelInfo") - before == refused


@pytest.mark.parametrize("form", ["one target", "a list"])
def test_search_service_needs_no_retries(replicas: Replicas, tmp_path: Path, form: str) -> None:
    """Both forms of --encoder: one channel balancing over two addresses, and a plain list
    (a channel each, the pool passing over the one whose replica is not SERVING)."""
    target = replicas.target if form == "one target" else \
        f"127.0.0.1:{replicas.ready.port},127.0.0.1:{replicas.loading.port}"
    methods = ("EncodeText", "GetModelInfo")
    before = [rpc_count(replicas.loading_metrics, m) for m in methods]
    with running(["serve", "search", "--encoder", target,
                  "--milvus", str(tmp_path / "milvus.db")], tmp_path / "search.log") as search:
        with SearchClient(search.address, timeout_s=60) as client:
            for i in range(20):
                client.search_text(f"a red circle {i}", top_k=3)
        log = search.log()
    assert [rpc_count(replicas.loading_metrics, m) for m in methods] == before
    assert "unavailable (attempt" not in log, log


def test_sigterm_while_loading_ends_the_process_at_once(replicas: Replicas) -> None:
    """Last in this module: it stops the loading replica, whose download is stalled (its
    timeout is 600 s). The load runs on a daemon thread, so the process does not wait for
    it; before, it lived on until the download timed out."""
    assert replicas.loading.process.poll() is None
    started = time.monotonic()
    assert replicas.loading.stop(timeout_s=20) == 0, replicas.loading.log()
    assert time.monotonic() - started < 20
    assert "stopping: health NOT_SERVING" in replicas.loading.log()
