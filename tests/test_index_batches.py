"""How an Index stream is cut into encoder calls. --index-batch and --index-pipeline change
how it is cut and overlapped, never what it answers: the same stream gets the same answers,
in order, with a duplicate across batches found EXISTING and a bad item failing alone, and
stores each image once. Whatever --index-batch says, a call never carries more than the
encoder takes (its max_items_per_call and message size, from GetModelInfo): large photos
sent fast used to fill one call past the encoder's message limit and fail all together."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from client import EncoderClient, SearchClient
from clipsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.images import encode
from tests.servers import RunningService, running

Answer = tuple[int, int, str, str]  # sequence, status, id, uri


def _index(encoder: RunningService, db: Path, items: list[search_pb2.IndexItem],
           *settings: str) -> tuple[list[search_pb2.IndexResult], int]:
    """The answers of one Index stream to a fresh search service, and the rows it stored."""
    with running(["serve", "search", "--encoder", encoder.address, "--milvus", str(db),
                  *settings], db.with_suffix(".log")) as search:
        with grpc.insecure_channel(search.address) as channel:
            results = list(search_pb2_grpc.SearchStub(channel).Index(iter(items), timeout=120))
        with SearchClient(search.address) as client:
            count = client.stats().count
    return results, count


def _answers(encoder: RunningService, db: Path, items: list[search_pb2.IndexItem],
             *settings: str) -> tuple[list[Answer], int]:
    results, count = _index(encoder, db, items, *settings)
    return [(r.sequence, r.status, r.id, r.uri) for r in results], count


def test_deep_pipeline_answers_like_the_default(encoder_tiny: RunningService,
                                                photos: list[Path], tmp_path: Path) -> None:
    datas = [p.read_bytes() for p in photos[:9]]
    stream = [*datas[:5], b"not an image", *datas[5:], datas[1], datas[7]]
    items = [search_pb2.IndexItem(image=data, uri=f"mem://{i}") for i, data in enumerate(stream)]
    default, stored = _answers(encoder_tiny, tmp_path / "default.db", items)
    deep, deep_stored = _answers(encoder_tiny, tmp_path / "deep.db", items,
                                 "--index-batch", "2", "--index-pipeline", "4")
    assert deep == default
    assert [a[0] for a in deep] == list(range(len(stream)))
    statuses = [a[1] for a in deep]
    added, existing, failed = (search_pb2.IndexResult.ADDED, search_pb2.IndexResult.EXISTING,
                               search_pb2.IndexResult.FAILED)
    assert statuses == [added] * 5 + [failed] + [added] * 4 + [existing] * 2
    assert [a[2] for a in deep if a[1] == added] == [hashlib.sha256(d).hexdigest()
                                                      for d in datas]
    assert stored == deep_stored == 9


def _noise_jpegs(count: int, side: int, seed: int) -> list[bytes]:
    """JPEGs of random pixels: they barely compress (~0.55 MiB at 700x700, quality 95)."""
    rng = np.random.default_rng(seed)
    return [encode(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)),
                   "JPEG", quality=95) for _ in range(count)]


def test_calls_fit_the_encoders_message_limit(encoder_tiny: RunningService,
                                              tmp_path: Path) -> None:
    """encoder_tiny takes messages up to 4 MiB: 12 photos of ~0.55 MiB sent at once are
    two or more calls, not one of 6.6 MiB; a photo over 4 MiB fails alone, with the limit."""
    with EncoderClient(encoder_tiny.address) as encoder:
        assert encoder.model_info().max_message_bytes == 4 * 2**20
    photos = _noise_jpegs(12, 700, seed=1)
    (huge,) = _noise_jpegs(1, 2200, seed=2)
    assert sum(map(len, photos)) > 6 * 2**20 and len(huge) > 4 * 2**20
    stream = [*photos[:5], huge, *photos[5:]]
    items = [search_pb2.IndexItem(image=data, uri=f"mem://{i}") for i, data in enumerate(stream)]
    results, stored = _index(encoder_tiny, tmp_path / "m.db", items)
    assert [r.sequence for r in results] == list(range(len(stream)))
    failed = [r for r in results if r.status != search_pb2.IndexResult.ADDED]
    assert [r.sequence for r in failed] == [5], [r.error for r in failed]
    assert failed[0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert f"{len(huge)} bytes" in failed[0].error and "4194304" in failed[0].error
    assert stored == len(photos)


def test_calls_fit_the_encoders_item_limit(encoder_tiny: RunningService,
                                           tmp_path: Path) -> None:
    """encoder_tiny takes at most 64 images per call; --index-batch 100 is cut to fit."""
    images = [encode(Image.new("RGB", (32, 32), (i, 255 - i, i // 2)), "PNG")
              for i in range(100)]
    items = [search_pb2.IndexItem(image=data, uri=f"mem://{i}") for i, data in enumerate(images)]
    answers, stored = _answers(encoder_tiny, tmp_path / "m.db", items, "--index-batch", "100")
    assert [a[1] for a in answers] == [search_pb2.IndexResult.ADDED] * 100
    assert stored == 100
