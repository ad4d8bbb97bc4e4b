"""The encoder's device path: the fp16 layout that CUDA runs (run here on the CPU), device
and precision choices, out-of-memory and sticky device errors (injected), TF32 off for
fp32. The tests marked `cuda` need a GPU and are skipped (and reported so) without one."""

from __future__ import annotations

import concurrent.futures
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from client import EncoderClient
from client.errors import ResourceExhausted, Unavailable
from clipsearch.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from encoder_service.device import PARITY_MIN_COSINE, resolve_device
from encoder_service.failures import (
    DeviceOutOfMemory,
    encode_splitting_on_oom,
    is_sticky_device_error,
)
from encoder_service.images import PreprocessStages
from encoder_service.model import LoadedModel, ModelLoadError, build_model, clip, load_model
from tests.conftest import Reference
from tests.servers import RunningService, free_port, health_status
from tests.vectors import cosines

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a dog", "a white dog running on the beach at night",
         " ".join(["photo"] * 90)]  # truncated: end-of-text at the last position
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def encode_photos(model_pixels: PreprocessStages, photos: list[Path]) -> list[np.ndarray]:
    return [model_pixels.pixels(Image.open(p)) for p in photos]


@pytest.fixture(scope="module")
def fp16_on_cpu(random_vit_b32: Path) -> LoadedModel:
    return load_model(str(random_vit_b32), device="cpu", precision="fp16",
                      allow_fp16_on_cpu=True)


def test_fp16_keeps_clips_cuda_layout(fp16_on_cpu: LoadedModel) -> None:
    """Matmul and conv weights fp16, LayerNorms and embeddings fp32, as clip.load on CUDA."""
    model = fp16_on_cpu.model
    assert model.visual.conv1.weight.dtype == torch.float16
    assert model.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float16
    assert model.text_projection.dtype == torch.float16
    assert model.ln_final.weight.dtype == torch.float32
    assert model.visual.ln_pre.weight.dtype == torch.float32
    assert model.token_embedding.weight.dtype == torch.float32


def test_fp16_model_matches_fp32_on_both_towers(fp16_on_cpu: LoadedModel,
                                                reference_model: Reference,
                                                photos: list[Path]) -> None:
    """The model the service builds for CUDA, run on the CPU, against the seed's fp32."""
    stages = PreprocessStages.split(fp16_on_cpu.preprocess)
    chosen = photos[:16]
    served = fp16_on_cpu.encode_images(stages.batch(encode_photos(stages, chosen)))
    expected = np.stack([reference_model.image(p) for p in chosen])
    image_cos = cosines(served, expected)
    text_cos = cosines(fp16_on_cpu.encode_tokens(clip.tokenize(TEXTS, truncate=True)),
                       reference_model.texts(TEXTS))
    print(f"fp16 on the CPU: least cosine to fp32 {image_cos.min():.6f} (images), "
          f"{text_cos.min():.6f} (texts)")
    assert image_cos.min() >= PARITY_MIN_COSINE["fp16"]
    assert text_cos.min() >= PARITY_MIN_COSINE["fp16"]


def test_half_everything_is_the_layout_that_failed(random_vit_b32: Path) -> None:
    """What the encoder did before: model.half() also halves the LayerNorms, and CLIP's
    LayerNorm feeds them fp32 input, so the first forward pass fails."""
    model = build_model(torch.load(random_vit_b32, map_location="cpu")).half().eval()
    with pytest.raises(RuntimeError, match=r"(?i)dtype|Half|Float"), torch.inference_mode():
        model.encode_text(clip.tokenize(["a dog"]))


def test_fp16_needs_cuda_unless_a_test_asks(random_vit_b32: Path) -> None:
    with pytest.raises(ModelLoadError, match="fp16 needs CUDA"):
        load_model(str(random_vit_b32), device="cpu", precision="fp16")


