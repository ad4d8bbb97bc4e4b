"""Model loading and health: NOT_SERVING until loaded, clear startup errors, graceful stop."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from client import EncoderClient, Unavailable
from encoder_service.model import ModelLoadError, load_model
from tests.servers import free_port, health_status, start_service


def test_health_goes_not_serving_then_serving_then_stops_cleanly(random_vit_b32: Path,
                                                                 tmp_path: Path) -> None:
    service = start_service(["serve", "encoder", "--model", str(random_vit_b32),
                             "--precision", "fp32"], tmp_path / "encoder.log", wait=False)
    try:
        seen: list[str] = []
        unavailable_while_loading = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not seen or seen[-1] != "SERVING"):
            status = health_status(service.address, timeout_s=0.5)
            if status == "NOT_SERVING" and not unavailable_while_loading:
                with pytest.raises(Unavailable, match="still loading"), \
                        EncoderClient(service.address, timeout_s=5) as client:
                    client.model_info()
                unavailable_while_loading = True
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.05)
        assert seen[-2:] == ["NOT_SERVING", "SERVING"], seen
        with EncoderClient(service.address) as client:
            assert client.encode_texts(["a dog"]).shape == (1, 512)
    finally:
        code = service.stop(signal.SIGTERM)
    assert code == 0
    assert "stopping: health NOT_SERVING" in service.log()


def test_missing_weights_is_a_clear_startup_error(tmp_path: Path) -> None:
    empty = tmp_path / "weights"
    empty.mkdir()
    service = start_service(["serve", "encoder", "--model", "ViT-B/32", "--weights-dir",
                             str(empty), "--no-download"], tmp_path / "encoder.log", wait=False)
    assert service.process.wait(120) == 2
    log = service.log()
    assert f"CLIP weights for ViT-B/32 not found at {empty}/ViT-B-32.pt" in log
    assert "--weights-dir" in log and "--model /path/to/model.pt" in log


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model(str(junk))
    with pytest.raises(ModelLoadError, match="neither a model name"):
        load_model(str(tmp_path / "absent.pt"))
    with pytest.raises(ModelLoadError, match="fp16 needs CUDA"):
        load_model(str(junk), device="cpu", precision="fp16")


def test_named_model_jit_archive_and_state_dict_load_alike(tiny_clip: Path,
                                                           tmp_path: Path) -> None:
    """A named model from --weights-dir, an OpenAI-style JIT archive and a plain state dict."""
    from_state_dict = load_model(str(tiny_clip), device="cpu", precision="fp32")
    traced = torch.jit.trace_module(from_state_dict.model, {"encode_text": (
        torch.zeros(1, 77, dtype=torch.long),)})
    jit_path = tmp_path / "tiny-jit.pt"
    torch.jit.save(traced, str(jit_path))
    from_jit = load_model(str(jit_path), device="cpu", precision="fp32")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "ViT-B-32.pt").symlink_to(tiny_clip)
    named = load_model("ViT-B/32", weights_dir=str(weights), download=False, device="cpu",
                       precision="fp32")
    tokens = torch.randint(1, 49000, (3, 77))
    tokens[:, 10] = 49407
    pixels = torch.randn(2, 3, from_jit.image_resolution, from_jit.image_resolution)
    for other in (from_jit, named):
        assert other.fingerprint == from_state_dict.fingerprint
        np.testing.assert_allclose(other.encode_tokens(tokens),
                                   from_state_dict.encode_tokens(tokens), atol=1e-6)
        np.testing.assert_allclose(other.encode_images(pixels),
                                   from_state_dict.encode_images(pixels), atol=1e-6)


def test_port_in_use_is_reported(random_vit_b32: Path, tmp_path: Path) -> None:
    port = free_port()
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        service = start_service(["serve", "encoder", "--model", str(random_vit_b32)],
                                tmp_path / "encoder.log", port=port, wait=False)
        assert service.process.wait(60) != 0
    assert "cannot listen on 127.0.0.1:" in service.log() or "Failed to bind" in service.log()
