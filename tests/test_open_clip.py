"""OpenCLIP models (issue 12): served vectors equal open_clip's own reference path.

Random weights of the real architectures (encoder_service/testmodels_open_clip.py): an
OpenCLIP ViT-B-32 (CLIP BPE, causal text tower: the trimmed text path), a SigLIP B/16
(Hugging Face tokenizer, non-causal tower pooled at the last position, squash resize and
0.5 mean/std) and an XLM-R multilingual text tower. The reference is
`open_clip.create_model_and_transforms("local-dir:FOLDER")` + `open_clip.get_tokenizer`,
i.e. open_clip's own loading of the same files, independent of the service's code."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from client import EncoderClient
from clipsearch.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from encoder_service.families.openai import OPENAI_MEAN
from encoder_service.images import PreprocessStages
from encoder_service.model import ModelLoadError, load_model
from encoder_service.testmodels_open_clip import cached_random_open_clip
from tests.servers import RunningService, free_port, running
from tests.vectors import cosines

open_clip = pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
SHORT = "a photo of a dog"
LONG = "a white dog running quickly over the green field near the house " * 12  # > 77 tokens
TEXTS = [SHORT, LONG, "x", "ein Foto von einem Hund", "犬の写真", "фотография собаки"]
IS_CUT = [False, True, False, False, False, False]


@dataclass
class OpenClipReference:
    """open_clip's own path over the same folder."""

    model: Any
    preprocess: Any
    tokenizer: Any

    @torch.inference_mode()
    def images(self, data: list[bytes]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(d))) for d in data])
        return torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1).numpy()

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> np.ndarray:
        features = self.model.encode_text(self.tokenizer(texts))
        return torch.nn.functional.normalize(features, dim=-1).numpy()


def reference(folder: Path) -> OpenClipReference:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return OpenClipReference(model.eval(), preprocess,
                             open_clip.get_tokenizer(f"local-dir:{folder}"))


@pytest.fixture(scope="module")
def images(photos: list[Path]) -> list[bytes]:
    """Three photos of different sizes (one greyscale among the sample) and a PNG."""
    chosen = [p.read_bytes() for p in photos[:2]]
    grey = next(p for p in photos if Image.open(p).mode == "L")
    png = io.BytesIO()
    Image.open(photos[5]).resize((300, 180)).save(png, format="PNG")
    return [*chosen, grey.read_bytes(), png.getvalue()]


@pytest.fixture(scope="module")
def vit_b32() -> Path:
    return cached_random_open_clip("ViT-B-32")


@pytest.fixture(scope="module")
def siglip() -> Path:
    return cached_random_open_clip("ViT-B-16-SigLIP")


@pytest.fixture(scope="module")
def xlmr() -> Path:
    return cached_random_open_clip("xlm-roberta-base-ViT-B-32")


def _encoder(model: str, logs: Path, name: str, *extra: str) -> Iterator[RunningService]:
    with running(["serve", "encoder", "--model", model, "--device", "cpu", "--no-download",
                  "--max-batch", "4", *extra], logs / f"{name}.log") as service:
        yield service


def model_info(address: str) -> encoder_pb2.ModelInfo:
    """The full ModelInfo message (the client's ModelInfo has the common fields only)."""
    with grpc.insecure_channel(address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        return stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=30)


def check_served(service: RunningService, ref: OpenClipReference, images: list[bytes],
                 least: float) -> tuple[float, float]:
    """Images and texts (each call one batch, texts of every length) against the
    reference; returns the least image and text cosines."""
    with EncoderClient(service.address) as client:
        served_images = client.encode_images(images)
        single = client.encode_images(images[:1])  # batch size 1 gives the same vector
        results = client.encode_texts_results(TEXTS)
    assert not results.failures
    assert results.truncated == IS_CUT
    image_cos = cosines(served_images, ref.images(images))
    text_cos = cosines(results.vectors, ref.texts(TEXTS))
    assert cosines(single, served_images[:1]).min() >= least
    assert image_cos.min() >= least, image_cos
    assert text_cos.min() >= least, text_cos
    print(f"{service.log_path.stem}: least cosine images {image_cos.min():.7f} "
          f"texts {text_cos.min():.7f}")
    return float(image_cos.min()), float(text_cos.min())


@pytest.mark.parametrize("precision,least", [("fp32", 0.99999), ("bf16", 0.999)])
def test_vit_b32_served_equals_open_clip(precision: str, least: float, vit_b32: Path,
                                         images: list[bytes], logs_dir: Path) -> None:
    ref = reference(vit_b32)
    for service in _encoder(f"open_clip:ViT-B-32/{vit_b32}", logs_dir,
                            f"open-clip-b32-{precision}", "--precision", precision):
        check_served(service, ref, images, least)
        info = model_info(service.address)
        assert (info.family, info.dimension, info.context_length) == ("open_clip", 512, 77)
        assert (info.tokenizer, info.architecture, info.precision) == (
            "clip-bpe", "ViT-B-32", precision)
        assert (info.preprocess.height, info.preprocess.width) == (224, 224)
        assert info.preprocess.resize_mode == "shortest" and info.preprocess.center_crop
        np.testing.assert_allclose(info.preprocess.mean, OPENAI_MEAN, rtol=1e-6)
        assert "text forward: trimmed" in service.log()  # causal, pooled at end-of-text


