"""int8 on this CPU, measured: `python -m benchmarks.int8 [--quick] [--models vit-b32,tiny]`.

Three int8 variants against bf16 (the encoder's CPU precision) and fp32 (the reference), in
process, in one run: torch's dynamic quantisation (`torch.ao.quantization.quantize_dynamic`:
int8 weights, activations quantised per call) of CLIP's `nn.Linear` layers, and ONNX
Runtime's dynamic and static (calibrated) quantisation of both exported towers
(benchmarks/int8_onnx.py, when onnxruntime and onnx are installed: the `bench` extra).

* speed: images/s at batch 32 and texts/s at batch 32 and 1, on the random-weight ViT-B/32
  (the real model's architecture and cost);
* quality: recall@10 of text-to-image search with each variant's vectors against fp32 exact
  search (numpy, what FLAT does) over held-out images, and the cosine of each variant's
  vectors to fp32's. Two models: the random ViT-B/32 over the 200 sample photos (its real
  cost, but random weights put photos close together, so rankings are fragile: a
  pessimistic figure) and the tiny CLIP trained here over held-out shape pictures it never
  saw (a model with real structure, 64 wide, so its speed says nothing).

What torch's quantize_dynamic reaches in CLIP: the MLP layers (c_fc, c_proj: two thirds of a
residual block's FLOPs). nn.MultiheadAttention keeps its in-projection as a bare parameter
and its out_proj is a NonDynamicallyQuantizableLinear, so attention stays fp32, as do the
patch convolution and the final projections.

The decision rule of issue 13: int8 ships as a precision only if it is >= 1.3x bf16's
images/s with recall@10 >= 0.95. Writes results/int8.md and results/int8.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import int8_onnx
from encoder_service.images import PreprocessStages, image_pixels
from encoder_service.model import clip, load_model
from encoder_service.testmodels import (
    cached_random_vit_b32,
    cached_tiny_clip,
    shape_dataset,
)

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
RESULTS = Path(__file__).resolve().parent.parent / "results"
VARIANTS = ("fp32", "bf16", "int8-dynamic", "int8-onnxruntime", "int8-onnxruntime-static")
ONNX_VARIANTS = ("int8-onnxruntime", "int8-onnxruntime-static")
# Inputs the static variant calibrates its activation ranges on (per tower).
CALIBRATION_IMAGES = 64
NOTES = [
    "torch's quantize_dynamic reaches only the MLP linears (attention's "
    "in-projection is a bare parameter and its out_proj a NonDynamicallyQuantizableLinear, "
    "so attention stays fp32), it quantises the activations on every call, and bf16 runs on "
    "oneDNN's bf16 kernels with the weights kept in bf16 (this CPU has {bf16_hardware}). "
    "The "
    "random ViT-B/32's recall@10 is pessimistic for every reduced precision (bf16 too): its "
    "random weights put the photos close together, so tiny errors reorder the top 10; the "
    "tiny trained CLIP shows what a model with real structure keeps. int8-onnxruntime: both "
    "towers exported to ONNX and dynamically quantised by ONNX Runtime (every MatMul, "
    "attention included); its text tower runs the whole 77-token context (the torch "
    "variants stop at the longest end-of-text), so its texts/s understates it. "
    "int8-onnxruntime-static: the same export, activation ranges calibrated once (MinMax, "
    f"{CALIBRATION_IMAGES} of the photos and the query texts for the ViT-B/32, shape "
    "pictures of another seed for the tiny CLIP), then ONNX Runtime's QLinearMatMul / "
    "QLinearConv kernels (uint8 activations, int8 weights per channel); no quantisation "
    "of activations per call, but fixed ranges. Not tried: OpenVINO (NNCF's static int8 "
    "would be the same calibrated route through another runtime).",
]
SPEED_TARGET = 1.3  # x bf16's images/s
RECALL_TARGET = 0.95
BATCH = 32


def variants() -> list[str]:
    """VARIANTS that can run here (ONNX Runtime's need onnxruntime and onnx)."""
    return [v for v in VARIANTS if v not in ONNX_VARIANTS or int8_onnx.available()]


def load_variant(checkpoint: Path, variant: str, workdir: Path,
                 calibration: Callable[[PreprocessStages], list[np.ndarray]] | None = None,
                 calibration_texts: Sequence[str] = ()) -> Any:
    """The encoder's model in one of VARIANTS, on the CPU (a LoadedModel, or an
    OnnxInt8Model with its encode_images / encode_tokens). The static variant calibrates on
    the pixels `calibration` makes with the model's preprocessing, and `calibration_texts`."""
    if variant in ("fp32", "bf16"):
        return load_model(str(checkpoint), device="cpu", precision=variant)
    if variant in ONNX_VARIANTS:
        fp32 = load_model(str(checkpoint), device="cpu", precision="fp32")
        inputs = None
        if variant == "int8-onnxruntime-static":
            assert calibration is not None and calibration_texts, "static int8 calibrates"
            stages = PreprocessStages.split(fp32.preprocess)
            inputs = (stages.batch(calibration(stages)).numpy(),
                      clip.tokenize(list(calibration_texts), truncate=True).long().numpy())
        return int8_onnx.OnnxInt8Model(fp32, workdir, calibration=inputs)
    if variant != "int8-dynamic":
        raise ValueError(f"unknown variant {variant!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

    model = load_model(str(checkpoint), device="cpu", precision="fp32")
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        # In place: the text tower's encode function (model.traits) holds the same modules.
        quantize_dynamic(model.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def quantised_layers(model: Any) -> tuple[int, int]:
    """(dynamically quantised linear layers, linear layers left in floating point); for
    ONNX Runtime, (int8 MatMul nodes, 0)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if isinstance(model, int8_onnx.OnnxInt8Model):
        return model.int8_matmuls, 0
    modules = list(model.model.modules())
    quantised = sum(isinstance(m, DynamicLinear) for m in modules)
    left = sum(isinstance(m, torch.nn.Linear) for m in modules)
    return quantised, left


def encode_images(model: Any, stages: PreprocessStages,
                  pixels: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([model.encode_images(stages.batch(pixels[i:i + BATCH]))
                           for i in range(0, len(pixels), BATCH)])


def encode_texts(model: Any, texts: Sequence[str]) -> np.ndarray:
    return np.concatenate([
        model.encode_tokens(clip.tokenize(list(texts[i:i + BATCH]), truncate=True))
        for i in range(0, len(texts), BATCH)])


def recall_at_10(queries: np.ndarray, images: np.ndarray, reference_queries: np.ndarray,
                 reference_images: np.ndarray) -> float:
    """Mean share of fp32 exact search's top 10 that the variant's search also returns."""
    k = min(10, images.shape[0])
    found = np.argsort(-(queries @ images.T), axis=1, kind="stable")[:, :k]
    exact = np.argsort(-(reference_queries @ reference_images.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)]))


def photo_set(limit: int) -> tuple[list[bytes], list[str]]:
    """The sample photos' bytes and a query per photo from its class name."""
    paths = sorted(p for p in PHOTOS.iterdir() if p.is_file())[:limit]
    names = [p.stem.split("_", 1)[1].replace("_", " ") for p in paths]
    return [p.read_bytes() for p in paths], [f"a photo of a {n}" for n in names]


def shape_set(per_class: int, seed: int = 2026) -> tuple[list[Image.Image], list[str]]:
    """Held-out shape pictures (a seed the tiny CLIP was not trained on) and the captions."""
    dataset = shape_dataset(per_class, seed=seed)
    return [image for image, _ in dataset], sorted({c for _, c in dataset})


def measure_model(name: str, checkpoint: Path, quick: bool) -> dict[str, Any]:
    """Speed and recall@10 of every variant of one model, fp32 as the reference. The timed
    calls take turns across the variants, round after round, and each figure is the median
    of its rounds: on a shared machine, load that comes and goes then hits every variant
    alike instead of whichever ran at the time."""
    calibration: Callable[[PreprocessStages], list[np.ndarray]]
    if name == "vit-b32":
        data, texts = photo_set(48 if quick else 200)
        held_out = f"{len(data)} sample photos; queries 'a photo of a <class>'"
        # 200 photos are all there are: the static variant calibrates on some of those it
        # is measured on (a slightly kind setup for it).
        def calibration(stages: PreprocessStages) -> list[np.ndarray]:
            return [image_pixels(d, stages, 10**8) for d in data[:CALIBRATION_IMAGES]]
    else:
        shapes, texts = shape_set(2 if quick else 5)
        held_out = f"{len(shapes)} held-out shape pictures; queries the {len(texts)} captions"
        others, _ = shape_set(2, seed=2027)  # pictures of their own to calibrate on

        def calibration(stages: PreprocessStages) -> list[np.ndarray]:
            return [stages.pixels(image) for image in others]
    rows: list[dict[str, Any]] = []
    reference: tuple[np.ndarray, np.ndarray] | None = None
    calls: dict[str, list[Callable[[], Any]]] = {}
    tokens = clip.tokenize([texts[i % len(texts)] for i in range(BATCH)], truncate=True)
    chosen = variants()
    workdir = Path(tempfile.mkdtemp(prefix="int8-"))
    for variant in chosen:
        model = load_variant(checkpoint, variant, workdir, calibration, texts)
        stages = PreprocessStages.split(model.preprocess)
        if name == "vit-b32":
            pixels = [image_pixels(d, stages, 10**8) for d in data]
        else:
            pixels = [stages.pixels(image) for image in shapes]
        images = encode_images(model, stages, pixels)
        queries = encode_texts(model, texts)
        if reference is None:
            reference = (queries, images)
        batch = [pixels[i % len(pixels)] for i in range(BATCH)]
        calls[variant] = [partial(encode_images, model, stages, batch),
                          partial(model.encode_tokens, tokens),
                          partial(model.encode_tokens, tokens[:1])]
        quantised, left = quantised_layers(model)
        rows.append({
            "model": name, "variant": variant,
            "recall_at_10": recall_at_10(queries, images, *reference),
            "image_cosine_min": float(np.min(np.sum(images * reference[1], axis=1))),
            "text_cosine_min": float(np.min(np.sum(queries * reference[0], axis=1))),
            "int8_linear_layers": quantised, "float_linear_layers": left})
    rounds = 3 if quick else 7
    times: dict[str, list[list[float]]] = {v: [[], [], []] for v in chosen}
    for call in (c for v in chosen for c in calls[v]):
        call()  # warm-up
    for _ in range(rounds):
        for variant in chosen:
            for k, call in enumerate(calls[variant]):
                started = time.perf_counter()
                call()
                times[variant][k].append(time.perf_counter() - started)
    for row in rows:
        image_s, text_s, text1_s = (float(np.median(t)) for t in times[row["variant"]])
        row.update({"images_per_s": BATCH / image_s, "texts_per_s": BATCH / text_s,
                    "text_batch1_ms": text1_s * 1000, "rounds": rounds})
    bf16 = next(r for r in rows if r["variant"] == "bf16")
    for row in rows:
        row["images_x_bf16"] = row["images_per_s"] / bf16["images_per_s"]
        row["texts_x_bf16"] = row["texts_per_s"] / bf16["texts_per_s"]
    shutil.rmtree(workdir, ignore_errors=True)
    return {"model": name, "held_out": held_out, "rows": rows}


def verdict(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether an int8 variant meets the bar: >= SPEED_TARGET x bf16's images/s on the
    ViT-B/32 and recall@10 >= RECALL_TARGET on every model measured."""
    rows = [r for m in models for r in m["rows"] if r["variant"].startswith("int8")]
    verdicts: dict[str, str] = {}
    shipping: list[str] = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        speed = [r["images_x_bf16"] for r in mine if r["model"] == "vit-b32"]
        recall = min(r["recall_at_10"] for r in mine)
        if not speed:
            verdicts[variant] = "no ViT-B/32 speed measured"
        elif speed[0] < SPEED_TARGET:
            verdicts[variant] = f"images/s x bf16 {speed[0]:.2f} < {SPEED_TARGET}"
        elif recall < RECALL_TARGET:
            verdicts[variant] = (f"images/s x bf16 {speed[0]:.2f} meets the bar, but recall@10 "
                                 f"{recall:.3f} < {RECALL_TARGET}")
        else:
            verdicts[variant] = "meets both bars"
            shipping.append(variant)
    return {"ships": bool(shipping), "shipping": shipping, "variants": verdicts,
            "why": "; ".join(f"{v}: {why}" for v, why in verdicts.items())}


def bf16_hardware() -> str:
    """What this CPU has for bf16 matmuls, from its flags (Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "flags unknown"
    have = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX"))
            if flag in flags]
    return " and ".join(have) if have else "neither AVX-512 BF16 nor AMX"


def write(results: dict[str, Any], out: Path) -> Path:
    """results/int8.json and results/int8.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8.json").write_text(json.dumps(results, indent=2))
    columns = [("model", "model"), ("variant", "variant"), ("images_per_s", "images/s"),
               ("images_x_bf16", "× bf16"), ("texts_per_s", "texts/s"),
               ("texts_x_bf16", "× bf16"), ("text_batch1_ms", "text batch 1 ms"),
               ("recall_at_10", "recall@10 vs fp32"), ("image_cosine_min", "min cos image"),
               ("text_cosine_min", "min cos text"), ("int8_linear_layers", "int8 linears"),
               ("float_linear_layers", "float linears")]

    def cell(value: Any, key: str = "") -> str:
        if "cosine" in key:
            return f"{value:.5f}"
        return f"{value:.3g}" if isinstance(value, float) and abs(value) < 100 else (
            f"{value:.0f}" if isinstance(value, float) else str(value))
    lines = ["# int8 on the CPU, measured", "",
             "`python -m benchmarks.int8`: int8 quantisation, dynamic by torch "
             "(`quantize_dynamic` of CLIP's linear layers), dynamic and static (calibrated) "
             "by ONNX Runtime (both towers exported, every MatMul), against bf16 and fp32, "
             "in process, one run. "
             f"Speed at batch {BATCH} (images from decoded pixels) and batch 1 (texts), "
             "the median of rounds in which the variants take turns; "
             "recall@10 of text-to-image search against fp32 exact search.", "",
             "| " + " | ".join(t for _, t in columns) + " |", "|" + "---|" * len(columns)]
    for model in results["models"]:
        lines += ["| " + " | ".join(cell(row[k], k) for k, _ in columns) + " |"
                  for row in model["rows"]]
    v = results["verdict"]
    m = results["machine"]
    lines += ["", "Held out: " + "; ".join(f"{x['model']}: {x['held_out']}"
                                            for x in results["models"]) + ".", "",
              f"**Verdict: int8 {'ships' if v['ships'] else 'does not ship'}** "
              f"(bar: >= {SPEED_TARGET}x bf16's images/s and recall@10 >= {RECALL_TARGET}): "
              f"{v['why']}.", "",
              *(note.format(bf16_hardware=results.get("bf16_hardware", "flags not recorded"))
                for note in NOTES), "",
              f"_Ran on {m.get('cpu')} ({m.get('cores')} cores), "
              f"torch {m.get('torch')}, quantized engine {results['engine']}; "
              f"{results['seconds']} s{', quick' if results['quick'] else ''}._", ""]
    path = out / "int8.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit-b32,tiny",
                        help="vit-b32 (speed and a pessimistic recall), tiny (recall)")
    parser.add_argument("--quick", action="store_true", help="fewer images, shorter timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from benchmarks.report import machine

    checkpoints = {"vit-b32": cached_random_vit_b32, "tiny": cached_tiny_clip}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - set(checkpoints)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    models = [measure_model(n, checkpoints[n](), args.quick) for n in names]
    results = {"machine": machine(), "engine": torch.backends.quantized.engine,
               "bf16_hardware": bf16_hardware(),
               "quick": args.quick, "models": models, "verdict": verdict(models),
               "seconds": round(time.perf_counter() - started, 1)}
    path = write(results, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
