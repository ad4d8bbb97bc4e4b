"""The GPU check's whole-chain step: ingest through both services at several Index settings
(`--index-batch`, `--index-pipeline`), each with where its time went, then SearchText under
load. One encoder serves every setting; each setting gets its own search service and a
fresh Milvus Lite file, so no run finds the images of another already stored."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadConfig, run
from benchmarks.process_cpu import cpu_window
from benchmarks.scrape import metrics_window
from benchmarks.sections import SEARCH_REQUEST, photo_folder, report_dict
from client import SearchClient
from tests.servers import RunningService, free_port, running

# Index settings the chain is measured at: (images per batch, batches in flight).
DEFAULT_INDEX = (32, 2)
REQUEST, MODEL_BATCH, MILVUS = ("clipsearch_request_seconds", "clipsearch_encoder_batch_seconds",
                                "clipsearch_milvus_seconds")


def ingest(encoder: RunningService, encoder_metrics: int, paths: list[Path], batch: int,
           pipeline: int, db: Path) -> dict[str, Any]:
    """images/s through both services at one Index setting, with CPU ms per image by
    process and the mean latency of each stage's call."""
    port = free_port()
    with running(["serve", "search", "--encoder", encoder.address, "--milvus", str(db),
                  "--index-batch", str(batch), "--index-pipeline", str(pipeline),
                  "--metrics-port", str(port)], db.with_suffix(".log")) as search, \
            SearchClient(search.address) as client:
        pids = {"encoder": encoder.process.pid, "search": search.process.pid}
        with metrics_window([encoder_metrics, port]) as spent, cpu_window(pids) as cpu:
            started = time.perf_counter()
            summary = client.index_files(paths)
            seconds = time.perf_counter() - started
    return {"index_batch": batch, "index_pipeline": pipeline, "added": summary.added,
            "failed": summary.failed, "images_per_s": len(paths) / seconds,
            "cpu_ms_per_image": {name: round(1000 * s / len(paths), 3)
                                 for name, s in cpu.items()},
            "mean_ms": {
                "encode_call": spent.mean_ms(REQUEST, 'method="EncodeImage"'),
                "model_batch": spent.mean_ms(MODEL_BATCH, 'tower="image"'),
                "milvus_query": spent.mean_ms(MILVUS, 'operation="query"'),
                "milvus_upsert": spent.mean_ms(MILVUS, 'operation="upsert"')}}


def chain(checkpoint: Path, device: str, count: int, settings: list[tuple[int, int]],
          search_totals: list[tuple[int, int]], max_batch: int,
          decode_alone: Callable[[list[Path]], float]) -> dict[str, Any]:
    """Ingest at each of `settings` (the first is the default), the encoder's decoding alone
    (`decode_alone(paths)`: images/s) for the decode share, and SearchText at each
    (concurrency, total) of `search_totals` over the default setting's collection."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "photos"
        folder.mkdir()
        paths = photo_folder(folder, count)
        decode_rate = decode_alone(paths)
        metrics_port = free_port()
        with running(["serve", "encoder", "--model", str(checkpoint), "--device", device,
                      "--max-batch", str(max_batch), "--metrics-port", str(metrics_port)],
                     tmp / "encoder.log") as encoder:
            ingests = [ingest(encoder, metrics_port, paths, batch, pipeline,
                              tmp / f"milvus-{batch}-{pipeline}.db")
                       for batch, pipeline in settings]
            with running(["serve", "search", "--encoder", encoder.address, "--milvus",
                          str(tmp / f"milvus-{settings[0][0]}-{settings[0][1]}.db"),
                          # The warm-up sends the measured run's texts: with the query cache
                          # on, the run would measure cache hits, not the encoder.
                          "--no-query-cache"], tmp / "search.log") as search:
                loads = []
                for concurrency, total in search_totals:
                    config = LoadConfig(call="clipsearch.search.v1.Search.SearchText",
                                        host=search.address, data=SEARCH_REQUEST,
                                        concurrency=concurrency, total=total)
                    asyncio.run(run(config))  # warm-up at this concurrency
                    loads.append({"concurrency": concurrency,
                                  **report_dict(asyncio.run(run(config)))})
    default = ingests[0]
    return {"images": count, "added": default["added"],
            "ingest_images_per_s": default["images_per_s"],
            "decode_alone_images_per_s": decode_rate,
            "decode_share": default["images_per_s"] / decode_rate,
            "ingest_by_setting": ingests, "search": loads}
