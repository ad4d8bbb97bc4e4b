"""results/benchmarks.md and its plots, rebuilt from results/benchmarks.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

from benchmarks import verdicts

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first


def machine() -> dict[str, str]:
    """What the numbers ran on: CPU, cores, GPU, and the versions that matter."""
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    versions = {name: metadata.version(name) for name in
                ("torch", "openai-clip", "grpcio", "pymilvus", "milvus-lite")}
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "model": "random-weight ViT-B/32",
            **versions}


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        if isinstance(value, dict):
            return ", ".join(f"{k}: {v}" for k, v in value.items())
        return str(value)
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(cell(row.get(key, "")) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _machine_line(section: dict[str, Any]) -> str:
    m = section.get("machine", {})
    return (f"_Ran on {m.get('cpu')} ({m.get('cores')} cores), GPU: {m.get('gpu')}; "
            f"{m.get('model')}; torch {m.get('torch')}, grpcio {m.get('grpcio')}, "
            f"pymilvus {m.get('pymilvus')}, milvus-lite {m.get('milvus-lite')}; "
            f"{section.get('seconds')} s._")


def _plot(path: Path, title: str, xlabel: str, ylabel: str,
          series: dict[str, tuple[list[Any], list[float]]], log_x: bool = False) -> str:
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for label, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o", label=label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log_x:
        axes.set_xscale("log", base=2)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return f"![{title}]({path.name})"


def write(results: dict[str, Any], out: Path) -> None:
    parts = ["# clipsearch benchmarks", "",
             "Produced by `python -m benchmarks` (see the README); every ratio compares with a "
             "baseline measured in the same run. The model is a random-weight ViT-B/32: the "
             "real model's architecture and cost, not its answers.", "",
             "Other results: search features and near-duplicates "
             "([search_features.md](search_features.md)), ANN indexes at 1M ([ann.md](ann.md)), "
             "models on this CPU ([models.md](models.md)), int8 ([int8.md](int8.md)), the GPU "
             "(the GPU check [gpu.md](gpu.md) and what it found, [gpu-notes.md](gpu-notes.md); "
             "[gpu-encoder.md](gpu-encoder.md), [open-clip-gpu.md](open-clip-gpu.md)).", ""]
    if "ingest" in results:
        r = results["ingest"]
        parts += ["## Ingest", "", f"{r['images']} images (the 200 sample photos, repeated with "
                  "distinct bytes) into Milvus Lite. Seed: the tutorial's loop (one image at a "
                  "time through preprocess + encode_image in fp32, one insert each).", "",
                  _table([{"what": "seed loop", "precision": "fp32",
                           "images_per_s": r["seed_images_per_s"], "ratio_to_seed": 1.0}]
                         + [{"what": f"encoder in process, batch {best['batch']}",
                             "precision": precision, "images_per_s": best["images_per_s"],
                             "ratio_to_seed": best["images_per_s"] / r["seed_images_per_s"],
                             "ratio_to_in_process": 1.0}
                            for precision, best in r.get("in_process", {}).items()]
                         + [{"what": row.get("what", "clipsearch index (both services)"), **row}
                            for row in r["runs"]],
                         [("what", "run"), ("precision", "precision"),
                          ("images_per_s", "images/s"), ("ratio_to_seed", "× seed"),
                          ("ratio_to_in_process", "× in process"),
                          ("in_process_ms_per_image", "model ms/image in process"),
                          ("model_ms_per_image", "model ms/image in the chain"),
                          ("model_busy", "model busy"),
                          ("milvus_write_share", "Milvus writes"),
                          ("in_process_cpu_ms_per_image", "CPU ms/image in process"),
                          ("chain_cpu_ms_per_image", "CPU ms/image in the chain"),
                          ("cpu_ms_per_image", "of it, by process"),
                          ("cores_busy", "cores busy")]),
                  "", verdicts.ingest(r), "",
                  _machine_line(r), ""]
    if "search" in results:
        r = results["search"]
        seed = r["seed"]
        parts += ["## Text search through the chain", "",
                  "client → search service → encoder → Milvus Lite (200 photos), against the "
                  "seed's in-process `encode_text` + `search` at concurrency 1. New texts: "
                  "every query a new text (`a white dog T.N`, T the load's tag, N the call's "
                  "number), so each is a query-cache miss; repeated text: `a white dog` "
                  "every time, a cache hit after its first call (no encoder call). Each "
                  "measured run follows a warm-up of 4 × concurrency calls.", "",
                  _table([{"who": "seed, in-process", "concurrency": 1, "rps": seed["qps"],
                           **{k: seed[k] for k in ("p50_ms", "p90_ms", "p99_ms")}}]
                         + [{"who": "clipsearch, new texts" if "cached_rows" in r
                             else "clipsearch", **row} for row in r["rows"]]
                         + [{"who": "clipsearch, repeated text (cached)", **row}
                            for row in r.get("cached_rows", [])],
                         [("who", "run"), ("concurrency", "concurrency"), ("rps", "queries/s"),
                          ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
                          ("p50_ratio_to_seed", "p50 × seed"),
                          ("qps_ratio_to_seed", "queries/s × seed"), ("statuses", "statuses"),
                          ("queries_per_search_batch", "queries per search batch"),
                          ("texts_per_encoder_batch", "texts per encoder batch"),
                          ("text_model_busy", "text tower busy"),
                          ("milvus_search_busy", "Milvus searching")]),
                  "", verdicts.search(r), "",
                  _plot(out / "search_latency.png", "SearchText latency", "concurrency",
                            "ms", {p: ([row["concurrency"] for row in r["rows"]],
                                       [row[f"{p}_ms"] for row in r["rows"]])
                                   for p in ("p50", "p90", "p99")}),
                  "", _machine_line(r), ""]
    if "encoder" in results:
        r = results["encoder"]
        parts += ["## Encoder alone (in-process)", "",
                  "Throughput by batch size and precision; the peak is a large square matmul "
                  "in the same precision on the same device, measured in the same run.", "",
                  _table(r["rows"], [("precision", "precision"), ("device", "device"),
                                     ("batch", "batch"), ("images_per_s", "images/s"),
                                     ("texts_per_s", "texts/s"),
                                     ("image_gflops", "GFLOP/image"),
                                     ("peak_tflops", "matmul peak TFLOP/s"),
                                     ("image_share_of_peak", "image share of peak")]),
                  "", f"Decode + preprocess of one 500x375 JPEG: "
                      f"{r['decode_preprocess_ms_per_image']:.1f} ms (one thread). {r['note']}.",
                  "", _plot(out / "encoder_throughput.png", "Encoder images/s", "batch",
                            "images/s", {p: ([x["batch"] for x in r["rows"] if x["precision"] == p],
                                             [x["images_per_s"] for x in r["rows"]
                                              if x["precision"] == p])
                                         for p in dict.fromkeys(x["precision"] for x in r["rows"])},
                            log_x=True),
                  "", _machine_line(r), ""]
    if "service" in results:
        r = results["service"]
        parts += ["## Encoder service (one item per call)", "",
                  _table(r["rows"], [("precision", "precision"), ("kind", "item"),
                                     ("concurrency", "concurrency"), ("rps", "items/s"),
                                     ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                                     ("statuses", "statuses")]),
                  "", _machine_line(r), ""]
    if "collection" in results:
        r = results["collection"]
        parts += ["## Collection size", "", "Synthetic unit vectors; top-10; recall against "
                  "exact (numpy) search over the same rows. ANN indexes (HNSW, IVF_FLAT, "
                  "IVF_SQ8) on the server at 100k and 1M clustered CLIP-like vectors: "
                  "[ann.md](ann.md).", "",
                  _table(r["rows"], [("backend", "backend"), ("index", "index"),
                                     ("size", "vectors"), ("filter", "filter"),
                                     ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                                     ("recall_at_10", "recall@10"),
                                     ("insert_rows_per_s", "insert rows/s")]),
                  "", _machine_line(r), ""]
    soak_file = out / "soak.json"
    if soak_file.exists():
        r = json.loads(soak_file.read_text())
        parts += ["## Soak", "", f"`python -m benchmarks.soak`: SearchText (distinct texts) at "
                  f"concurrency {r['concurrency']} for {r['seconds']:.0f} s through both services "
                  f"({r['model']}), while the other photos are indexed one by one.", "",
                  _table([{"requests": r["requests"], "rps": r["rps"], "p50_ms": r["p50_ms"],
                           "p99_ms": r["p99_ms"], "statuses": r["statuses"],
                           "index_errors": len(r["index_errors"]),
                           **{f"rss_{k}": f"{r['rss_start_mb'][k]:.0f} → {r['rss_end_mb'][k]:.0f}"
                              f" (peak {r['rss_peak_mb'][k]:.0f})" for k in r["rss_start_mb"]}}],
                         [("requests", "requests"), ("rps", "queries/s"), ("p50_ms", "p50 ms"),
                          ("p99_ms", "p99 ms"), ("statuses", "statuses"),
                          ("index_errors", "index errors"),
                          ("rss_encoder", "encoder RSS MB"), ("rss_search", "search RSS MB")]),
                  ""]
    for extra in sorted(out.glob("gpu-*.md")):
        parts += [extra.read_text(), ""]
    (out / "benchmarks.md").write_text("\n".join(parts))
