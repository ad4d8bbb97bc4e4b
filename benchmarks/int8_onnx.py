"""The ONNX Runtime int8 variant of benchmarks/int8.py: both towers exported from the fp32
model (TorchScript exporter, dynamic batch), then `onnxruntime.quantization.quantize_dynamic`
(int8 weights, activations quantised per call) over every MatMul, attention included.
Optional: `onnxruntime` and `onnx` come with the `bench` extra; without them the variant
is left out."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder_service.model import LoadedModel

__all__ = ["OnnxInt8Model", "available"]


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


class _TextTower(torch.nn.Module):
    """clip's encode_text as a module (the whole context; pooled at end-of-text)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)  # type: ignore[no-any-return]


def _normalised(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


class OnnxInt8Model:
    """Both towers of an fp32 LoadedModel as int8 ONNX Runtime sessions, with the
    encode_images / encode_tokens interface of LoadedModel."""

    def __init__(self, fp32: LoadedModel, workdir: Path, threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        self.preprocess = fp32.preprocess
        side = fp32.image_resolution
        towers = {"image": (fp32.model.visual, torch.zeros(2, 3, side, side)),
                  "text": (_TextTower(fp32.model),
                           torch.zeros(2, fp32.context_length, dtype=torch.long))}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.sessions: dict[str, Any] = {}
        self.int8_matmuls = 0
        for name, (module, example) in towers.items():
            plain, quantised = workdir / f"{name}.onnx", workdir / f"{name}.int8.onnx"
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(plain), input_names=["x"],
                                  output_names=["y"], opset_version=17, dynamo=False,
                                  dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
            quantize_dynamic(str(plain), str(quantised), weight_type=QuantType.QInt8)
            self.int8_matmuls += sum(node.op_type == "MatMulInteger"
                                     for node in onnx.load(str(quantised)).graph.node)
            self.sessions[name] = ort.InferenceSession(str(quantised), options,
                                                       providers=["CPUExecutionProvider"])

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        [features] = self.sessions["image"].run(None, {"x": pixels.numpy()})
        return _normalised(features)

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        [features] = self.sessions["text"].run(None, {"x": tokens.to(torch.int64).numpy()})
        return _normalised(features)
