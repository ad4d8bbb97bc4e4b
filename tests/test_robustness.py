"""Load and hostile input: backpressure, fuzzed requests of every message, silent streams."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import EncoderClient, ResourceExhausted, SearchClient
from clipsearch.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from clipsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.servers import RunningService, health_status, running

# What each RPC may answer, by its documented error semantics; never UNKNOWN or INTERNAL.
ENCODER_STATUSES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.RESOURCE_EXHAUSTED}
SEARCH_STATUSES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                   grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pair(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[RunningService, RunningService]]:
    logs = tmp_path_factory.mktemp("robust")
    with running(["serve", "encoder", "--model", str(tiny_clip), "--max-items-per-call", "64"],
                 logs / "encoder.log") as encoder, \
        running(["serve", "search", "--encoder", encoder.address, "--milvus",
                 str(logs / "milvus.db")], logs / "search.log") as search:
        yield encoder, search


def status_of(call: object, *args: object) -> grpc.StatusCode:
    try:
        call(*args, timeout=30)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


texts = st.lists(st.text(max_size=300), max_size=80)
images = st.lists(st.one_of(st.binary(max_size=2000),
                            st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
                                             b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 "])), max_size=8)
filters = st.builds(search_pb2.Filter, uri_prefix=st.text(max_size=40),
                    metadata=st.lists(st.builds(search_pb2.MetadataMatch,
                                                key=st.text(max_size=20),
                                                values=st.lists(st.text(max_size=20),
                                                                max_size=4)), max_size=3),
                    expression=st.text(max_size=40))
top_k = st.one_of(st.integers(-5, 1100), st.sampled_from([0, 1, 1000, 1001, 1_000_000, -2**31]))


@FUZZ
@given(texts=texts, images=images)
def test_fuzzed_encoder_requests(pair: tuple[RunningService, RunningService],
                                 texts: list[str], images: list[bytes]) -> None:
    encoder, _ = pair
    with grpc.insecure_channel(encoder.address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        assert status_of(stub.EncodeText, encoder_pb2.EncodeTextRequest(texts=texts)) \
            in ENCODER_STATUSES
        assert status_of(stub.EncodeImage, encoder_pb2.EncodeImageRequest(images=images)) \
            in ENCODER_STATUSES


@FUZZ
@given(text=st.text(max_size=200), image=st.binary(max_size=500), k=top_k, where=filters,
       ids=st.lists(st.text(max_size=70), max_size=5))
def test_fuzzed_search_requests(pair: tuple[RunningService, RunningService], text: str,
                                image: bytes, k: int, where: search_pb2.Filter,
                                ids: list[str]) -> None:
    _, search = pair
    with grpc.insecure_channel(search.address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        for call, request in (
                (stub.SearchText, search_pb2.SearchTextRequest(text=text, top_k=k, filter=where)),
                (stub.SearchImage, search_pb2.SearchImageRequest(image=image, top_k=k,
                                                                 filter=where)),
                (stub.Delete, search_pb2.DeleteRequest(ids=ids, filter=where)),
                (stub.Stats, search_pb2.StatsRequest())):
            assert status_of(call, request) in SEARCH_STATUSES, request


@FUZZ
@given(items=st.lists(st.builds(search_pb2.IndexItem, image=st.binary(max_size=300),
                                uri=st.text(max_size=50),
                                metadata_json=st.one_of(st.text(max_size=40), st.builds(
                                    json.dumps, st.dictionaries(st.text(max_size=5),
                                                                st.integers())))),
                      max_size=6))
def test_fuzzed_index_streams(pair: tuple[RunningService, RunningService],
                              items: list[search_pb2.IndexItem]) -> None:
    _, search = pair
    with grpc.insecure_channel(search.address) as channel:
        results = list(search_pb2_grpc.SearchStub(channel).Index(iter(items), timeout=30))
    assert [r.sequence for r in results] == list(range(len(items)))
    for result in results:
        assert result.status in (search_pb2.IndexResult.FAILED, search_pb2.IndexResult.ADDED,
                                 search_pb2.IndexResult.EXISTING)
        if result.status == search_pb2.IndexResult.FAILED:
            assert result.error and result.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_services_healthy_after_fuzzing(pair: tuple[RunningService, RunningService]) -> None:
    encoder, search = pair
    assert health_status(encoder.address) == health_status(search.address) == "SERVING"
    assert encoder.process.poll() is None and search.process.poll() is None


def test_silent_stream_does_not_block_others(pair: tuple[RunningService, RunningService],
                                             photos: list[Path]) -> None:
    """A client that opens an Index stream and goes quiet holds no one else up; its own
    deadline ends it."""
    _, search = pair
    release = threading.Event()

    def silent() -> Iterator[search_pb2.IndexItem]:
        release.wait(20)
        return
        yield  # an iterator that yields nothing until released

    with grpc.insecure_channel(search.address) as channel:
        stream = search_pb2_grpc.SearchStub(channel).Index(silent(), timeout=3)
        with SearchClient(search.address) as client:
            started = time.monotonic()
            assert client.index_files(photos[:2]).failed == 0
            client.search_text("a red circle")
            assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as raised:
            list(stream)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
    assert health_status(search.address) == "SERVING"


def test_full_queue_answers_resource_exhausted_at_once(random_vit_b32: Path, photos: list[Path],
                                                       tmp_path: Path) -> None:
    """Past its bounded queue the encoder refuses at once; what it accepted, it finishes."""
    with running(["serve", "encoder", "--model", str(random_vit_b32), "--precision", "fp32",
                  "--max-queue", "8", "--max-batch", "4"], tmp_path / "encoder.log") as encoder, \
            EncoderClient(encoder.address) as client:
        image = photos[0].read_bytes()

        def one(_: int) -> str:
            started = time.monotonic()
            try:
                client.encode_images([image])
            except ResourceExhausted:
                return f"refused in {time.monotonic() - started:.2f}"
            return "ok"

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            outcomes = list(pool.map(one, range(40)))
        refused = [o for o in outcomes if o.startswith("refused")]
        assert outcomes.count("ok") >= 8 and len(refused) >= 10
        assert outcomes.count("ok") + len(refused) == 40
        assert max(float(o.split()[-1]) for o in refused) < 1.0
        assert client.encode_images([image]).shape == (1, 512)


def test_a_text_does_not_wait_behind_image_batches(encoder_fp32: RunningService,
                                                  photos: list[Path]) -> None:
    """Each tower has its own thread: a search's text is encoded while a long image job
    (three fp32 batches of 32, over a second each) is still running."""
    images = [p.read_bytes() for p in photos[:96]]
    image_job: list[float] = []

    def encode_images() -> None:
        with EncoderClient(encoder_fp32.address, timeout_s=120) as client:
            client.encode_images(images)
            image_job.append(time.monotonic())

    busy = threading.Thread(target=encode_images)
    busy.start()
    time.sleep(0.4)  # the first image batch (~1.5 s) has started
    with EncoderClient(encoder_fp32.address, timeout_s=0.5) as client:
        vectors = client.encode_texts(["a white dog"])  # raises past 0.5 s
    text_done = time.monotonic()
    busy.join(120)
    assert vectors.shape == (1, 512)
    assert image_job and image_job[0] > text_done + 1.0
