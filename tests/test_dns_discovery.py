"""Encoder replicas found as they come and go, under load, through a real DNS server on a
loopback port: a replica added to the name gets calls within 30 s with no restart of the
search service (the encoders' max connection age makes clients re-resolve), one stopped
with SIGTERM drains with no failed call, and one killed costs only retried calls."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.loadgen import LoadConfig, run
from client import SearchClient
from tests.dns_server import dns_server
from tests.servers import RunningService, free_port, running
from tests.test_balancing import rpc_count

NAME = "encoders.clipsearch.test"
AGE_S = "5"  # the encoders' max connection age; the default is 15 s


def start_encoder(model: Path, host: str, port: int, metrics_port: int,
                  log_path: Path, age_s: str = AGE_S) -> RunningService:
    process = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "serve", "encoder", "--model", str(model),
         "--device", "cpu", "--precision", "fp32", "--host", host, "--port", str(port),
         "--metrics-port", str(metrics_port), "--max-connection-age-s", age_s],
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
    service = RunningService(process, f"{host}:{port}", port, log_path)
    service.wait_serving()
    return service


def wait_for(condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic() - started


class Load:
    """The bundled load generator at concurrency 8 on SearchText, in the background, in
    rounds of 3 s until `finish()`; the statuses of every call are kept."""

    def __init__(self, address: str) -> None:
        self._config = LoadConfig(call="clipsearch.search.v1.Search.SearchText", host=address,
                                  # UUIDs: rounds restart the call numbers, and a text
                                  # seen before is a query-cache hit with no encoder call
                                  data={"text": "a red circle {{.UUID}}", "top_k": 5},
                                  concurrency=8, duration_s=3, timeout_s=20)
        self.statuses: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.statuses.update(asyncio.run(run(self._config)).statuses)

    def finish(self, after_s: float) -> Counter[str]:
        """Goes on for `after_s` more seconds, then stops; the statuses of all calls."""
        time.sleep(after_s)
        self._stop.set()
        self._thread.join()
        return self.statuses


@pytest.mark.slow
def test_replicas_join_and_leave_under_load(tiny_clip: Path, tmp_path: Path,
                                            photos: list[Path]) -> None:
    port = free_port()
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    metrics = {host: free_port() for host in hosts}
    with dns_server() as (zone, dns_port):
        zone.set(NAME, hosts[:1])
        first = start_encoder(tiny_clip, hosts[0], port, metrics[hosts[0]],
                              tmp_path / "encoder-1.log")
        replicas = [first]
        try:
            with running(["serve", "search", "--encoder",
                          f"dns://127.0.0.1:{dns_port}/{NAME}:{port}",
                          "--milvus", str(tmp_path / "milvus.db")],
                         tmp_path / "search.log") as search:
                with SearchClient(search.address) as client:
                    assert client.index_files(photos[:8]).added == 8
                load = Load(search.address)
                calls = {h: (lambda h=h: rpc_count(metrics[h], "EncodeText", h)) for h in hosts}
                # A second replica joins the name: it gets calls within 30 s.
                zone.set(NAME, hosts[:2])
                replicas.append(start_encoder(tiny_clip, hosts[1], port, metrics[hosts[1]],
                                              tmp_path / "encoder-2.log"))
                joined_s = wait_for(lambda: calls[hosts[1]]() > 0, 30)
                # The first one is stopped gracefully: it drains.
                zone.set(NAME, hosts[1:2])
                assert first.stop() == 0
                # A third joins, and the second is killed outright.
                zone.set(NAME, hosts[1:3])
                replicas.append(start_encoder(tiny_clip, hosts[2], port, metrics[hosts[2]],
                                              tmp_path / "encoder-3.log"))
                third_s = wait_for(lambda: calls[hosts[2]]() > 0, 30)
                zone.set(NAME, hosts[2:3])
                replicas[1].process.kill()
                replicas[1].process.wait()
                statuses = load.finish(after_s=5)
                served = {h: calls[h]() for h in hosts[2:]}
                count = sum(statuses.values())
                print(f"replicas joined after {joined_s:.1f} s and {third_s:.1f} s; {count} "
                      f"searches, statuses {dict(statuses)}; encoder calls served: {served}")
                assert statuses == {"OK": count}
                assert count > 100
        finally:
            for replica in replicas:
                replica.stop()


@pytest.mark.slow
def test_without_a_connection_age_a_new_replica_waits(tiny_clip: Path, tmp_path: Path,
                                                      photos: list[Path]) -> None:
    """The control: with no max connection age the search service's healthy connection
    never breaks, its channel never re-resolves, and a replica that joined gets nothing."""
    port = free_port()
    hosts = ["127.0.0.5", "127.0.0.6"]
    metrics = {host: free_port() for host in hosts}
    with dns_server() as (zone, dns_port):
        zone.set(NAME, hosts[:1])
        replicas = [start_encoder(tiny_clip, hosts[0], port, metrics[hosts[0]],
                                  tmp_path / "encoder-1.log", age_s="0")]
        try:
            with running(["serve", "search", "--encoder",
                          f"dns://127.0.0.1:{dns_port}/{NAME}:{port}",
                          "--milvus", str(tmp_path / "milvus.db")],
                         tmp_path / "search.log") as search:
                load = Load(search.address)
                zone.set(NAME, hosts)
                replicas.append(start_encoder(tiny_clip, hosts[1], port, metrics[hosts[1]],
                                              tmp_path / "encoder-2.log", age_s="0"))
                statuses = load.finish(after_s=12)
                assert statuses["OK"] > 0
                assert rpc_count(metrics[hosts[0]], "EncodeText", hosts[0]) > 0
                assert rpc_count(metrics[hosts[1]], "EncodeText", hosts[1]) == 0
        finally:
            for replica in replicas:
                replica.stop()
