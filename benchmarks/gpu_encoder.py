"""The encoder's device path on a GPU, in process and with no other service: what
`benchmarks.gpu_check` measures of the encoder, in a form that runs with torch, PIL and
`clip` alone (a lent GPU machine has no Milvus). `python -m benchmarks.gpu_encoder PHOTOS OUT`

Parity of fp32 and fp16 on the device against the CPU fp32 reference (the documented
tolerances), the GPU tensor stage of preprocessing against the CPU one, batch invariance,
images/s (from decoded pixels) and texts/s by batch size in fp16, and a text's latency
alone and while image batches run on the other tower's stream and thread."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoder_service.device import PARITY_MIN_COSINE
from encoder_service.images import PreprocessStages, image_pixels
from encoder_service.model import LoadedModel, build_model, clip, load_model
from encoder_service.testmodels import cached_random_vit_b32

TEXTS = ["a white dog", "a red sports car on a wet road at night", "a bowl of soup",
         " ".join(["photo"] * 90)]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1)
                      / np.linalg.norm(b, axis=1))


def reference_vectors(checkpoint: Path, photos: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The seed's fp32 vectors on the CPU: the photos and TEXTS, unit length."""
    reference = build_model(torch.load(checkpoint, map_location="cpu")).float().eval()
    preprocess = clip.clip._transform(reference.visual.input_resolution)
    with torch.inference_mode():
        images = torch.cat([reference.encode_image(preprocess(Image.open(p)).unsqueeze(0))
                            for p in photos])
        texts = reference.encode_text(clip.tokenize(TEXTS, truncate=True))
    return (torch.nn.functional.normalize(images, dim=-1).numpy(),
            torch.nn.functional.normalize(texts, dim=-1).numpy())


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def encode(model: LoadedModel, stages: PreprocessStages, pixels: list[np.ndarray]) -> np.ndarray:
    with model.on_stream("image"):
        return model.encode_images(stages.batch(pixels, model.device))


def per_call_s(work: Any, seconds: float) -> float:
    work()
    synchronize()
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < seconds:
        work()
        runs += 1
    synchronize()
    return (time.perf_counter() - started) / runs


def text_latency(model: LoadedModel, stages: PreprocessStages, pixels: np.ndarray,
                 batch: int, count: int) -> dict[str, float]:
    """ms of a one-text call alone, and while image batches run on another thread."""
    tokens = clip.tokenize(["a photo of a white dog"])

    def one_text() -> float:
        started = time.perf_counter()
        model.encode_tokens(tokens)
        return (time.perf_counter() - started) * 1000

    alone = [one_text() for _ in range(count)]
    busy = threading.Event()
    stop = threading.Event()

    def images() -> None:
        while not stop.is_set():
            encode(model, stages, [pixels] * batch)
            busy.set()

    worker = threading.Thread(target=images)
    worker.start()
    busy.wait()
    during = [one_text() for _ in range(count)]
    stop.set()
    worker.join()
    image_ms = per_call_s(lambda: encode(model, stages, [pixels] * batch), 0.5) * 1000
    return {"alone_p50_ms": statistics.median(alone), "alone_max_ms": max(alone),
            "during_images_p50_ms": statistics.median(during),
            "during_images_max_ms": max(during), "image_batch": batch,
            "image_batch_ms": image_ms}


def main(photos_dir: str, out_dir: str, quick: bool = False) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    photos = sorted(p for p in Path(photos_dir).iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    photos = photos[:8] if quick else photos[:64]
    checkpoint = cached_random_vit_b32()
    results: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "device": torch.cuda.get_device_name(0) if device == "cuda"
                               else "cpu", "photos": len(photos)}
    ref_images, ref_texts = reference_vectors(checkpoint, photos)
    results["parity"] = []
    for precision in ("fp32", "fp16"):
        model = load_model(str(checkpoint), device=device, precision=precision,
                           allow_fp16_on_cpu=True)
        stages = PreprocessStages.split(model.preprocess)
        pixels = [image_pixels(p.read_bytes(), stages, 10**8) for p in photos]
        served = encode(model, stages, pixels)
        single = np.concatenate([encode(model, stages, [p]) for p in pixels])
        texts = model.encode_tokens(clip.tokenize(TEXTS, truncate=True))
        least = float(min(cosines(served, ref_images).min(), cosines(texts, ref_texts).min()))
        results["parity"].append({
            "precision": precision, "min_cosine": least,
            "threshold": PARITY_MIN_COSINE[precision],
            "ok": least >= PARITY_MIN_COSINE[precision],
            "batch_vs_single_min_cosine": float(cosines(served, single).min()),
            "gpu_preprocess_max_abs_diff": float(
                (stages.batch(pixels[:4], model.device).cpu() - stages.batch(pixels[:4]))
                .abs().max())})
        print(json.dumps(results["parity"][-1]), flush=True)
    batches = [1, 8] if quick else [1, 32, 128, 256, 512]
    results["throughput_fp16"] = []
    for batch in batches:
        tokens = clip.tokenize([f"a photo of a white dog number {i}" for i in range(batch)])
        image_s = per_call_s(lambda b=batch: encode(model, stages, [pixels[0]] * b), 1.0)
        text_s = per_call_s(lambda t=tokens: model.encode_tokens(t), 1.0)
        results["throughput_fp16"].append({"batch": batch, "images_per_s": batch / image_s,
                                           "texts_per_s": batch / text_s})
        print(json.dumps(results["throughput_fp16"][-1]), flush=True)
    results["text_latency_fp16"] = text_latency(model, stages, pixels[0], 8 if quick else 256,
                                                5 if quick else 50)
    print(json.dumps(results["text_latency_fp16"]), flush=True)
    if device == "cuda":
        results["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "gpu-encoder.json").write_text(json.dumps(results, indent=2))
    return 0 if all(row["ok"] for row in results["parity"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], quick="--quick" in sys.argv))
