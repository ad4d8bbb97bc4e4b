"""The per-model CPU table (issue 12): encoder images/s and texts/s by model and precision,
with each model's vector dimension, parameter count and memory.

    flock /tmp/bench.lock python -m benchmarks.models [--min-time 10] [--out results/models]

Random weights of the real architectures (encoder_service/testmodels*.py): the cost is
the real models' cost, the vectors are meaningless. Each (model, precision) runs in a
process of its own, so its peak RSS is its own and not what an earlier, larger model
left behind. The path measured is the encoder's in-process one (`LoadedModel`, as
`benchmarks.sections.encoder_alone`): an image batch starts from decoded uint8 pixels
(the tensor stage of preprocessing is inside the figure), a text batch from token ids
(short prompts, ~8 tokens). The GPU counterpart is results/open-clip-gpu.md
(`benchmarks.open_clip_check`)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.memory import status_mb

RESULTS = Path(__file__).resolve().parent.parent / "results"
# key -> (what the encoder's --model gets, where the random weights come from)
MODELS: dict[str, str] = {
    "ViT-B/32 (OpenAI)": "openai-b32",
    "ViT-B-16": "ViT-B-16",
    "ViT-L-14": "ViT-L-14",
    "ViT-B-16-SigLIP": "ViT-B-16-SigLIP",
}
# Batch sizes from the ViT-B/32 sweep in results/benchmarks.md ("Encoder alone"): images
# at 8 in fp32 are within 1% of the best (21.8 vs 21.6 at 32), at 32 in bf16 within 4%
# of 64 (75.2 vs 78.3), and 32 is the encoder's CPU batch limit (--max-batch 0); texts at
# 32 (322/s fp32, 1013/s bf16) for the same limit. Larger models only lose less to
# per-call overhead, so these are no worse for them.
IMAGE_BATCH = {"fp32": 8, "bf16": 32}
TEXT_BATCH = 32
PRECISIONS = ("bf16", "fp32")


def _model_argument(source: str) -> str:
    if source == "openai-b32":
        from encoder_service.testmodels import cached_random_vit_b32

        return str(cached_random_vit_b32())
    from encoder_service.testmodels_open_clip import cached_random_open_clip

    return f"open_clip:{source}/{cached_random_open_clip(source)}"


def measure_one(source: str, precision: str, min_time: float) -> dict[str, Any]:
    """One model in one precision, in this process: what the table row says."""
    import torch

    from benchmarks.sections import PHOTOS, QUERIES
    from encoder_service.images import PreprocessStages, image_pixels
    from encoder_service.model import LoadedModel, load_model

    argument = _model_argument(source)  # cached by the parent: a path here
    base_rss = status_mb()
    started = time.perf_counter()
    model = load_model(argument, device="cpu", precision=precision, download=False)
    load_s = time.perf_counter() - started
    loaded_rss = status_mb()
    tensors = [*model.model.parameters(), *model.model.buffers()]
    parameters = sum(p.numel() for p in model.model.parameters())
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    stages = PreprocessStages.split(model.preprocess)
    pixels = image_pixels(sorted(PHOTOS.iterdir())[0].read_bytes(), stages, 10**8)
    images = [pixels] * IMAGE_BATCH[precision]
    tokens = torch.stack([model.tokenizer.tokenize(QUERIES[i % len(QUERIES)])[0]
                          for i in range(TEXT_BATCH)])

    def encode_images(m: LoadedModel = model) -> None:
        with m.on_stream("image"):
            m.encode_images(stages.batch(images, m.device))

    threads = torch.get_num_threads()
    per_image_batch, image_share = _timed_with_share(encode_images, min_time, threads)
    per_text_batch, text_share = _timed_with_share(lambda: model.encode_tokens(tokens),
                                                   min_time, threads)
    peak_rss = status_mb(field="VmHWM")
    return {"precision": precision, "dimension": model.dimension, "parameters": parameters,
            "tensor_mib": tensor_bytes / 2**20, "image_size": model.image_resolution,
            "context_length": model.context_length, "text_path": model.traits.text_path,
            "image_batch": len(images), "text_batch": TEXT_BATCH,
            "images_per_s": len(images) / per_image_batch,
            "texts_per_s": TEXT_BATCH / per_text_batch,
            "load_s": load_s, "baseline_rss_mib": base_rss, "loaded_rss_mib": loaded_rss,
            "peak_rss_mib": peak_rss, "torch_threads": threads,
            "cpu_share_images": image_share, "cpu_share_texts": text_share}


def _timed_with_share(work: Any, min_time: float, threads: int) -> tuple[float, float]:
    """(seconds per call, the share of `threads` cores this process had meanwhile): a share
    well under 1 means other processes took the cores and the figure is low."""
    from benchmarks.sections import timed

    wall, cpu = time.perf_counter(), time.process_time()
    per_call = timed(work, min_time)
    return per_call, (time.process_time() - cpu) / ((time.perf_counter() - wall) * threads)


def _run_child(source: str, precision: str, min_time: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.models", "--one", source,
                          "--precision", precision, "--min-time", str(min_time)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{source} {precision} failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | precision | dim | parameters | weights MiB | RSS after load MiB | "
             "peak RSS MiB | images/s | texts/s | image px | text ctx | CPU share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['dimension']} | "
            f"{r['parameters'] / 1e6:.1f} M | {r['tensor_mib']:.0f} | "
            f"{r['loaded_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['images_per_s']:.3g} | {r['texts_per_s']:.3g} | {r['image_size']} | "
            f"{r['context_length']} | "
            f"{min(r['cpu_share_images'], r['cpu_share_texts']):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="which rows (comma-separated keys of MODELS)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--min-time", type=float, default=10.0,
                        help="seconds each images/s and texts/s figure runs at least")
    parser.add_argument("--out", default=str(RESULTS / "models"),
                        help="writes OUT.md and OUT.json ('' writes nothing)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # child: one source
    parser.add_argument("--precision", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.precision, args.min_time)))
        return 0
    import torch

    for key in args.models.split(","):  # random weights built here, not in a measured process
        _model_argument(MODELS[key])
    started = time.perf_counter()
    rows = []
    for key in args.models.split(","):
        for precision in args.precisions.split(","):
            row = {"model": key, **_run_child(MODELS[key], precision, args.min_time)}
            rows.append(row)
            print(_table([row])[-1], flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    machine = (f"{cpu} ({rows[0]['torch_threads']} torch threads), torch {torch.__version__}, "
               f"{time.perf_counter() - started:.0f} s")
    lines = [
        "# Models on this CPU", "",
        "Encoder throughput in-process (`LoadedModel`, the path `benchmarks.sections."
        "encoder_alone` measures) for each model in bf16 and fp32, with random weights of "
        "the real architecture: the real cost, meaningless vectors. Images/s from decoded "
        "pixels (tensor preprocessing included) at batch "
        f"{IMAGE_BATCH['bf16']} in bf16 and {IMAGE_BATCH['fp32']} in fp32; texts/s for "
        f"short prompts (~8 tokens) at batch {TEXT_BATCH}; each figure runs at least "
        f"{args.min_time:g} s after a warm-up batch. Weights MiB: parameters and buffers "
        "as loaded (bf16 is autocast, with OpenAI's matmul weights and open_clip's "
        "image-tower linear weights kept in bf16). RSS after load and peak RSS are of a "
        "process of its own per row "
        "(before loading, with Python, torch and the encoder's modules: "
        f"{rows[0]['baseline_rss_mib']:.0f} MiB). CPU share: the "
        "least share of its cores the row's process had while timed (its CPU time / wall "
        "time x threads); well under 1 means other processes took the cores. "
        "The GPU counterpart: [open-clip-gpu.md](open-clip-gpu.md).", "",
        *_table(rows), "",
        f"_Ran on {machine}: `flock /tmp/bench.lock python -m benchmarks.models`._", ""]
    if args.out:
        Path(f"{args.out}.md").write_text("\n".join(lines))
        Path(f"{args.out}.json").write_text(json.dumps(
            {"machine": machine, "min_time_s": args.min_time, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
