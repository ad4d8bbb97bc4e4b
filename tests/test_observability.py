"""One JSON log line per request, a request id that travels from search to encoder, and a
search deadline that bounds the encoder call it makes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import EncoderClient
from clipsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.servers import RunningService, running


def rpc_lines(service: RunningService) -> list[dict[str, Any]]:
    lines = []
    for line in service.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # third-party lines (Milvus Lite) are not ours
        if isinstance(entry, dict) and "rpc" in entry:
            lines.append(entry)
    return lines


@pytest.fixture(scope="module")
def json_logged(random_vit_b32: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[RunningService, RunningService]]:
    logs = tmp_path_factory.mktemp("json-logs")
    with running(["serve", "encoder", "--model", str(random_vit_b32), "--precision", "fp32",
                  "--log-json", "--max-batch", "64", "--max-items-per-call", "128"],
                 logs / "encoder.log") as encoder, \
        running(["serve", "search", "--encoder", encoder.address, "--milvus",
                 str(logs / "milvus.db"), "--log-json"], logs / "search.log") as search:
        yield encoder, search


def test_request_id_travels_and_each_request_logs_one_json_line(
        json_logged: tuple[RunningService, RunningService]) -> None:
    encoder, search = json_logged
    with grpc.insecure_channel(search.address) as channel:
        search_pb2_grpc.SearchStub(channel).SearchText(
            search_pb2.SearchTextRequest(text="a white dog"), timeout=60,
            metadata=(("x-request-id", "trace-abc-123"),))
    time.sleep(0.5)
    [searched] = [e for e in rpc_lines(search) if e.get("request_id") == "trace-abc-123"]
    assert searched["rpc"] == "/clipsearch.search.v1.Search/SearchText"
    assert searched["status"] == "OK" and isinstance(searched["ms"], float)
    [encoded] = [e for e in rpc_lines(encoder) if e.get("request_id") == "trace-abc-123"]
    assert encoded["rpc"] == "/clipsearch.encoder.v1.Encoder/EncodeText"


def test_search_deadline_bounds_the_encoder_call(
        json_logged: tuple[RunningService, RunningService]) -> None:
    encoder, search = json_logged
    long_texts = ["a photo of a very large white dog on a green lawn " * 8] * 128
    busy_vectors: list[np.ndarray] = []
    busy = threading.Thread(target=lambda: busy_vectors.append(
        EncoderClient(encoder.address, timeout_s=120).encode_texts(long_texts)))
    busy.start()  # the text tower is now busy for seconds (fp32, 128 texts of 77 tokens)
    time.sleep(1.0)
    started = time.monotonic()
    with grpc.insecure_channel(search.address) as channel, \
            pytest.raises(grpc.RpcError) as raised:
        search_pb2_grpc.SearchStub(channel).SearchText(
            # not the text above: that one's vector is cached, no encoder call to bound
            search_pb2.SearchTextRequest(text="a white dog behind a fence"), timeout=0.5,
            metadata=(("x-request-id", "deadline-1"),))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    busy.join(120)
    assert busy_vectors[0].shape == (128, 512)  # the load really ran
    [encoded] = [e for e in rpc_lines(encoder) if e.get("request_id") == "deadline-1"]
    assert encoded["status"] in ("DEADLINE_EXCEEDED", "CANCELLED")
    assert float(encoded["ms"]) < 700  # bounded by the caller's 0.5 s, not the 30 s default
