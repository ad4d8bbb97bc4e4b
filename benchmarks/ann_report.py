"""results/ann.md from results/ann.json (written by benchmarks/ann.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import machine


def _params(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in row["search_params"].items()) or "-"


def _sampling(results: dict[str, Any]) -> list[str]:
    lines = ["## The vector set", "",
             "Sampled around the 200 sample photos' vectors (benchmarks/ann_data.py): "
             "`normalise(photo + alpha * noise)`, noise Gaussian with the photos' own "
             "covariance plus a 10% isotropic floor, alpha calibrated so that a synthetic set "
             "of 200 has the photos' median nearest-neighbour cosine. Nearest-neighbour "
             "cosine quantiles at the same size (200; five synthetic draws pooled):", "",
             "| encoder | dim | alpha | set | q05 | q25 | q50 | q75 | q95 | KS distance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, check in results.get("sampling_check", {}).items():
        for which in ("real", "synthetic"):
            values = " | ".join(f"{v:.3f}" for v in check[f"{which}_nn_cosine"])
            ks = f"{check['ks_distance']:.3f}" if which == "synthetic" else ""
            lines.append(f"| {name} | {check['dimension']} | {check['alpha']:.3f} | {which} "
                         f"| {values} | {ks} |")
    lines += ["", "The 1M set and its queries come from the random ViT-B/32 model (512-d, the "
              "production dimension); the tiny CLIP (64-d, trained here) checks the sampling "
              "model on vectors with learnt structure. Held-out queries' top-1 cosine in the "
              "first n rows (q05 / q50 / q95):", ""]
    for size, values in results.get("nn_cosine_at_size", {}).items():
        lines.append(f"- {int(size):,} rows: {' / '.join(f'{v:.3f}' for v in values)}")
    return lines


ORDER = ("FLAT", "HNSW", "IVF_FLAT", "IVF_FLAT_1024", "IVF_SQ8", "DISKANN")


def _ordered(run: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(run["indexes"], key=lambda e: ORDER.index(e["index"])
                  if e["index"] in ORDER else len(ORDER))


def _run(run: dict[str, Any]) -> list[str]:
    lines = [f"## {run['size']:,} vectors", "",
             f"{run['queries']} held-out queries, top 10; filter `indexed_at < 100` matches "
             f"{run['filter_share']:.1%} of rows; inserted at {run['insert_rows_per_s']:,} "
             f"rows/s; server RSS empty {run['rss_empty_mb']} MB.", "",
             "| index | build s | load s | segments | RSS released / peak / loaded MB |",
             "|---|---|---|---|---|"]
    for entry in _ordered(run):
        if "error" in entry:
            lines.append(f"| {entry['index']} | not built: {entry['error']} | | | |")
            continue
        lines.append(f"| {entry['index']}{_build(entry)} | {entry['build_s']} | "
                     f"{entry['load_s']} | {entry.get('segments', '')} | "
                     f"{entry['rss_released_mb']} / {entry['rss_peak_mb']} / "
                     f"{entry['rss_loaded_mb']} |")
    lines += ["", "| index | search | filter | recall@10 | p50 ms | p99 ms | p50 ms c8 | "
              "p99 ms c8 | qps c1 | qps c8 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in _ordered(run):
        for row in entry.get("rows", []):
            lines.append(f"| {entry['index']} | {_params(row)} | {row['filter']} | "
                         f"{row['recall_at_10']:.4f} | {row['p50_ms']} | {row['p99_ms']} | "
                         f"{row['p50_ms_c8']} | {row['p99_ms_c8']} | {row['qps_c1']} | "
                         f"{row['qps_c8']} |")
    return lines


def _build(entry: dict[str, Any]) -> str:
    params = entry.get("build_params") or {}
    return f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""


def write(results: dict[str, Any], out: Path) -> None:
    """Renders the tables; the prose that reads them lives in the header kept below."""
    lines = ["# ANN indexes on the Milvus server", "",
             "`python -m benchmarks.ann` (benchmarks/ann.py): the `milvus` 2.3.5 server "
             "(embedded standalone, tests/milvus_launcher.py), one index at a time on the "
             "same flushed rows; searches through pymilvus's MilvusClient directly (no "
             "clipsearch service, ids only, Eventually consistency), client and server on "
             "the same 2 cores; c8 = 8 threads sharing one client. Recall@10 against exact "
             "numpy search over the same rows. Build s: create_index until no row is "
             "pending; RSS of the server process: released (no index, collection released), "
             "peak while building and loading (0.2 s samples), loaded.", ""]
    notes = out / "ann-notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    lines += [*_sampling(results), ""]
    for run in results.get("runs", []):
        lines += [*_run(run), ""]
    info = machine()
    lines.append(f"_Ran on {info.get('cpu', '?')} ({info.get('cores', '?')} cores); "
                 f"{results.get('seconds', '?')} s for the last run._")
    (out / "ann.md").write_text("\n".join(lines) + "\n")
