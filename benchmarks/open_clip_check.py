"""OpenCLIP families on a device: the service's vectors against open_clip's fp32 reference
on the CPU, per precision, and the encoder's throughput (issue 12).

    python -m benchmarks.open_clip_check [--device cuda] [--out results/open-clip-gpu.md]

Random weights of the real architectures (encoder_service/testmodels_open_clip.py): cost
and parity are those of the real models, retrieval is meaningless."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoder_service.device import PARITY_MIN_COSINE
from encoder_service.images import PreprocessStages
from encoder_service.model import load_model
from encoder_service.testmodels import shape_dataset
from encoder_service.testmodels_open_clip import cached_random_open_clip

ARCHS = ("ViT-B-32", "ViT-B-16-SigLIP", "xlm-roberta-base-ViT-B-32")
TEXTS = ["a photo of a dog", "ein Foto von einem Hund", "x",
         "a white dog running quickly over the green field near the house " * 12]


def _images(n: int) -> list[Image.Image]:
    pictures = [image for image, _ in shape_dataset(n_per_class=1, seed=5)][:n]
    return [Image.open(io.BytesIO(_png(p.resize((320, 240))))) for p in pictures]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1)
                        / np.linalg.norm(b, axis=1)))


def _rate(run: object, items: int, repeats: int = 3) -> float:
    assert callable(run)
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return items * repeats / (time.perf_counter() - start)


def check(arch: str, device: str, precisions: list[str], batch: int) -> list[str]:
    import open_clip

    folder = cached_random_open_clip(arch)
    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images = _images(8)
    with torch.inference_mode():
        ref_images = torch.nn.functional.normalize(
            ref.eval().encode_image(torch.stack([preprocess(i) for i in images])), dim=-1).numpy()
        ref_texts = torch.nn.functional.normalize(ref.encode_text(tokenizer(TEXTS)),
                                                  dim=-1).numpy()
    rows = []
    for precision in precisions:
        model = load_model(f"open_clip:{arch}/{folder}", device=device, precision=precision,
                           download=False)
        stages = PreprocessStages.split(model.preprocess)
        pixels = [stages.pixels(i) for i in images]
        served = model.encode_images(stages.batch(pixels, model.device))
        tokens = torch.stack([model.tokenizer.tokenize(t)[0] for t in TEXTS])
        texts = model.encode_tokens(tokens)
        image_cos, text_cos = _cos(served, ref_images), _cos(texts, ref_texts)
        big = [pixels[i % len(pixels)] for i in range(batch)]
        short = torch.stack([model.tokenizer.tokenize("a photo of a dog")[0]] * batch)

        def images_run(m=model, s=stages, b=big) -> np.ndarray:  # type: ignore[no-untyped-def]
            return m.encode_images(s.batch(b, m.device))

        def texts_run(m=model, t=short) -> np.ndarray:  # type: ignore[no-untyped-def]
            return m.encode_tokens(t)

        ok = min(image_cos, text_cos) >= PARITY_MIN_COSINE[precision]
        memory = (torch.cuda.max_memory_allocated() / 2**20 if model.device.type == "cuda"
                  else float("nan"))
        rows.append(f"| {arch} | {precision} | {model.dimension} | {image_cos:.6f} | "
                    f"{text_cos:.6f} | {'yes' if ok else 'NO'} | "
                    f"{_rate(images_run, batch):.0f} | {_rate(texts_run, batch):.0f} | "
                    f"{memory:.0f} |")
        print(rows[-1], flush=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    lines = [f"# OpenCLIP families on {name} (torch {torch.__version__})", "",
             f"Least cosine to open_clip's fp32 CPU reference over 8 images and "
             f"{len(TEXTS)} texts; images/s and texts/s at batch {args.batch}; peak memory.",
             "", "| model | precision | dim | image cos | text cos | parity | images/s | "
             "texts/s | peak MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arch in args.archs.split(","):
        lines += check(arch, args.device, args.precisions.split(","), args.batch)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
