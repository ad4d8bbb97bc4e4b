"""The benchmark sections. Each returns a JSON-able dict of what it measured, baseline
included, using the random-weight ViT-B/32 (the real model's cost) and the sample photos."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.loadgen import LoadConfig, Report, run
from benchmarks.process_cpu import cpu_window
from benchmarks.scrape import Spent, metrics_window
from benchmarks.seed import SeedTutorial, percentiles_ms
from client import SearchClient, image_files
from clipsearch.encoder.v1 import encoder_pb2
from encoder_service.images import PreprocessStages, image_pixels
from encoder_service.model import LoadedModel, clip, load_model
from encoder_service.testmodels import cached_random_vit_b32
from tests.servers import RunningService, free_port, running

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
QUERIES = ["a white dog", "a red sports car", "a bowl of soup", "a bird on a branch",
           "a person riding a bike", "a snowy mountain", "a plate of food", "a cat asleep"]


def seed_device() -> str:
    """Where the seed tutorial runs, as its `clip.load` picks: CUDA when present. The
    baseline runs where the service does, or a ratio would credit the GPU to the service."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def precisions() -> list[str]:
    return ["fp32", "fp16"] if torch.cuda.is_available() else ["fp32", "bf16"]


def timed(work: Any, min_seconds: float, min_runs: int = 2) -> float:
    """Seconds per call of work(), after one warm-up call."""
    work()
    runs, started = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - started < min_seconds:
        work()
        runs += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / runs


def matmul_peak(precision: str, device: torch.device, quick: bool) -> float:
    """FLOP/s of the best of a few large matmuls in this precision (squares, and the shape
    of ViT-B/32's MLP at batch 64): the machine's practical peak for this precision."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    sizes = [(n, n, n) for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048, 4096))]
    best = 0.0
    for m, k, n in [*sizes, (64 * 50, 768, 3072)]:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)

        def multiply(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            torch.matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * m * k * n / timed(multiply, 0.5 if quick else 2))
    return best


def model_flops(model: LoadedModel) -> tuple[float, float]:
    """FLOPs of one image and of one short prompt through the towers."""
    side = model.image_resolution
    with FlopCounterMode(display=False) as image_counter:
        model.encode_images(torch.zeros(1, 3, side, side))
    with FlopCounterMode(display=False) as text_counter:
        model.encode_tokens(clip.tokenize(["a photo of a white dog"]))
    return float(image_counter.get_total_flops()), float(text_counter.get_total_flops())


def encoder_alone(args: argparse.Namespace) -> dict[str, Any]:
    """In-process model throughput by batch size and precision, against the matmul peak.
    An image batch starts from decoded uint8 pixels, so the tensor stage of preprocessing
    (the copy to the device, /255, normalisation) is inside the figure."""
    checkpoint = cached_random_vit_b32()
    photo = sorted(PHOTOS.iterdir())[0]
    batches = [1, 8, 32, 64, 128, 256] if torch.cuda.is_available() else [1, 8, 32, 64]
    rows: list[dict[str, Any]] = []
    for precision in precisions():
        model = load_model(str(checkpoint), precision=precision)
        image_flops, text_flops = model_flops(model)
        peak = matmul_peak(precision, model.device, args.quick)
        stages = PreprocessStages.split(model.preprocess)
        pixels = image_pixels(photo.read_bytes(), stages, 10**8)
        for batch in batches:
            images = [pixels] * batch
            tokens = clip.tokenize([QUERIES[i % len(QUERIES)] for i in range(batch)])

            def encode(m: LoadedModel = model, i: list[Any] = images,
                       s: PreprocessStages = stages) -> None:
                with m.on_stream("image"):
                    m.encode_images(s.batch(i, m.device))
            per_image = timed(encode, 1 if args.quick else 4)
            per_text = timed(lambda m=model, t=tokens: m.encode_tokens(t), 1 if args.quick else 2)
            rows.append({"precision": precision, "device": str(model.device), "batch": batch,
                         "images_per_s": batch / per_image, "texts_per_s": batch / per_text,
                         "image_gflops": image_flops / 1e9, "text_gflops": text_flops / 1e9,
                         "peak_tflops": peak / 1e12,
                         "image_share_of_peak": batch / per_image * image_flops / peak})
    decode_s = timed(lambda: stages.batch([image_pixels(photo.read_bytes(), stages, 10**8)]), 1)
    return {"rows": rows, "decode_preprocess_ms_per_image": decode_s * 1000,
            "note": "texts are short prompts (~8 tokens), the tower cut at end-of-text"}


def report_dict(report: Report) -> dict[str, Any]:
    """A load report as JSON-ready numbers (floats to 3 decimals)."""
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in report.to_dict().items()}


def _load(address: str, call: str, request: Any, concurrency: int, total: int) -> dict[str, Any]:
    config = LoadConfig(call=call, host=address, data=json_format.MessageToDict(request),
                        concurrency=concurrency, total=total)
    return report_dict(asyncio.run(run(config)))


def encoder_service(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput through the running encoder: one item per call, concurrency 1 and 32."""
    checkpoint = cached_random_vit_b32()
    image = encoder_pb2.EncodeImageRequest(images=[sorted(PHOTOS.iterdir())[0].read_bytes()])
    text = encoder_pb2.EncodeTextRequest(texts=["a photo of a white dog"])
    rows = []
    scale = 1 if args.quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions():
            with running(["serve", "encoder", "--model", str(checkpoint), "--precision",
                          precision], Path(tmp) / f"encoder-{precision}.log") as encoder:
                for concurrency, images, texts in ((1, 16, 64), (32, 128, 512)):
                    for kind, request, total in (("image", image, images * scale),
                                                 ("text", text, texts * scale)):
                        method = "EncodeImage" if kind == "image" else "EncodeText"
                        result = _load(encoder.address, f"clipsearch.encoder.v1.Encoder.{method}",
                                       request, concurrency, total)
                        rows.append({"precision": precision, "concurrency": concurrency,
                                     "kind": kind, **result})
    return {"rows": rows}


