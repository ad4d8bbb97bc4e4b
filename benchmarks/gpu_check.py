"""The GPU check: `python -m benchmarks.gpu_check` (or scripts/gpu-check.sh, which also runs
the CUDA-only tests), ready for the first machine with a GPU; under 8 minutes on one.

It writes results/gpu.md and results/gpu.json: the card, driver, CUDA and torch versions;
parity in fp32 and fp16 against the CPU fp32 reference at the documented tolerances;
the encoder in process (images/s from decoded pixels, texts/s) by batch size in fp16;
decoding on the GPU (torchvision.io.decode_jpeg) against PIL, with its parity impact;
the whole chain's ingest with the decode share; SearchText at concurrency 1 and 64.
On a machine without a GPU it runs the same code on the CPU (`--quick` in CI), so that
it cannot rot while no GPU is at hand."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2 as transforms_v2

from benchmarks.gpu_chain import DEFAULT_INDEX, chain
from benchmarks.gpu_encoder import TEXTS, cosines, reference_vectors
from benchmarks.gpu_encoder import encode as encode_pixels
from benchmarks.sections import PHOTOS, timed
from encoder_service.decoding import ImageDecoder, default_workers
from encoder_service.device import PARITY_MIN_COSINE
from encoder_service.images import PreprocessStages, image_pixels
from encoder_service.model import clip, load_model
from encoder_service.testmodels import cached_random_vit_b32

RESULTS = Path(__file__).resolve().parent.parent / "results"


def environment() -> dict[str, Any]:
    found: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                             "torchvision": torchvision.__version__,
                             "python": platform.python_version(),
                             "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        found["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        try:
            found["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            found["driver"] = "unknown (no nvidia-smi)"
    return found


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parity(checkpoint: Path, photos: list[Path], precisions: list[str]) -> list[dict[str, Any]]:
    ref_images, ref_texts = reference_vectors(checkpoint, photos)
    rows = []
    for precision in precisions:
        model = load_model(str(checkpoint), device=device(), precision=precision,
                           allow_fp16_on_cpu=True)
        stages = PreprocessStages.split(model.preprocess)
        pixels = [image_pixels(p.read_bytes(), stages, 10**8) for p in photos]
        images = np.concatenate([encode_pixels(model, stages, pixels[i:i + 64])
                                 for i in range(0, len(pixels), 64)])
        texts = model.encode_tokens(clip.tokenize(TEXTS, truncate=True))
        least = min(cosines(images, ref_images).min(), cosines(texts, ref_texts).min())
        rows.append({"precision": precision, "device": str(model.device),
                     "min_cosine": float(least), "threshold": PARITY_MIN_COSINE[precision],
                     "ok": bool(least >= PARITY_MIN_COSINE[precision])})
    return rows


def throughput(checkpoint: Path, photo: Path, batches: list[int],
               precision: str) -> list[dict[str, Any]]:
    model = load_model(str(checkpoint), device=device(), precision=precision,
                       allow_fp16_on_cpu=True)
    stages = PreprocessStages.split(model.preprocess)
    pixels = image_pixels(photo.read_bytes(), stages, 10**8)
    rows = []
    for batch in batches:
        tokens = clip.tokenize([f"a photo of a white dog number {i}" for i in range(batch)])
        per_images = timed(lambda b=batch: encode_pixels(model, stages, [pixels] * b), 1.0)
        per_texts = timed(lambda t=tokens: model.encode_tokens(t), 1.0)
        rows.append({"batch": batch, "images_per_s": batch / per_images,
                     "texts_per_s": batch / per_texts})
    return rows


def gpu_decode(checkpoint: Path, photos: list[Path], precision: str) -> dict[str, Any]:
    """torchvision.io.decode_jpeg on the GPU against PIL (decode + the PIL stage): speed,
    pixels, and what the difference does to the vectors (the least cosine between each
    photo's vector from either decoding, `precision` on this device). Without a GPU the
    same code decodes with torchvision on the CPU, so that it runs in CI."""
    where = device()
    model = load_model(str(checkpoint), device=where, precision=precision,
                       allow_fp16_on_cpu=True)
    stages = PreprocessStages.split(model.preprocess)
    datas = [p.read_bytes() for p in photos]
    pil_s = timed(lambda: [image_pixels(d, stages, 10**8) for d in datas], 1.0, 1)
    out: dict[str, Any] = {"images": len(datas), "pil_images_per_s": len(datas) / pil_s,
                           "torchvision_decodes_on": where}
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    side = stages.pixels(Image.open(photos[0])).shape[0]
    resize = transforms_v2.Compose([
        transforms_v2.Resize(side, interpolation=Image.Resampling.BICUBIC, antialias=True),
        transforms_v2.CenterCrop(side)])

    def decode_with_torchvision() -> list[torch.Tensor]:
        decoded = torchvision.io.decode_jpeg(encoded, device=where,
                                             mode=torchvision.io.ImageReadMode.RGB)
        return [resize(image) for image in decoded]

    torchvision_s = timed(decode_with_torchvision, 1.0, 1)
    tv_pixels = torch.stack(decode_with_torchvision()).permute(0, 2, 3, 1).cpu().numpy()
    pil_pixels = np.stack([image_pixels(d, stages, 10**8) for d in datas])
    difference = np.abs(tv_pixels.astype(np.int16) - pil_pixels.astype(np.int16))
    vectors = [np.concatenate([encode_pixels(model, stages, list(pixels[i:i + 64]))
                               for i in range(0, len(pixels), 64)])
               for pixels in (tv_pixels, pil_pixels)]
    out.update({"torchvision_images_per_s": len(datas) / torchvision_s,
                "pixels_mean_abs_difference": float(difference.mean()),
                "pixels_max_abs_difference": int(difference.max()),
                "vectors_precision": precision,
                "vectors_least_cosine": float(cosines(*vectors).min())})
    return out


async def _decode_alone(paths: list[Path], processes: bool) -> float:
    """images/s of the encoder's own decoding (what --decode-in auto picks: worker
    processes on a GPU, threads on a CPU), with nothing else running."""
    decoder = ImageDecoder(default_workers(0, processes), 0, processes)
    await decoder.start(PreprocessStages.split(clip.clip._transform(224)), 10**8)
    try:
        datas = [p.read_bytes() for p in paths]
        started = time.perf_counter()
        decoded = await asyncio.gather(*(decoder.decode(d) for d in datas))
        assert not any(isinstance(d, str) for d in decoded)
        return len(datas) / (time.perf_counter() - started)
    finally:
        decoder.close()


def write_markdown(results: dict[str, Any], out: Path) -> None:
    lines = ["# GPU check", "", "Written by `python -m benchmarks.gpu_check`; "
             "the model is a random-weight ViT-B/32 (the real one's cost).", "",
             "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in results["environment"].items()]
    lines += ["", "## Parity against the CPU fp32 reference", "",
              "| precision | device | least cosine | threshold | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['device']} | {r['min_cosine']:.6f} | {r['threshold']} "
              f"| {r['ok']} |" for r in results["parity"]]
    lines += ["", f"## Encoder in process ({results['throughput_precision']}, images from "
              "decoded pixels)", "", "| batch | images/s | texts/s |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['images_per_s']:.0f} | {r['texts_per_s']:.0f} |"
              for r in results["throughput"]]
    lines += ["", "## Decoding", "", "```", json.dumps(results["decode"], indent=2), "```",
              "", "## Whole chain", "", "```", json.dumps(results["chain"], indent=2), "```"]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few photos and small batches: the CPU smoke run of CI")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    checkpoint = cached_random_vit_b32()
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    on_gpu = torch.cuda.is_available()
    if args.quick:
        photos, batches, totals, count = photos[:6], [1, 2], [(1, 4), (4, 8)], 8
        settings = [DEFAULT_INDEX, (2, 4)]
    else:
        batches = [1, 8, 32, 64, 128, 256, 512] if on_gpu else [1, 8, 32]
        totals = [(1, 200), (64, 6400)] if on_gpu else [(1, 40), (64, 320)]
        count = 2000 if on_gpu else 200
        # A GPU encodes a batch in a few ms, so bigger and more Index batches in flight
        # may keep it busier than the default (32 images, 2 in flight).
        settings = [DEFAULT_INDEX, (128, 2), (128, 4), (256, 4)] if on_gpu else [DEFAULT_INDEX]
    precision = "fp16" if on_gpu else "fp32"
    results: dict[str, Any] = {"environment": environment(), "quick": args.quick}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("parity", lambda: parity(checkpoint, photos, ["fp32", "fp16"])),
        ("throughput", lambda: throughput(checkpoint, photos[0], batches, precision)),
        ("decode", lambda: gpu_decode(checkpoint, photos, precision)),
        ("chain", lambda: chain(
            checkpoint, device(), count, settings, totals, 256 if on_gpu else 32,
            lambda paths: asyncio.run(_decode_alone(paths, processes=on_gpu)))),
    ]
    results["throughput_precision"] = precision
    args.out.mkdir(parents=True, exist_ok=True)
    for name, step in steps:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        results[name] = step()
        print(json.dumps(results[name], indent=2), f"({time.perf_counter() - started:.0f} s)",
              flush=True)
        (args.out / "gpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out)
    print(f"results: {args.out / 'gpu.md'}")
    return 0 if all(row["ok"] for row in results["parity"]) else 1


if __name__ == "__main__":
    sys.exit(main())