def test_fp32_turns_tf32_off(tiny_clip: Path) -> None:
    load_model(str(tiny_clip), device="cpu", precision="fp32")
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"  # type: ignore[attr-defined]
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_device_without_cuda_is_one_clear_line(tiny_clip: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clipsearch.cli", "serve", "encoder", "--model", str(tiny_clip),
         "--device", "cuda:3", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert "--device cuda:3: no usable CUDA device" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ModelLoadError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_cuda_index_beyond_the_device_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine with two GPUs, as torch would report it (none to have here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ModelLoadError, match=r"has 2 CUDA device\(s\), numbered 0..1"):
        resolve_device("cuda:2")


def test_splitting_on_oom_fails_only_the_item_that_fails_alone() -> None:
    batches: list[int] = []

    def encode(items: list[int]) -> np.ndarray:
        batches.append(len(items))
        if len(items) > 3 or -1 in items:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return np.array([[float(i)] for i in items])

    rows = encode_splitting_on_oom(encode, [0, 1, 2, 3, -1, 5, 6, 7, 8, 9])
    failed = [i for i, row in enumerate(rows) if isinstance(row, DeviceOutOfMemory)]
    assert failed == [4]
    assert [float(r[0]) for r in rows if isinstance(r, np.ndarray)] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert batches[0] == 10 and max(batches[1:]) == 5  # halves, not items one by one


def test_sticky_errors_are_told_from_oom() -> None:
    assert is_sticky_device_error(RuntimeError("CUDA error: an illegal memory access was "
                                               "encountered"))
    assert is_sticky_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_sticky_device_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_sticky_device_error(ValueError("bad input"))


def faulty_encoder(model: Path, log_path: Path, env: dict[str, str], *extra: str,
                   wait: bool = True) -> RunningService:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.faulty_encoder", "serve", "encoder", "--model",
         str(model), "--device", "cpu", "--precision", "fp32", "--port", str(port), *extra],
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, **env})
    service = RunningService(process, f"127.0.0.1:{port}", port, log_path)
    if wait:
        try:
            service.wait_serving()
        except BaseException:
            service.stop()
            raise
    return service


@pytest.fixture
def oom_encoder(random_vit_b32: Path, tmp_path: Path) -> Iterator[RunningService]:
    service = faulty_encoder(random_vit_b32, tmp_path / "encoder.log",
                             {"CLIPSEARCH_TEST_OOM_ABOVE": "4"}, "--max-batch", "16")
    yield service
    service.stop()


def white_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(out, "JPEG")
    return out.getvalue()


def test_out_of_memory_spares_the_neighbours(oom_encoder: RunningService,
                                             reference_model: Reference,
                                             photos: list[Path]) -> None:
    """Room for 4 images: a call of 12 runs in halves and gets its exact vectors; a call
    whose image fails even alone gets RESOURCE_EXHAUSTED; the encoder keeps serving."""
    chosen = [p.read_bytes() for p in photos[:12]]
    with EncoderClient(oom_encoder.address) as client, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        big = pool.submit(client.encode_images, chosen)
        white = pool.submit(client.encode_images, [white_jpeg()])
        vectors = big.result()
        with pytest.raises(ResourceExhausted, match="out of device memory"):
            white.result()
        assert health_status(oom_encoder.address) == "SERVING"
        again = client.encode_images(chosen[:2])
    expected = np.stack([reference_model.image(b) for b in chosen])
    assert cosines(vectors, expected).min() >= PARITY_MIN_COSINE["fp32"]
    np.testing.assert_allclose(again, vectors[:2], atol=2e-5)
    assert oom_encoder.process.poll() is None


def test_max_batch_that_does_not_fit_fails_warm_up(random_vit_b32: Path,
                                                   tmp_path: Path) -> None:
    service = faulty_encoder(random_vit_b32, tmp_path / "encoder.log",
                             {"CLIPSEARCH_TEST_OOM_ABOVE": "4",
                              "CLIPSEARCH_TEST_OOM_IN_WARMUP": "1"},
                             "--max-batch", "16", wait=False)
    assert service.process.wait(120) == 2
    log = service.log()
    assert "--max-batch 16 does not fit in the memory of cpu (image tower" in log
    assert "Traceback" not in log


def test_sticky_device_error_ends_the_process(tiny_clip: Path, tmp_path: Path) -> None:
    """An illegal memory access poisons a CUDA context: the call gets UNAVAILABLE (which
    the search service retries on another replica), health turns NOT_SERVING and the
    process exits with 3 for its supervisor to restart it."""
    service = faulty_encoder(tiny_clip, tmp_path / "encoder.log", {})
    try:
        with EncoderClient(service.address) as client:
            assert client.encode_texts(["a red circle"]).shape[0] == 1
            with pytest.raises(Unavailable, match="illegal memory access"):
                client.encode_texts(["poison pill"])
        assert service.process.wait(30) == 3
        assert "exiting with 3" in service.log()
    finally:
        service.stop()


