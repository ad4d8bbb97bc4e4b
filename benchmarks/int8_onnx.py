"""The ONNX Runtime int8 variants of benchmarks/int8.py: both towers exported from the fp32
model (TorchScript exporter, dynamic batch), then quantised by ONNX Runtime over every
MatMul, attention included: dynamically (`quantize_dynamic`: int8 weights, activations
quantised per call), or statically (`quantize_static`: activation ranges calibrated once on
sample inputs, then QLinearMatMul/QLinearConv kernels, uint8 activations x int8 weights per
channel, the layout ONNX Runtime recommends on x86). Optional: `onnxruntime` and `onnx` come
with the `bench` extra; without them the variants are left out."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder_service.model import LoadedModel

__all__ = ["Calibration", "OnnxInt8Model", "available"]

# Model inputs to calibrate a static quantisation on: (images (n, 3, r, r) float32 as the
# image tower takes them, tokens (n, context) int64).
Calibration = tuple[np.ndarray, np.ndarray]
# The int8 kernels the two quantisations produce (dynamic: *Integer; static: QLinear*).
INT8_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
CALIBRATION_BATCH = 8


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


def _reader(inputs: np.ndarray) -> Any:
    """A CalibrationDataReader over `inputs` in batches, fed as the tower's input `x`."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"x": inputs[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(inputs), CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)
    return Reader()


def _quantise(plain: Path, quantised: Path, name: str,
              calibration: dict[str, np.ndarray] | None) -> None:
    """Dynamic int8 without `calibration`; static (QOperator) calibrated on its inputs."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration is None:
        quantize_dynamic(str(plain), str(quantised), weight_type=QuantType.QInt8)
        return
    prepared = plain.with_suffix(".prepared.onnx")
    # Graph optimisation before calibration, as ONNX Runtime's docs advise; its symbolic
    # shape inference fails on clip's reshapes (a non-literal rank), ONNX's own does not.
    quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
    # QOperator, not QDQ: 52 against 42 images/s for the ViT-B/32 image tower at batch 32,
    # measured side by side on 2 cores (the same cosines to fp32).
    quantize_static(str(prepared), str(quantised), _reader(calibration[name]),
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Conv"])


class OnnxInt8Model:
    """Both towers of an fp32 LoadedModel as int8 ONNX Runtime sessions, with the
    encode_images / encode_tokens interface of LoadedModel: dynamic int8, or static int8
    calibrated on `calibration`."""

    def __init__(self, fp32: LoadedModel, workdir: Path, threads: int | None = None,
                 calibration: Calibration | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self.preprocess = fp32.preprocess
        side = fp32.image_resolution
        towers = {"image": (fp32.model.visual, torch.zeros(2, 3, side, side)),
                  "text": (_TextTower(fp32.model),
                           torch.zeros(2, fp32.context_length, dtype=torch.long))}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.sessions: dict[str, Any] = {}
        self.int8_matmuls = 0
        inputs = None if calibration is None else dict(zip(towers, calibration, strict=True))
        kind = "dynamic" if calibration is None else "static"
        for name, (module, example) in towers.items():
            plain = workdir / f"{name}-{kind}.onnx"
            quantised = workdir / f"{name}-{kind}.int8.onnx"
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(plain), input_names=["x"],
                                  output_names=["y"], opset_version=17, dynamo=False,
                                  dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _quantise(plain, quantised, name, inputs)
            self.int8_matmuls += sum(node.op_type in INT8_OPS
                                     for node in onnx.load(str(quantised)).graph.node)
            self.sessions[name] = ort.InferenceSession(str(quantised), options,
                                                       providers=["CPUExecutionProvider"])

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        [features] = self.sessions["image"].run(None, {"x": pixels.numpy()})
        return _normalised(features)

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        [features] = self.sessions["text"].run(None, {"x": tokens.to(torch.int64).numpy()})
        return _normalised(features)
