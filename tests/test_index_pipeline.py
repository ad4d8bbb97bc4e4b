"""--index-batch and --index-pipeline change how an Index stream is cut and overlapped,
never what it answers: the same stream gets the same answers, in order, with a duplicate
across batches found EXISTING and a bad item failing alone, and stores each image once."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from client import SearchClient
from clipsearch.search.v1 import search_pb2, search_pb2_grpc
from tests.servers import RunningService, running

Answer = tuple[int, int, str, str]  # sequence, status, id, uri


def _answers(encoder: RunningService, db: Path, items: list[search_pb2.IndexItem],
             *settings: str) -> tuple[list[Answer], int]:
    with running(["serve", "search", "--encoder", encoder.address, "--milvus", str(db),
                  *settings], db.with_suffix(".log")) as search:
        with grpc.insecure_channel(search.address) as channel:
            results = list(search_pb2_grpc.SearchStub(channel).Index(iter(items), timeout=120))
        with SearchClient(search.address) as client:
            count = client.stats().count
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


@pytest.mark.parametrize("flag", ["--index-batch", "--index-pipeline"])
def test_zero_is_refused_at_start(flag: str) -> None:
    done = subprocess.run([sys.executable, "-m", "clipsearch.cli", "serve", "search", flag, "0",
                           "--encoder", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2
    assert f"cannot start: {flag} 0: at least 1" in done.stderr
