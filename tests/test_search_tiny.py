"""Real retrieval through both services: the tiny CLIP trained on coloured shapes finds
"a red circle" among held-out pictures indexed through the search service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client import SearchClient
from encoder_service.testmodels import COLOURS, SHAPES, caption, shape_dataset
from tests.conftest import search_service
from tests.servers import RunningService


@pytest.fixture(scope="module")
def shapes_search(encoder_tiny: RunningService, tmp_path_factory: pytest.TempPathFactory,
                  logs_dir: Path) -> Iterator[tuple[RunningService, Path]]:
    folder = tmp_path_factory.mktemp("shapes")
    for i, (image, text) in enumerate(shape_dataset(n_per_class=3, seed=777)):
        image.save(folder / f"{text.replace(' ', '_')}_{i:03d}.png")
    milvus = tmp_path_factory.mktemp("milvus-shapes") / "milvus.db"
    for service in search_service(encoder_tiny, milvus, logs_dir, "search-tiny"):
        yield service, folder


def test_shape_queries_find_their_shapes(shapes_search: tuple[RunningService, Path]) -> None:
    search, folder = shapes_search
    with SearchClient(search.address) as client:
        summary = client.index_files(sorted(folder.iterdir()))
        assert (summary.added, summary.failed) == (90, 0)
        queries = [caption(c, s) for c in COLOURS for s in SHAPES]
        hits = {q: client.search_text(q, top_k=3) for q in queries}
    top1 = [Path(hits[q][0].uri).name.startswith(q.replace(" ", "_") + "_") for q in queries]
    recall_at_1 = sum(top1) / len(queries)
    print(f"recall@1 {recall_at_1:.3f}")
    assert recall_at_1 >= 0.9, [q for q, ok in zip(queries, top1, strict=True) if not ok]
    red_circles = [Path(h.uri).name for h in hits["a red circle"]]
    assert sum(name.startswith("a_red_circle_") for name in red_circles) >= 2, red_circles
