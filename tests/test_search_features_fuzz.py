"""Fuzzed input to every new field of issue 11 (min_score, pages, collapsing, SearchSimilar,
SearchCombined, Get, FindDuplicates): only documented statuses, and the service keeps
serving. Runs the tiny CLIP and Milvus Lite (cheap); the exact answers are checked in
tests/test_search_features.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from client import IndexItem, SearchClient
from clipsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.servers import RunningService, health_status, running

STATUSES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def service(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RunningService, list[str]]]:
    logs = tmp_path_factory.mktemp("features-fuzz")
    with running(["serve", "encoder", "--model", str(tiny_clip)], logs / "encoder.log") as enc, \
        running(["serve", "search", "--encoder", enc.address, "--milvus",
                 str(logs / "milvus.db")], logs / "search.log") as search:
        with SearchClient(search.address) as client:
            summary = client.index_items([IndexItem(_png(c), f"/{c}.png")
                                          for c in ("red", "green", "blue", "white")])
        yield search, list(summary.ids.values())


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([-1.0, 0.0, 1.0, -1.0000001, 1.0000001]))
options = st.fixed_dictionaries({
    "top_k": st.integers(-5, 1100), "page_size": st.integers(-3, 1100),
    "page_token": st.one_of(st.text(max_size=30), st.just("AQAAAATlFx-2n9hZzDZKV18")),
    "collapse_threshold": floats}, optional={"min_score": floats})
parts = st.lists(st.builds(
    search_pb2.QueryPart, text=st.text(max_size=20), weight=floats), max_size=18)


@FUZZ
@given(opts=options, text=st.text(max_size=40), image=st.binary(max_size=200),
       item_id=st.text(max_size=70), query=parts, ids=st.lists(st.text(max_size=70),
                                                                max_size=4),
       threshold=floats)
def test_fuzzed_new_fields(service: tuple[RunningService, list[str]], opts: dict[str, Any],
                           text: str, image: bytes, item_id: str,
                           query: list[search_pb2.QueryPart], ids: list[str],
                           threshold: float) -> None:
    search, stored = service
    with grpc.insecure_channel(search.address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        calls = [
            (stub.SearchText, search_pb2.SearchTextRequest(text=text or "x", **opts)),
            (stub.SearchImage, search_pb2.SearchImageRequest(image=image, **opts)),
            (stub.SearchSimilar, search_pb2.SearchSimilarRequest(id=item_id, **opts)),
            (stub.SearchSimilar, search_pb2.SearchSimilarRequest(id=stored[0], **opts)),
            (stub.SearchCombined, search_pb2.SearchCombinedRequest(parts=query, **opts)),
            (stub.Get, search_pb2.GetRequest(ids=ids, with_vectors=True)),
        ]
        for call, request in calls:
            try:
                call(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() in STATUSES, (request, exc.details())
        try:
            list(stub.FindDuplicates(search_pb2.FindDuplicatesRequest(threshold=threshold),
                                     timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() in STATUSES, (threshold, exc.details())


def test_still_serving_after_fuzzing(service: tuple[RunningService, list[str]]) -> None:
    search, stored = service
    assert health_status(search.address) == "SERVING"
    with SearchClient(search.address) as client:
        assert len(client.search_similar(stored[0], top_k=3)) == 3
        groups = list(client.find_duplicates(0.999))
        assert all(len(g) >= 2 for g in groups) and sum(map(len, groups)) <= 4
