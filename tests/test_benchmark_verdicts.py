"""results/benchmarks.md's verdicts come from the run's numbers: a figure on either side of
a target flips the word, so a rerun cannot leave a stale 'met' standing."""

from __future__ import annotations

from typing import Any

from benchmarks import report, verdicts


def _ingest(fp32: float, bf16: float, old: float) -> dict[str, Any]:
    return {"runs": [{"what": verdicts.CHAIN, "precision": "fp32", "ratio_to_in_process": fp32},
                     {"what": verdicts.CHAIN, "precision": "bf16", "ratio_to_in_process": bf16},
                     {"what": verdicts.OLD_DEFAULT, "precision": "bf16",
                      "ratio_to_in_process": old}]}


def _search(p99: float, statuses: dict[str, int], cached_ratio: float) -> dict[str, Any]:
    return {"rows": [{"concurrency": 32, "p99_ms": p99, "rps": 150.0, "statuses": statuses}],
            "cached_rows": [{"concurrency": 1, "p50_ratio_to_seed": cached_ratio},
                            {"concurrency": 32, "p99_ms": 80.0, "rps": 500.0}]}


def test_ingest_verdict_follows_each_precisions_ratio() -> None:
    text = verdicts.ingest(_ingest(0.89, 0.93, 0.81))
    assert "This run: missed in fp32 (0.89), met in bf16 (0.93).**" in text
    assert "old default in the same run: 0.81 against 0.93 (bf16)" in text


def test_search_verdict_needs_both_the_p99_and_no_errors() -> None:
    assert "This run: met, p99 95 ms" in verdicts.search(_search(95.0, {"OK": 640}, 0.05))
    assert "missed, p99 101 ms" in verdicts.search(_search(101.0, {"OK": 640}, 0.05))
    failing = verdicts.search(_search(60.0, {"OK": 630, "UNAVAILABLE": 10}, 0.2))
    assert "missed, p99 60 ms at 150 queries/s, 10 errors" in failing
    assert "p50 is 0.200x the seed's (target <= 0.1x: missed)" in failing


def test_the_markdown_carries_them(tmp_path: Any) -> None:
    machine = {"cpu": "x", "cores": "2"}
    search = {**_search(95.0, {"OK": 640}, 0.05), "machine": machine,
              "seed": {"qps": 12.0, "p50_ms": 80.0, "p90_ms": 90.0, "p99_ms": 97.0}}
    search["rows"][0].update(p50_ms=60.0, p90_ms=80.0)
    report.write({"search": search}, tmp_path)
    assert "This run: met, p99 95 ms" in (tmp_path / "benchmarks.md").read_text()


def test_ingest_says_what_the_chains_cpu_per_image_allows() -> None:
    """2 cores, 80 ms of CPU per image in the chain: at most 25 images/s, 0.75 of a model
    that does 33.3 images/s in process."""
    results = _ingest(0.7, 0.7, 0.7)
    results["machine"] = {"cores": "2"}
    results["runs"][1].update(in_process_ms_per_image=30.0, in_process_cpu_ms_per_image=58.0,
                              chain_cpu_ms_per_image=80.0, cores_busy=1.9,
                              cpu_ms_per_image={"encoder": 70.0, "search": 8.0, "client": 2.0})
    text = verdicts.ingest(results)
    assert ("In bf16 the chain spent 80.0 ms of CPU per image (encoder 70.0, search 8.0, "
            "client 2.0) against the model's 58.0 in process, with 1.90 of 2 cores busy: at "
            "that cost even 2 fully busy cores allow 0.75 of the in-process rate.") in text
    assert text.count("the chain spent") == 1  # the fp32 row has no CPU figures
