"""Two models served side by side over one Milvus (issue 12): each search service follows its
own encoder's dimension and model in its own collection (`--collection`), and a search
service pointed at a collection of another model's dimension refuses to start, saying why.

The Milvus server (tests/milvus_server.py), not Milvus Lite: a Lite file is open in one
process at a time, so two search services serving at once over one Milvus needs the
server, which is also how such a deployment runs. The models: the tiny CLIP (64-d) and the
random ViT-B/32 (512-d), the session's encoders."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import EncoderClient, SearchClient
from tests.conftest import PHOTOS
from tests.servers import RunningService, running, start_service


@pytest.fixture
def collections(milvus_server: str) -> Iterator[tuple[str, str]]:
    """Two fresh collection names, dropped afterwards (the server outlives the test)."""
    names = (f"tiny_{uuid.uuid4().hex[:12]}", f"b32_{uuid.uuid4().hex[:12]}")
    yield names
    from pymilvus import MilvusClient

    client = MilvusClient(milvus_server)
    for name in names:
        client.drop_collection(name)
    client.close()


def test_two_models_side_by_side_in_one_milvus(
        milvus_server: str, collections: tuple[str, str], encoder_tiny: RunningService,
        encoder_fp32: RunningService, tmp_path: Path) -> None:
    tiny_collection, b32_collection = collections
    photo = sorted(PHOTOS.iterdir())[0]
    with running(["serve", "search", "--encoder", encoder_tiny.address, "--milvus",
                  milvus_server, "--collection", tiny_collection], tmp_path / "tiny.log") as tiny, \
            running(["serve", "search", "--encoder", encoder_fp32.address, "--milvus",
                     milvus_server, "--collection", b32_collection],
                    tmp_path / "b32.log") as b32:
        for service, encoder, collection, dimension in (
                (tiny, encoder_tiny, tiny_collection, 64),
                (b32, encoder_fp32, b32_collection, 512)):
            with SearchClient(service.address) as client, EncoderClient(encoder.address) as model:
                assert client.index_files([photo]).added == 1
                stats = client.stats()
                info = model.model_info()
                assert (stats.collection, stats.dimension, stats.count) == (
                    collection, dimension, 1)
                assert (stats.model, stats.model_fingerprint) == (info.name, info.fingerprint)
                [hit] = client.search_text("a photo of a fish", top_k=5)
                assert hit.uri == str(photo.resolve())
        with SearchClient(tiny.address) as client:
            assert client.stats().count == 1  # the other model's row went to its own collection

    # The 512-d model's search service pointed at the 64-d model's collection.
    wrong = start_service(["serve", "search", "--encoder", encoder_fp32.address, "--milvus",
                           milvus_server, "--collection", tiny_collection],
                          tmp_path / "wrong.log", wait=False)
    try:
        assert wrong.process.wait(120) != 0
    finally:
        wrong.stop()
    log = wrong.log()
    assert f"Milvus collection {tiny_collection!r}" in log
    assert "holds 64-d vectors but model" in log and "makes 512-d vectors" in log
    assert "use another collection or re-index" in log and "Traceback" not in log
