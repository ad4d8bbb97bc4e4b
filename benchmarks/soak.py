"""Soak both services: SearchText (distinct texts) at concurrency 32 for a while, with a
trickle of Index, reporting errors, p99 and how each process's memory grew.

    python -m benchmarks.soak --minutes 3                # the benchmark (results/soak.md)
    python -m benchmarks.soak --seconds 10 --model tiny  # what the tests run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadConfig, run
from benchmarks.memory import status_mb
from benchmarks.report import write as write_report
from benchmarks.sections import SEARCH_REQUEST
from client import SearchClient
from tests.servers import running

RESULTS = Path(__file__).resolve().parent.parent / "results"
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


# Warm-up texts carry their own tag, so the measured load meets none of them in the cache.
WARM_UP_REQUEST = {**SEARCH_REQUEST, "text": "warm-up {{.UUID}}"}


def gpu_memory_mb(pid: int) -> float | None:
    """GPU memory the process holds, as nvidia-smi reports it; None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
            check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(mb) for line in listing.splitlines() if "," in line
            for found, mb in [line.split(",", 1)] if int(found) == pid]
    return sum(used) if used else 0.0


def soak(model: Path, seconds: float, concurrency: int = 32) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, \
            running(["serve", "encoder", "--model", str(model)],
                    Path(tmp) / "encoder.log") as encoder, \
            running(["serve", "search", "--encoder", encoder.address, "--milvus",
                     str(Path(tmp) / "milvus.db")], Path(tmp) / "search.log") as search:
        photos = sorted(PHOTOS.iterdir())
        with SearchClient(search.address) as client:
            client.index_files(photos[:100])
            client.search_text("warm up")
        # A few seconds of the same load first: every batch shape then exists once, and
        # what the allocator and oneDNN keep for them (measured: ~170 MB in the encoder on
        # a Xeon with AMX, flat from 10 s to 30 s) is in the baseline, so that growth means
        # a leak and not a warm-up.
        asyncio.run(run(LoadConfig(call="clipsearch.search.v1.Search.SearchText",
                                   host=search.address, data=WARM_UP_REQUEST,
                                   concurrency=concurrency, duration_s=5)))
        pids = {"encoder": encoder.process.pid, "search": search.process.pid}
        start_rss = {name: status_mb(pid) for name, pid in pids.items()}
        gpu_mb = {"start": gpu_memory_mb(encoder.process.pid), "peak": None}
        peak_rss = dict(start_rss)
        stop = threading.Event()
        index_errors: list[str] = []

        def background() -> None:
            """Index the other photos slowly meanwhile, and sample memory."""
            with SearchClient(search.address) as client:
                for photo in photos[100:]:
                    if stop.wait(max(0.05, seconds / 100)):
                        break
                    summary = client.index_files([photo])
                    index_errors.extend(f.reason for f in summary.failures)
                    for name, pid in pids.items():
                        peak_rss[name] = max(peak_rss[name], status_mb(pid))
                    used = gpu_memory_mb(pids["encoder"])
                    if used is not None:
                        gpu_mb["peak"] = max(gpu_mb["peak"] or 0.0, used)

        sampler = threading.Thread(target=background)
        sampler.start()
        config = LoadConfig(call="clipsearch.search.v1.Search.SearchText",
                            host=search.address, data=SEARCH_REQUEST,
                            concurrency=concurrency, duration_s=seconds)
        report = asyncio.run(run(config))
        stop.set()
        sampler.join()
        end_rss = {name: status_mb(pid) for name, pid in pids.items()}
        gpu_mb["end"] = gpu_memory_mb(encoder.process.pid)
    summary = report.to_dict()
    return {"seconds": seconds, "concurrency": concurrency, "requests": summary["count"],
            "rps": summary["rps"], "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
            "statuses": summary["statuses"], "index_errors": index_errors,
            "rss_start_mb": start_rss, "rss_end_mb": end_rss, "rss_peak_mb": peak_rss,
            "rss_growth_mb": {k: end_rss[k] - start_rss[k] for k in pids},
            "encoder_gpu_mb": gpu_mb}  # start / peak / end; None without a GPU


def main(argv: list[str] | None = None) -> int:
    from encoder_service.testmodels import cached_random_vit_b32, cached_tiny_clip

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--model", choices=("vit-b32", "tiny"), default="vit-b32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-save", action="store_true", help="do not write results/soak.*")
    args = parser.parse_args(argv)
    model = cached_tiny_clip() if args.model == "tiny" else cached_random_vit_b32()
    result = soak(model, args.seconds or args.minutes * 60, args.concurrency)
    result["model"] = args.model
    print(json.dumps(result, indent=2))
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "soak.json").write_text(json.dumps(result, indent=2))
        store = RESULTS / "benchmarks.json"
        write_report(json.loads(store.read_text()) if store.exists() else {}, RESULTS)
    ok = set(result["statuses"]) == {"OK"} and not result["index_errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