def photo_folder(folder: Path, count: int) -> list[Path]:
    """`count` distinct files: the sample photos, then copies with a unique trailer after
    the JPEG end marker (same pixels, new bytes, so new ids)."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.is_file())
    made = []
    for i in range(count):
        source = photos[i % len(photos)]
        target = folder / f"{i:05d}_{source.name}"
        target.write_bytes(source.read_bytes() + (f"copy{i}".encode() if i >= len(photos) else b""))
        made.append(target)
    return made


def in_process_best(checkpoint: Path, precision: str, quick: bool,
                    batches: tuple[int, ...] = (8, 32, 64)) -> dict[str, Any]:
    """The encoder's in-process images/s at `precision` and its best batch size (from
    decoded pixels, as in `encoder_alone`): the ceiling the whole ingest chain is held to."""
    model = load_model(str(checkpoint), precision=precision)
    stages = PreprocessStages.split(model.preprocess)
    pixels = image_pixels(sorted(PHOTOS.iterdir())[0].read_bytes(), stages, 10**8)
    rates, cpu_ms = {}, {}
    for batch in batches:
        calls: list[int] = []  # one entry per encode() call, warm-up included
        def encode(images: list[Any] = [pixels] * batch, calls: list[int] = calls) -> None:
            calls.append(1)
            with model.on_stream("image"):
                model.encode_images(stages.batch(images, model.device))
        cpu_before = time.process_time()  # every thread of this process: all the model's
        rates[batch] = batch / timed(encode, 1 if quick else 4)
        cpu_ms[batch] = 1000 * (time.process_time() - cpu_before) / (len(calls) * batch)
    best = max(rates, key=rates.__getitem__)
    return {"batch": best, "images_per_s": rates[best], "cpu_ms_per_image": cpu_ms[best],
            "by_batch": {str(b): round(r, 2) for b, r in rates.items()}}


def _index_rate(checkpoint: Path, precision: str, encoder_extra: list[str], folder: Path,
                tmp: Path, name: str, images: int) -> dict[str, Any]:
    """images/s of `clipsearch index` over `folder` through both services, fresh ones
    (`name` tells their logs and database apart), and where the time went: the encoder's
    model time per image batch and the search service's Milvus writes (their metrics),
    and each process's CPU per image (the client is this process)."""
    ports = [free_port(), free_port()]
    with running(["serve", "encoder", "--model", str(checkpoint), "--precision", precision,
                  "--metrics-port", str(ports[0]), *encoder_extra],
                 tmp / f"encoder-{name}.log") as encoder, \
        running(["serve", "search", "--encoder", encoder.address, "--milvus",
                 str(tmp / f"{name}.db"), "--metrics-port", str(ports[1])],
                tmp / f"search-{name}.log") as search, \
            SearchClient(search.address) as client:
        pids = {"encoder": encoder.process.pid, "search": search.process.pid}
        with metrics_window(ports) as spent, cpu_window(pids) as cpu:
            started = time.perf_counter()
            summary = client.index_files(image_files(folder))
            seconds = time.perf_counter() - started
        assert summary.added == images, summary.failures[:3]
    model_s = spent('clipsearch_encoder_batch_seconds_sum{tower="image"}')
    return {"images_per_s": images / seconds, "seconds": seconds, "model_busy": model_s / seconds,
            "model_ms_per_image": 1000 * model_s / images,
            "image_batches": spent('clipsearch_encoder_batch_seconds_count{tower="image"}'),
            "milvus_write_share": spent('clipsearch_milvus_seconds_sum{operation="upsert"}')
            / seconds,
            "cpu_ms_per_image": {name: round(1000 * s / images, 2) for name, s in cpu.items()},
            "chain_cpu_ms_per_image": 1000 * sum(cpu.values()) / images,
            "cores_busy": sum(cpu.values()) / seconds}


