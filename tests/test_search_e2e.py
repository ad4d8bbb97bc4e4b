"""The seed's whole job through both services: index the 200 photos, search in words,
get exactly the brute-force top-k over the reference vectors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client import Filter, IndexItem, InvalidArgument, PermissionDenied, SearchClient
from tests.conftest import Reference
from tests.servers import RunningService

QUERIES = ["a white dog", "a red sports car", "a bowl of soup"]


def recall(hit_ids: list[str], ids: list[str], scores: np.ndarray, k: int) -> float:
    """Share of the hits that belong in the true top-k; a hit tied (within 1e-5) with the
    k-th best counts, since the served vectors match the reference only to ~1e-6."""
    kth = np.sort(scores)[::-1][k - 1]
    allowed = {ids[i] for i in np.flatnonzero(scores >= kth - 1e-5)}
    return sum(h in allowed for h in hit_ids) / k


@pytest.fixture(scope="module")
def indexed(search_fp32: RunningService, photos: list[Path]) -> dict[str, str]:
    """Indexes the photos with metadata {"group": i % 4}; returns uri -> id."""
    items = [IndexItem(p.read_bytes(), str(p), {"group": str(i % 4)})
             for i, p in enumerate(photos)]
    with SearchClient(search_fp32.address) as client:
        summary = client.index_items(items)
    assert (summary.added, summary.existing, summary.failed) == (200, 0, 0)
    return summary.ids


@pytest.fixture(scope="module")
def reference_vectors(reference_photo_vectors: np.ndarray) -> np.ndarray:
    return reference_photo_vectors


def test_search_text_is_exact_top_k(search_fp32: RunningService, indexed: dict[str, str],
                                    photos: list[Path], reference_model: Reference,
                                    reference_vectors: np.ndarray) -> None:
    ids = [indexed[str(p)] for p in photos]
    with SearchClient(search_fp32.address) as client:
        for query, text_vector in zip(QUERIES, reference_model.texts(QUERIES), strict=True):
            scores = reference_vectors @ text_vector
            hits = client.search_text(query, top_k=10)
            assert len(hits) == 10
            assert recall([h.id for h in hits], ids, scores, 10) == 1.0
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            best = int(np.argmax(scores))
            assert abs(hits[0].score - scores[best]) < 1e-4
            assert hits[0].uri == str(photos[best]) or scores[best] - hits[0].score < 1e-5


def test_filtered_search_is_exact_among_matching_rows(
        search_fp32: RunningService, indexed: dict[str, str], photos: list[Path],
        reference_model: Reference, reference_vectors: np.ndarray) -> None:
    ids = [indexed[str(p)] for p in photos]
    text_vector = reference_model.texts(["a white dog"])[0]
    scores = reference_vectors @ text_vector
    in_groups = np.array([i % 4 in (1, 2) for i in range(200)])
    by_prefix = np.array([p.name.startswith("n02") for p in photos])
    prefix = str(photos[0].parent / "n02")
    with SearchClient(search_fp32.address) as client:
        hits = client.search_text("a white dog", 20, Filter(metadata={"group": ["1", "2"]}))
        assert all(h.metadata["group"] in ("1", "2") for h in hits)
        assert recall([h.id for h in hits], ids, np.where(in_groups, scores, -9), 20) == 1.0
        hits = client.search_text("a white dog", 15, Filter(uri_prefix=prefix))
        assert all(h.uri.startswith(prefix) for h in hits)
        assert recall([h.id for h in hits], ids, np.where(by_prefix, scores, -9), 15) == 1.0
        both = Filter(uri_prefix=prefix, metadata={"group": "3"})
        hits = client.search_text("a white dog", 1000, both)
        assert len(hits) == int(np.sum(by_prefix & np.array([i % 4 == 3 for i in range(200)])))


def test_search_image_finds_itself(search_fp32: RunningService, indexed: dict[str, str],
                                   photos: list[Path]) -> None:
    with SearchClient(search_fp32.address) as client:
        hits = client.search_image(photos[7].read_bytes(), top_k=3)
    assert hits[0].id == indexed[str(photos[7])]
    assert hits[0].score > 0.9999


def test_reindex_adds_nothing(search_fp32: RunningService, indexed: dict[str, str],
                              photos: list[Path]) -> None:
    with SearchClient(search_fp32.address) as client:
        summary = client.index_files(photos)
        assert (summary.added, summary.existing, summary.failed) == (0, 200, 0)
        assert client.stats().count == 200


def test_bad_search_requests(search_fp32: RunningService, indexed: dict[str, str]) -> None:
    with SearchClient(search_fp32.address) as client:
        assert len(client.search_text("a dog", top_k=0)) == 10  # 0 means the default
        with pytest.raises(InvalidArgument, match="top_k must be between 1 and 1000"):
            client.search_text("a dog", top_k=1_000_000)
        with pytest.raises(InvalidArgument, match="text is empty"):
            client.search_text("  ")
        with pytest.raises(PermissionDenied):
            client.search_text("a dog", filter='uri like "%"')
        with pytest.raises(InvalidArgument, match="metadata key"):
            client.search_text("a dog", filter=Filter(metadata={'x"] or true': "1"}))
        with pytest.raises(InvalidArgument, match="image"):
            client.search_image(b"not an image")
        injected = Filter(uri_prefix='" or id != "')
        assert client.search_text("a dog", filter=injected) == []


def test_bad_index_items_fail_alone(search_fp32: RunningService, photos: list[Path],
                                    tmp_path: Path) -> None:
    from PIL import Image

    fresh = tmp_path / "fresh.png"
    Image.new("RGB", (64, 48), "purple").save(fresh)
    items = [IndexItem(b"", "empty.jpg"), IndexItem(b"junk", "junk.jpg"),
             IndexItem(fresh.read_bytes(), ""), IndexItem(fresh.read_bytes(), "x" * 5000),
             IndexItem(fresh.read_bytes(), "big.png", {"k": "x" * 20_000}),
             IndexItem(fresh.read_bytes(), str(fresh), {"k": "v"}),
             IndexItem(fresh.read_bytes(), str(fresh), {"k": "v"})]
    with SearchClient(search_fp32.address) as client:
        before = client.stats().count
        summary = client.index_items(items)
        assert (summary.added, summary.existing, summary.failed) == (1, 1, 5)
        reasons = " | ".join(f.reason for f in summary.failures)
        for expected in ("empty: zero bytes", "not an image", "uri is required", "5000 bytes",
                         "over the limit of 16384"):
            assert expected in reasons
        assert client.stats().count == before + 1
        assert client.delete(ids=[summary.ids[str(fresh)]]) == 1


def test_delete_by_ids_and_filter(search_fp32: RunningService, indexed: dict[str, str],
                                  photos: list[Path]) -> None:
    victims = [indexed[str(p)] for p in photos[:3]]
    prefix = str(photos[0].parent / "n0150")  # a handful of bird classes
    expected_by_prefix = sum(p.name.startswith("n0150") for p in photos[3:])
    with SearchClient(search_fp32.address) as client:
        assert client.delete(ids=[*victims, "0" * 64]) == 3
        assert client.stats().count == 197
        assert client.delete(filter=Filter(uri_prefix=prefix)) == expected_by_prefix
        assert client.stats().count == 197 - expected_by_prefix
        remaining = {h.id for h in client.search_text("a bird", top_k=1000)}
        assert not remaining & set(victims)
        with pytest.raises(InvalidArgument, match="either ids or a non-empty filter"):
            client.delete()
        # Put them back so the module's other tests see all 200.
        summary = client.index_files(photos)
        assert summary.added == 3 + expected_by_prefix and summary.failed == 0


def test_cli_index_reports_a_corrupt_file_and_resumes(search_fp32: RunningService,
                                                      photos: list[Path],
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for photo in photos[:6]:
        (folder / "nested" / photo.name).symlink_to(photo)
    (folder / "broken.jpg").write_bytes(photos[6].read_bytes()[:2000])
    command = [sys.executable, "-m", "clipsearch.cli", "index", str(folder), "--quiet",
               "--address", search_fp32.address]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1
    assert "FAILED" in first.stderr and "broken.jpg" in first.stderr
    assert "truncated" in first.stderr
    (folder / "broken.jpg").unlink()
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "0 added, 6 already present, 0 failed" in second.stdout


def test_cli_search_writes_a_grid(search_fp32: RunningService, indexed: dict[str, str],
                                  tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "-m", "clipsearch.cli", "search", "a white dog",
                             "--top-k", "10", "--grid", str(grid), "--address",
                             search_fp32.address], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 10
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == (750, 22 + 2 * 168)
