"""A short soak of both services (the long one: python -m benchmarks.soak)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.soak import soak


def test_short_soak_has_no_errors_and_bounded_memory(tiny_clip: Path) -> None:
    result = soak(tiny_clip, seconds=10, concurrency=32)
    assert result["statuses"] == {"OK": result["requests"]}
    assert result["requests"] > 100
    assert result["index_errors"] == []
    for service, growth in result["rss_growth_mb"].items():
        assert growth < 150, (service, result["rss_start_mb"], result["rss_end_mb"])