def test_auto_on_a_machine_without_gpu_says_so(tiny_clip: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    service = faulty_encoder(tiny_clip, tmp_path / "encoder.log", {}, "--device", "auto")
    try:
        with grpc.insecure_channel(service.address) as channel:
            info = encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(
                encoder_pb2.GetModelInfoRequest(), timeout=10)
        assert info.device == "cpu"
        assert "device auto: no usable CUDA device" in info.device_note
        assert "WARNING" in service.log() and "running on the CPU" in service.log()
        assert info.max_batch == 32  # the CPU's default batch
    finally:
        service.stop()


# --- on a GPU only -----------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_parity(precision: str, random_vit_b32: Path, reference_model: Reference,
                     photos: list[Path]) -> None:
    model = load_model(str(random_vit_b32), device="cuda", precision=precision)
    stages = PreprocessStages.split(model.preprocess)
    chosen = photos[:64]
    served = model.encode_images(stages.batch(encode_photos(stages, chosen), model.device))
    expected = np.stack([reference_model.image(p) for p in chosen])
    assert cosines(served, expected).min() >= PARITY_MIN_COSINE[precision]
    texts = cosines(model.encode_tokens(clip.tokenize(TEXTS, truncate=True)),
                    reference_model.texts(TEXTS))
    assert texts.min() >= PARITY_MIN_COSINE[precision]


@needs_cuda
def test_cuda_preprocessing_equals_the_cpu(random_vit_b32: Path, photos: list[Path]) -> None:
    model = load_model(str(random_vit_b32), device="cuda", precision="fp16")
    stages = PreprocessStages.split(model.preprocess)
    pixels = encode_photos(stages, photos[:8])
    torch.testing.assert_close(stages.batch(pixels, model.device).cpu(), stages.batch(pixels),
                               atol=1e-6, rtol=1e-6)


@needs_cuda
def test_cuda_batch_size_never_changes_a_vector(random_vit_b32: Path,
                                                photos: list[Path]) -> None:
    model = load_model(str(random_vit_b32), device="cuda", precision="fp16")
    stages = PreprocessStages.split(model.preprocess)
    pixels = encode_photos(stages, photos[:32])
    batched = model.encode_images(stages.batch(pixels, model.device))
    single = np.concatenate([model.encode_images(stages.batch([p], model.device))
                             for p in pixels])
    assert cosines(batched, single).min() >= 0.9995


@needs_cuda
def test_cuda_text_not_behind_an_image_batch(random_vit_b32: Path, photos: list[Path],
                                             tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "serve", "encoder", "--model",
         str(random_vit_b32), "--device", "cuda", "--port", str(port)],
        stdout=(tmp_path / "encoder.log").open("ab"), stderr=subprocess.STDOUT, cwd=ROOT)
    service = RunningService(process, f"127.0.0.1:{port}", port, tmp_path / "encoder.log")
    try:
        service.wait_serving()
        images = [p.read_bytes() for p in photos] * 2
        with EncoderClient(service.address) as client, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.encode_images, images[:256])
            time.sleep(0.2)
            started = time.perf_counter()
            client.encode_texts(["a white dog"])
            seconds = time.perf_counter() - started
            running.result()
        assert seconds < 0.1, f"a text took {seconds * 1000:.0f} ms behind an image batch"
    finally:
        service.stop()


@needs_cuda
def test_cuda_out_of_memory_is_resource_exhausted(random_vit_b32: Path,
                                                   tmp_path: Path) -> None:
    """A real OOM: fill the GPU from another process... is not repeatable; the injected
    faults above cover the logic, and here the same launcher runs on the GPU."""
    service = faulty_encoder(random_vit_b32, tmp_path / "encoder.log",
                             {"CLIPSEARCH_TEST_OOM_ABOVE": "4"}, "--max-batch", "16",
                             "--device", "cuda", "--precision", "fp16")
    try:
        with EncoderClient(service.address) as client:
            with pytest.raises(ResourceExhausted):
                client.encode_images([white_jpeg()])
            assert client.encode_texts(["a dog"]).shape == (1, 512)
    finally:
        service.stop()
