"""Faults with real processes: kill -9 the encoder or the search service mid-index,
restart an encoder under a running search service, lose one of two replicas."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from client import IndexSummary, SearchClient, Unavailable
from tests.servers import RunningService, free_port, health_status, running, start_service

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def succeeds(client: SearchClient) -> bool:
    try:  # a new text each time: a cached one would not need the encoder
        client.search_text(f"a red circle {time.monotonic_ns()}")
    except Unavailable:
        return False
    return True


def count(address: str) -> int:
    with SearchClient(address, timeout_s=10) as client:
        return client.stats().count


def test_encoder_killed_during_index(random_vit_b32: Path, tmp_path: Path) -> None:
    """The index command reports the failed items and exits non-zero; after the encoder is
    back, the same command completes the set with exactly one row per image."""
    encoder_args = ["serve", "encoder", "--model", str(random_vit_b32), "--precision", "bf16"]
    port = free_port()
    encoder = start_service(encoder_args, tmp_path / "encoder.log", port=port)
    with running(["serve", "search", "--encoder", encoder.address, "--milvus",
                  str(tmp_path / "milvus.db"), "--encoder-retries", "1"],
                 tmp_path / "search.log") as search:
        index = [sys.executable, "-m", "clipsearch.cli", "index", str(PHOTOS), "--quiet",
                 "--address", search.address]
        first = subprocess.Popen(index, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: count(search.address) >= 32, 120, "indexing did not start")
        encoder.stop(signal.SIGKILL)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 1
        assert "FAILED" in err and f"encoder unavailable ({encoder.address})" in err
        stored_after_kill = count(search.address)
        assert 32 <= stored_after_kill < 200
        restarted = start_service(encoder_args, tmp_path / "encoder.log", port=port)
        try:
            second = subprocess.run(index, capture_output=True, text=True, timeout=300)
        finally:
            restarted.stop()
        assert second.returncode == 0, second.stderr
        assert f"{200 - stored_after_kill} added, {stored_after_kill} already present" \
            in second.stdout
        assert count(search.address) == 200


def test_search_service_killed_mid_index(encoder_fp32: RunningService, photos: list[Path],
                                         tmp_path: Path) -> None:
    """What was acknowledged as added survives kill -9; a restart on the same Milvus Lite
    path opens and searches without manual steps; a re-run completes without duplicates."""
    args = ["serve", "search", "--encoder", encoder_fp32.address, "--milvus",
            str(tmp_path / "milvus.db")]
    port = free_port()
    search = start_service(args, tmp_path / "search.log", port=port)
    acknowledged: list[str] = []
    result: list[IndexSummary] = []

    def on_result(summary: IndexSummary) -> None:
        acknowledged[:] = list(summary.ids.values())

    def index() -> None:
        with SearchClient(search.address) as client:
            result.append(client.index_files(photos, on_result=on_result))

    thread = threading.Thread(target=index)
    thread.start()
    wait_for(lambda: len(acknowledged) >= 40, 120, "indexing did not start")
    search.stop(signal.SIGKILL)
    thread.join(60)
    summary = result[0]
    assert summary.error.startswith("UNAVAILABLE") and summary.failed > 0
    kept = set(acknowledged)
    with running(args, tmp_path / "search.log", port=port) as again:
        with SearchClient(again.address) as client:
            assert client.stats().count >= len(kept)
            assert len(client.search_text("a dog", top_k=5)) == 5
            rerun = client.index_files(photos)
            assert rerun.failed == 0
            assert kept <= {rerun.ids[str(p.resolve())] for p in photos}
            assert rerun.existing >= len(kept)
            assert rerun.added + rerun.existing == 200
            assert client.stats().count == 200
        assert again.stop() == 0


def test_encoder_restart_under_running_search(tiny_clip: Path, tmp_path: Path) -> None:
    """Encoder down: UNAVAILABLE at once, naming it. Back: searches work again, with no
    restart of the search service. SIGTERM stops the search service cleanly."""
    encoder_args = ["serve", "encoder", "--model", str(tiny_clip)]
    port = free_port()
    encoder = start_service(encoder_args, tmp_path / "encoder.log", port=port)
    search = start_service(["serve", "search", "--encoder", encoder.address, "--milvus",
                            str(tmp_path / "milvus.db")], tmp_path / "search.log")
    try:
        with SearchClient(search.address, timeout_s=10) as client:
            assert client.search_text("a red circle") == []
            encoder.stop(signal.SIGKILL)
            assert client.search_text("a red circle") == []  # its vector is cached
            started = time.monotonic()
            with pytest.raises(Unavailable, match=f"encoder unavailable \\({encoder.address}\\)"):
                client.search_text("a red square")
            assert time.monotonic() - started < 5
            encoder = start_service(encoder_args, tmp_path / "encoder.log", port=port)
            wait_for(lambda: succeeds(client), 10, "searches did not recover")
    finally:
        encoder.stop()
        code = search.stop(signal.SIGTERM)
    assert code == 0
    assert "stopping: health NOT_SERVING" in search.log()


def test_losing_one_of_two_replicas_loses_no_search(tiny_clip: Path, tmp_path: Path) -> None:
    args = ["serve", "encoder", "--model", str(tiny_clip)]
    with running(args, tmp_path / "a.log") as first, running(args, tmp_path / "b.log") as second, \
        running(["serve", "search", "--encoder", f"{first.address},{second.address}",
                 "--milvus", str(tmp_path / "milvus.db")], tmp_path / "search.log") as search:
        with SearchClient(search.address, timeout_s=10) as client:
            for i in range(4):  # new texts: a cached one would not reach a replica
                client.search_text(f"a blue star, warm-up {i}")
            first.stop(signal.SIGKILL)
            results = [client.search_text(f"a blue star {i}") for i in range(20)]
        assert len(results) == 20
        assert second.process.poll() is None


def test_milvus_server_down_then_back(encoder_fp32: RunningService, tmp_path: Path) -> None:
    """Milvus down: UNAVAILABLE naming Milvus, promptly; back: the service recovers alone."""
    from tests.milvus_server import start_milvus_server

    milvus = start_milvus_server(tmp_path / "milvus-server")
    try:
        with running(["serve", "search", "--encoder", encoder_fp32.address, "--milvus",
                      milvus.uri], tmp_path / "search.log") as search, \
                SearchClient(search.address, timeout_s=30) as client:
            assert client.stats().count == 0
            milvus.stop()
            started = time.monotonic()
            with pytest.raises(Unavailable, match=re.escape(f"Milvus at {milvus.uri}")):
                client.stats()
            with pytest.raises(Unavailable, match="Milvus"):
                client.search_text("a dog")
            assert time.monotonic() - started < 30
            milvus.restart()
            wait_for(lambda: stats_ok(client), 120, "the service did not recover")
            assert search.process.poll() is None
    finally:
        milvus.stop()


def stats_ok(client: SearchClient) -> bool:
    try:
        client.stats()
    except Unavailable:
        return False
    return True


def test_sigterm_finishes_in_flight_index(encoder_fp32: RunningService, photos: list[Path],
                                          tmp_path: Path) -> None:
    """SIGTERM mid-stream: health goes NOT_SERVING, the stream in flight is answered in
    full within the grace period, what it acknowledged is stored, and the exit code is 0."""
    args = ["serve", "search", "--encoder", encoder_fp32.address, "--milvus",
            str(tmp_path / "milvus.db"), "--grace-s", "60"]
    search = start_service(args, tmp_path / "search.log")
    progress: list[int] = []
    result: list[IndexSummary] = []

    def index() -> None:
        with SearchClient(search.address) as client:
            result.append(client.index_files(photos[:64],
                                             on_result=lambda s: progress.append(s.total)))

    thread = threading.Thread(target=index)
    thread.start()
    wait_for(lambda: bool(progress), 60, "indexing did not start")
    search.process.send_signal(signal.SIGTERM)
    wait_for(lambda: health_status(search.address) in ("NOT_SERVING", "DOWN"), 10,
             "health did not leave SERVING")
    thread.join(120)
    assert search.process.wait(120) == 0
    summary = result[0]
    assert (summary.added, summary.failed, summary.error) == (64, 0, "")
    with running(args, tmp_path / "search.log") as again, SearchClient(again.address) as client:
        assert client.stats().count == 64