def test_siglip_by_tag_from_weights_dir(siglip: Path, images: list[bytes], logs_dir: Path,
                                        tmp_path: Path) -> None:
    """`open_clip:ViT-B-16-SigLIP/webli` found in WEIGHTS_DIR/open_clip/ARCH/TAG/ (a copy
    of the hub repo); the tag's preprocessing (squash, mean/std 0.5) and the folder's
    Hugging Face tokenizer are used."""
    folder = tmp_path / "weights" / "open_clip" / "ViT-B-16-SigLIP"
    folder.mkdir(parents=True)
    (folder / "webli").symlink_to(siglip, target_is_directory=True)
    ref = reference(siglip)
    for service in _encoder("open_clip:ViT-B-16-SigLIP/webli", logs_dir, "open-clip-siglip",
                            "--precision", "fp32", "--weights-dir", str(tmp_path / "weights")):
        check_served(service, ref, images, 0.99999)
        info = model_info(service.address)
        assert (info.dimension, info.context_length, info.architecture) == (
            768, 64, "ViT-B-16-SigLIP/webli")
        assert info.tokenizer == "hf:timm/ViT-B-16-SigLIP"
        assert (info.preprocess.resize_mode, info.preprocess.center_crop) == ("squash", False)
        assert list(info.preprocess.mean) == [0.5, 0.5, 0.5]
        assert "text forward: full" in service.log()  # not causal: no trimming


def test_xlm_roberta_multilingual_tower(xlmr: Path, images: list[bytes],
                                        logs_dir: Path) -> None:
    ref = reference(xlmr)
    for service in _encoder(f"open_clip:xlm-roberta-base-ViT-B-32/{xlmr}", logs_dir,
                            "open-clip-xlmr", "--precision", "fp32"):
        check_served(service, ref, images, 0.99999)
        info = model_info(service.address)
        assert (info.dimension, info.context_length) == (512, 77)
        assert info.tokenizer == "hf:xlm-roberta-base"


@pytest.mark.parametrize("arch", ["ViT-B-16-SigLIP", "xlm-roberta-base-ViT-B-32"])
def test_bf16_hf_towers_match_fp32_reference(arch: str, images: list[bytes]) -> None:
    """bf16 (autocast over fp32 weights) for the Hugging Face towers, in process."""
    folder = cached_random_open_clip(arch)
    ref = reference(folder)
    model = load_model(f"open_clip:{arch}/{folder}", device="cpu", precision="bf16",
                       download=False)
    stages = PreprocessStages.split(model.preprocess)
    pixels = [stages.pixels(Image.open(io.BytesIO(d))) for d in images]
    image_cos = cosines(model.encode_images(stages.batch(pixels)), ref.images(images))
    tokens = torch.stack([model.tokenizer.tokenize(t)[0] for t in TEXTS])
    text_cos = cosines(model.encode_tokens(tokens), ref.texts(TEXTS))
    print(f"{arch} bf16: least cosine images {image_cos.min():.5f} texts {text_cos.min():.5f}")
    assert image_cos.min() >= 0.999 and text_cos.min() >= 0.999


def test_fp16_layout_keeps_layernorms_fp32(vit_b32: Path, xlmr: Path) -> None:
    """open_clip's own fp16 layout (create_model(precision="fp16"): LayerNormFp32 modules),
    run on the CPU; a Hugging Face text tower, which that layout cannot run on CUDA, runs
    under fp16 autocast over fp32 weights instead (both checked on an H200:
    results/open-clip-gpu.md)."""
    model = load_model(f"open_clip:ViT-B-32/{vit_b32}", device="cpu", precision="fp16",
                       allow_fp16_on_cpu=True, download=False)
    assert model.model.visual.conv1.weight.dtype == torch.float16
    assert type(model.model.ln_final).__name__ == "LayerNormFp32"
    assert model.model.ln_final.weight.dtype == torch.float32
    assert (model.traits.input_dtype, model.traits.autocast) == (torch.float16, "")
    ref = reference(vit_b32)
    tokens = torch.stack([model.tokenizer.tokenize(t)[0] for t in TEXTS])
    assert cosines(model.encode_tokens(tokens), ref.texts(TEXTS)).min() >= 0.999
    fp32 = load_model(f"open_clip:ViT-B-32/{vit_b32}", device="cpu", precision="fp32",
                      download=False)
    assert fp32.fingerprint == model.fingerprint  # the weights', whatever the precision
    hf = load_model(f"open_clip:xlm-roberta-base-ViT-B-32/{xlmr}", device="cpu",
                    precision="fp16", allow_fp16_on_cpu=True, download=False)
    assert (hf.traits.input_dtype, hf.traits.autocast) == (torch.float32, "fp16")


def serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clipsearch.cli", "serve", "encoder", "--device", "cpu",
         "--port", str(free_port()), *args], capture_output=True, text=True, timeout=120,
        cwd=ROOT)


def test_missing_weights_is_one_clear_error(tmp_path: Path) -> None:
    result = serve_fails("--model", "open_clip:ViT-B-32/laion2b_s34b_b79k", "--weights-dir",
                         str(tmp_path), "--no-download")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "open_clip" / "ViT-B-32" / "laion2b_s34b_b79k") in result.stderr
    assert "Hugging Face cache" in result.stderr and "downloads are off" in result.stderr
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in result.stderr


@pytest.mark.parametrize("name,message", [
    ("open_clip:ViT-Q-99/laion2b", "is not an open_clip architecture"),
    ("open_clip:ViT-B-32", "say which weights"),
    ("open_clip:ViT-B-32/no_such_tag", "neither a pretrained tag"),
])
def test_bad_names_are_clear(name: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(name, weights_dir=str(tmp_path), download=False, device="cpu")


def test_damaged_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not a checkpoint")
    result = serve_fails("--model", f"open_clip:ViT-B-32/{junk}", "--no-download")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot load {junk} into ViT-B-32" in result.stderr
