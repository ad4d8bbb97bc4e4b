"""The GPU check's CPU path, so that it cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu(random_vit_b32: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads((tmp_path / "gpu.json").read_text())
    assert [row["precision"] for row in found["parity"]] == ["fp32", "fp16"]
    assert all(row["ok"] for row in found["parity"])
    assert found["chain"]["added"] == found["chain"]["images"] == 8
    settings = found["chain"]["ingest_by_setting"]  # each on a fresh collection
    assert [(r["index_batch"], r["index_pipeline"], r["added"]) for r in settings] == \
        [(32, 2, 8), (2, 4, 8)]
    assert all(r["cpu_ms_per_image"]["encoder"] > 0 and r["mean_ms"]["milvus_upsert"] > 0
               for r in settings)
    assert settings[1]["mean_ms"]["model_batch"] is not None
    assert [row["statuses"] for row in found["chain"]["search"]] == [{"OK": 4}, {"OK": 8}]
    assert all(row["images_per_s"] > 0 for row in found["throughput"])
    decode = found["decode"]  # torchvision's decoding (on the CPU here) against PIL's
    assert decode["torchvision_decodes_on"] == "cpu" and decode["images"] == 6
    assert decode["pixels_max_abs_difference"] <= 2  # both libjpeg-turbo + bicubic
    assert 0.9999 <= decode["vectors_least_cosine"] <= 1.0 + 1e-6
    assert "| fp16 |" in (tmp_path / "gpu.md").read_text()


def test_gpu_encoder_check_runs_on_the_cpu(random_vit_b32: Path, tmp_path: Path,
                                           photos: list[Path]) -> None:
    """The in-process GPU check (what ran on a lent GPU: results/gpu-encoder.md)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_encoder",
                             str(photos[0].parent), str(tmp_path), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads((tmp_path / "gpu-encoder.json").read_text())
    assert [row["precision"] for row in found["parity"]] == ["fp32", "fp16"]
    assert all(row["ok"] and row["gpu_preprocess_max_abs_diff"] == 0.0
               for row in found["parity"])  # on the CPU the same operations: bit-identical
    assert found["text_latency_fp16"]["during_images_p50_ms"] > 0
