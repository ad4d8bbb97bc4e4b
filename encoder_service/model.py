"""Loads a CLIP model and runs batches through it, giving the reference vectors.

Reference (the seed): `model.encode_image(preprocess(img))` and
`model.encode_text(clip.tokenize(t))`, each divided by its L2 norm.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources, which warns on import
    import clip
    from clip.model import CLIP, build_model

log = logging.getLogger("clipsearch.encoder.model")

PRECISIONS = ("fp32", "bf16", "fp16")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says how to provide the weights."""


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {choice}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {choice}: expected auto, cpu, cuda or cuda:N")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16
    autocast is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if choice not in PRECISIONS:
        raise ModelLoadError(f"--precision {choice}: expected auto, fp32, bf16 or fp16")
    if choice == "fp16" and device.type != "cuda":
        raise ModelLoadError("--precision fp16 needs CUDA; on a CPU use bf16 or fp32")
    return choice


def _named_weights_path(name: str, weights_dir: Path) -> Path:
    return weights_dir / os.path.basename(clip.clip._MODELS[name])


def read_state_dict(name_or_path: str, weights_dir: str, download: bool) -> dict[str, torch.Tensor]:
    """The state dict of a named model (from `weights_dir`, downloaded if allowed) or of a
    local checkpoint: an OpenAI JIT archive or a plain state dict. clip.load cannot read
    a plain state dict with jit=False (openai/CLIP#396), so both are read here."""
    folder = Path(weights_dir).expanduser()
    if name_or_path in clip.available_models():
        path = _named_weights_path(name_or_path, folder)
        if not path.is_file():
            if not download:
                raise ModelLoadError(_missing_weights(name_or_path, path, "downloads are off"))
            try:
                path = Path(clip.clip._download(clip.clip._MODELS[name_or_path], str(folder)))
            except (OSError, urllib.error.URLError, RuntimeError) as exc:
                raise ModelLoadError(_missing_weights(name_or_path, path, str(exc))) from exc
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(
                f"model {name_or_path!r} is neither a model name "
                f"({', '.join(clip.available_models())}) nor a checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not gone
            return torch.jit.load(str(path), map_location="cpu").state_dict()  # type: ignore[no-any-return]
    except RuntimeError:
        pass  # not a JIT archive: a plain state dict
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file can raise almost anything
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or "positional_embedding" not in loaded:
        raise ModelLoadError(f"{path} is not a CLIP checkpoint (no CLIP state dict inside)")
    return loaded


def _missing_weights(name: str, path: Path, reason: str) -> str:
    return (f"CLIP weights for {name} not found at {path} and not downloadable ({reason}). "
            f"Provide them by copying the OpenAI checkpoint {os.path.basename(path)} into "
            f"{path.parent} (or set --weights-dir / CLIPSEARCH_ENCODER_WEIGHTS_DIR to the folder "
            f"holding it), or pass a checkpoint file with --model /path/to/model.pt. "
            f"For tests without weights: `clipsearch model random-vit-b32 --out FILE`.")


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """16 hex digits of sha256 over the weights' values, in fp32 so that the same weights
    stored in fp16 (released checkpoints) or fp32 (a re-saved copy) match."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        digest.update(key.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A CLIP model ready to encode batches on its device in its precision."""

    model: CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    name: str
    device: torch.device
    precision: str
    fingerprint: str

    @property
    def dimension(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def image_resolution(self) -> int:
        return int(self.model.visual.input_resolution)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, 3, r, r) preprocessed pixels -> (n, dim) unit float32 vectors."""
        with self._autocast():
            features = self.model.encode_image(pixels.to(self.device, self.model.dtype))
        return _normalised(features)

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """(n, context) token ids -> (n, dim) unit float32 vectors."""
        with self._autocast():
            features = encode_text_trimmed(self.model, tokens.to(self.device))
        return _normalised(features)


def keep_matmul_weights_in(model: CLIP, dtype: torch.dtype) -> None:
    """Stores the weights that autocast would cast to `dtype` on every call (linear and
    attention projections) in `dtype` once. The results are bit-identical to autocast
    over fp32 weights, without re-reading and converting the fp32 weights on every call
    (ViT-B/32's text tower alone is ~150 MB of fp32; batch 1 is memory-bound):
    batch-1 text 8.8 -> 5.4 ms, images at batch 32 73 -> 79/s on this 2-core CPU. Conv1,
    embeddings and LayerNorms stay fp32, so `model.dtype` and the residual streams do too."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.MultiheadAttention):
                for name in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
                    param = getattr(module, name, None)
                    if isinstance(param, torch.nn.Parameter):
                        param.data = param.data.to(dtype)
        for param in (model.text_projection, model.visual.proj):
            param.data = param.data.to(dtype)


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True)
    return features.cpu().numpy()


def encode_text_trimmed(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text over only the first L positions, L = the last end-of-text
    position in the batch + 1. The text tower is causal (position i attends to <= i)
    and pools at end-of-text, so the dropped padding cannot change any output: the
    result equals model.encode_text(tokens) while costing L/77 of it."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens).type(model.dtype)
    x = x + model.positional_embedding[:length].type(model.dtype)
    x = x.permute(1, 0, 2)  # NLD -> LND, as CLIP's transformer expects
    mask = model.build_attention_mask()[:length, :length].to(x.device, x.dtype)
    for block in model.transformer.resblocks:
        x = x + block.attn(*[block.ln_1(x)] * 3, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2)).type(model.dtype)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def load_model(name_or_path: str, *, weights_dir: str = "~/.cache/clip", download: bool = True,
               device: str = "auto", precision: str = "auto") -> LoadedModel:
    """Loads weights, builds the CLIP model and places it on the chosen device/precision."""
    torch_device = resolve_device(device)
    chosen = resolve_precision(precision, torch_device)
    state_dict = read_state_dict(name_or_path, weights_dir, download)
    weights_fingerprint = fingerprint(state_dict)
    try:
        model = build_model(state_dict)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{name_or_path}: not a loadable CLIP state dict: {exc}") from exc
    model = model.to(torch_device)
    # fp16 keeps the released half-precision weights (as clip.load does on CUDA);
    # fp32 and bf16 autocast start from fp32 weights (as clip.load does on the CPU).
    model = model.half() if chosen == "fp16" else model.float()
    if chosen == "bf16":
        keep_matmul_weights_in(model, torch.bfloat16)
    preprocess = clip.clip._transform(model.visual.input_resolution)
    return LoadedModel(model=model.eval(), preprocess=preprocess, name=name_or_path,
                       device=torch_device, precision=chosen, fingerprint=weights_fingerprint)

