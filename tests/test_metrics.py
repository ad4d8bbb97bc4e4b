"""Both services expose Prometheus metrics that move with real calls."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import EncoderClient, SearchClient
from tests.servers import RunningService, free_port, running


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


@pytest.fixture(scope="module")
def with_metrics(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[RunningService, int, RunningService, int]]:
    logs = tmp_path_factory.mktemp("metrics")
    encoder_port, search_port = free_port(), free_port()
    with running(["serve", "encoder", "--model", str(tiny_clip), "--metrics-port",
                  str(encoder_port)], logs / "encoder.log") as encoder, \
        running(["serve", "search", "--encoder", encoder.address, "--milvus",
                 str(logs / "milvus.db"), "--metrics-port", str(search_port)],
                logs / "search.log") as search:
        yield encoder, encoder_port, search, search_port


def test_metrics_move_with_calls(with_metrics: tuple[RunningService, int, RunningService, int],
                                 photos: list[Path]) -> None:
    encoder, encoder_port, search, search_port = with_metrics
    before = scrape(encoder_port)
    assert before["clipsearch_encoder_model_load_seconds"] > 0
    with EncoderClient(encoder.address) as client:
        client.encode_texts(["a red circle", "a blue star"])
        client.encode_images_results([photos[0].read_bytes(), b"junk"])
    with SearchClient(search.address) as client:
        assert client.index_files(photos[:5]).added == 5
        client.search_text("a green cross")
        assert client.stats().count == 5
    after = scrape(encoder_port)
    key = 'clipsearch_requests_total{method="EncodeText",status="OK"}'
    assert after[key] - before.get(key, 0) >= 2  # ours + the search service's query
    assert after['clipsearch_encoder_batch_size_count{tower="image"}'] >= 2
    assert after['clipsearch_encoder_item_errors_total{tower="image"}'] == 1
    assert 'clipsearch_encoder_queue_depth{tower="text"}' in after
    served = scrape(search_port)
    assert served['clipsearch_requests_total{method="Index",status="OK"}'] == 1
    assert served['clipsearch_indexed_items_total{status="ADDED"}'] == 5
    assert served['clipsearch_milvus_seconds_count{operation="upsert"}'] >= 1
    assert served["clipsearch_collection_size"] == 5
    assert served["clipsearch_search_batch_size_count"] == 1


def test_failed_calls_are_counted_by_status(
        with_metrics: tuple[RunningService, int, RunningService, int]) -> None:
    encoder, encoder_port, _, _ = with_metrics
    with EncoderClient(encoder.address) as client, pytest.raises(Exception, match="no texts"):
        client.encode_texts([])
    after = scrape(encoder_port)
    assert after['clipsearch_requests_total{method="EncodeText",status="INVALID_ARGUMENT"}'] == 1