def ingest(args: argparse.Namespace) -> dict[str, Any]:
    """images/s: the seed's loop vs indexing through both services into Milvus Lite, and
    the chain against the encoder in process at the same precision (its best batch)."""
    checkpoint = cached_random_vit_b32()
    out: dict[str, Any] = {"images": args.images, "runs": [], "in_process": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "photos"
        folder.mkdir()
        paths = photo_folder(folder, args.images)
        seed = SeedTutorial(checkpoint, tmp / "seed.db", device=seed_device())
        out["seed_images_per_s"] = seed.ingest(paths)
        seed.close()
        for precision in precisions():
            out["in_process"][precision] = in_process_best(checkpoint, precision, args.quick)
            variants: list[tuple[str, list[str]]] = [("clipsearch index (both services)", [])]
            if precision == "bf16":  # the CPU's own precision: also the old default's figure
                variants.append(("as above, decoding at the model's priority (the old default)",
                                 ["--decode-nice", "0"]))
            for number, (what, extra) in enumerate(variants):
                run_ = _index_rate(checkpoint, precision, extra, folder, tmp,
                                   f"{precision}-{number}", args.images)
                rate = run_["images_per_s"]
                best = out["in_process"][precision]
                out["runs"].append({
                    "what": what, "precision": precision, **run_,
                    "ratio_to_seed": rate / out["seed_images_per_s"],
                    "ratio_to_in_process": rate / best["images_per_s"],
                    # the model alone would take 1000 / best images/s per image
                    "in_process_ms_per_image": 1000 / best["images_per_s"],
                    "in_process_cpu_ms_per_image": best["cpu_ms_per_image"]})
    return out


# Every query a new text (the call's number in it, after the load's own tag), so no two
# share the encoder's work and none is in the query cache.
SEARCH_REQUEST = {"text": "a white dog {{.RequestNumber}}", "top_k": 10}  # one load's texts
SEARCH_TEXT = "a white dog {tag}.{{{{.RequestNumber}}}}"  # one tag per load: no repeats
# The repeated query of the cached rows: after its first call, a query-cache hit.
REPEATED_REQUEST = {"text": "a white dog", "top_k": 10}


def _search_loads(search: RunningService, quick: bool, repeated: bool = False,
                  metrics_ports: list[int] | None = None) -> list[dict[str, Any]]:
    """SearchText loads at concurrency 1, 8 and 32, each after a warm-up: new texts
    (every one a cache miss), or with `repeated` one text over and over (cache hits).
    With `metrics_ports` (encoder, search), each row also says where the time went."""
    request_totals = ((1, 60), (8, 240), (32, 640)) if not quick else ((1, 20), (8, 80), (32, 160))
    tags = iter(range(1_000_000))
    rows = []
    for concurrency, total in request_totals:
        def load(total: int, concurrency: int = concurrency) -> Any:
            data = REPEATED_REQUEST if repeated else {
                "text": SEARCH_TEXT.format(tag=next(tags)), "top_k": 10}
            return asyncio.run(run(LoadConfig(
                call="clipsearch.search.v1.Search.SearchText", host=search.address,
                data=data, concurrency=concurrency, total=total)))
        load(4 * concurrency)  # warm-up: connections, batch shapes, thread pools
        with metrics_window(metrics_ports or []) as spent:
            report = load(total)
        rows.append({"concurrency": concurrency, **report_dict(report),
                     **(_search_profile(spent, report.total_s) if metrics_ports else {})})
    return rows


def _search_profile(spent: Spent, seconds: float) -> dict[str, float]:
    """From the services' metrics over one load: texts per encoder batch, the share of
    the load's time the text tower was running, and the share spent in Milvus searches."""
    batches = spent('clipsearch_encoder_batch_size_count{tower="text"}')
    texts = spent('clipsearch_encoder_batch_size_sum{tower="text"}')
    searches = spent("clipsearch_search_batch_size_count")
    return {"texts_per_encoder_batch": texts / batches if batches else 0.0,
            "queries_per_search_batch": (spent("clipsearch_search_batch_size_sum") / searches
                                         if searches else 0.0),
            "text_model_busy": spent('clipsearch_encoder_batch_seconds_sum{tower="text"}')
            / seconds,
            "milvus_search_busy": spent('clipsearch_milvus_seconds_sum{operation="search"}')
            / seconds}


def text_search(args: argparse.Namespace) -> dict[str, Any]:
    """Latency and throughput of SearchText through the whole chain, against the seed's
    in-process encode_text + search at concurrency 1, over the same 200 photos: new texts
    (query-cache misses, the encoder's work) and one repeated text (cache hits)."""
    checkpoint = cached_random_vit_b32()
    paths = sorted(p for p in PHOTOS.iterdir() if p.is_file())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        seed = SeedTutorial(checkpoint, tmp / "seed.db", device=seed_device())
        seed.ingest(paths)
        seed.search_latencies(QUERIES[:2])  # warm-up
        latencies = seed.search_latencies(QUERIES * (3 if args.quick else 8))
        seed.close()
        baseline = {"qps": 1 / statistics.fmean(latencies), **percentiles_ms(latencies)}
        ports = [free_port(), free_port()]
        with running(["serve", "encoder", "--model", str(checkpoint), "--metrics-port",
                      str(ports[0])], tmp / "encoder.log") as encoder, \
            running(["serve", "search", "--encoder", encoder.address, "--milvus",
                     str(tmp / "milvus.db"), "--metrics-port", str(ports[1])],
                    tmp / "search.log") as search:
            with SearchClient(search.address) as client:
                client.index_files(paths)
                client.search_text("warm up")
            rows = _search_loads(search, args.quick, metrics_ports=ports)
            cached_rows = _search_loads(search, args.quick, repeated=True)
    for row in [*rows, *cached_rows]:
        row["p50_ratio_to_seed"] = row["p50_ms"] / baseline["p50_ms"]
        row["qps_ratio_to_seed"] = row["rps"] / baseline["qps"]
    return {"seed": baseline, "rows": rows, "cached_rows": cached_rows}


def collection_size(args: argparse.Namespace) -> dict[str, Any]:
    """Search latency and recall against exact search, by collection size, in Milvus Lite
    and (where the `milvus` package runs) a Milvus server, filtered (a 10% uri prefix) and
    not; synthetic unit vectors."""
    from threadpoolctl import threadpool_limits

    from search_service.config import SearchConfig
    from tests.milvus_launcher import milvus_server_available, start_milvus_server

    rows: list[dict[str, Any]] = []
    # Lite searches in this process: give its BLAS the search service's default limit.
    with tempfile.TemporaryDirectory() as tmp, \
            threadpool_limits(SearchConfig().blas_threads, user_api="blas"):
        server = None
        if milvus_server_available() is None:
            server = start_milvus_server(Path(tmp) / "server")
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                rows += _collection_rows(str(Path(tmp) / f"lite-{size}.db"), size, args.quick)
                if server is not None:
                    rows += _collection_rows(server.uri, size, args.quick)
        finally:
            if server is not None:
                server.stop()
    return {"rows": rows}


def _collection_rows(uri: str, size: int, quick: bool) -> list[dict[str, Any]]:
    from search_service.filters import StructuredFilter, build_expression
    from search_service.store import StoredImage, VectorStore

    rng = np.random.default_rng(size)
    vectors = rng.standard_normal((size, 512), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"{i:064x}" for i in range(size)]
    paths = [f"/synthetic/{i % 10}/{i}.jpg" for i in range(size)]
    store = VectorStore(uri, collection=f"bench_{size}", dimension=512, model="synthetic",
                        model_fingerprint="synthetic")
    started = time.perf_counter()
    for start in range(0, size, 10_000):
        store.upsert([StoredImage(ids[i], vectors[i], paths[i], 1, 1, 0, "{}")
                      for i in range(start, min(size, start + 10_000))])
    insert_s = time.perf_counter() - started
    queries = rng.standard_normal((10 if quick else 30, 512), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    expression = build_expression(StructuredFilter(uri_prefix="/synthetic/3/"), False)
    in_filter = np.array([p.startswith("/synthetic/3/") for p in paths])
    rows = []
    for name, expr, mask in (("unfiltered", "", None), ("uri prefix 10%", expression, in_filter)):
        latencies, recalls = [], []
        store.search(queries[:1], 10, expr)  # warm-up
        for query in queries:
            t0 = time.perf_counter()
            [hits] = store.search(query[None], 10, expr)
            latencies.append(time.perf_counter() - t0)
            scores = vectors @ query
            if mask is not None:
                scores = np.where(mask, scores, -9)
            exact = {ids[i] for i in np.argsort(-scores)[:10]}
            recalls.append(len(exact & {h.id for h in hits}) / 10)
        rows.append({"backend": store.backend, "index": store.index_type, "size": size,
                     "filter": name, "insert_rows_per_s": size / insert_s,
                     "recall_at_10": float(np.mean(recalls)), **percentiles_ms(latencies)})
    store.close()
    return rows
