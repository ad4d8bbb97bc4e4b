"""The int8 benchmark's CPU path runs end to end (quick, on the tiny CLIP), so it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import int8


def test_int8_benchmark_quick_on_the_tiny_clip(tiny_clip: Path, tmp_path: Path) -> None:
    assert int8.main(["--quick", "--models", "tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "int8.json").read_text())
    [model] = results["models"]
    rows = {row["variant"]: row for row in model["rows"]}
    assert set(rows) == set(int8.variants()) >= {"fp32", "bf16", "int8-dynamic"}
    assert rows["fp32"]["recall_at_10"] == 1.0  # the reference against itself
    assert rows["fp32"]["int8_linear_layers"] == 0
    # The MLP layers became int8; attention's projections cannot (see the module's notes).
    assert rows["int8-dynamic"]["int8_linear_layers"] > 0
    assert rows["int8-dynamic"]["float_linear_layers"] > 0
    for onnx_variant in set(rows) & set(int8.ONNX_VARIANTS):  # every MatMul, attention's too
        assert rows[onnx_variant]["int8_linear_layers"] > rows["int8-dynamic"][
            "int8_linear_layers"]
    for variant in set(rows) - {"fp32"}:
        assert 0.9 < rows[variant]["image_cosine_min"] <= 1.0 + 1e-5
        assert 0.9 < rows[variant]["text_cosine_min"] <= 1.0 + 1e-5
        assert 0.0 <= rows[variant]["recall_at_10"] <= 1.0
        assert rows[variant]["images_per_s"] > 0 and rows[variant]["texts_per_s"] > 0
    assert rows["bf16"]["images_x_bf16"] == 1.0
    verdict = results["verdict"]
    assert verdict["ships"] is False  # no ViT-B/32 speed measured: no basis to ship
    assert set(verdict["variants"]) == {v for v in rows if v.startswith("int8")}
    text = (tmp_path / "int8.md").read_text()
    assert "does not ship" in text and "| tiny | int8-dynamic |" in text
