"""Loads a CLIP model and runs batches through it, giving the reference vectors.

Reference (the seed): `model.encode_image(preprocess(img))` and
`model.encode_text(clip.tokenize(t))`, each divided by its L2 norm. OpenCLIP models
(`open_clip:ARCH/TAG`) are built by encoder_service/families/open_clip.py against
open_clip's own reference path; what differs between families is in `LoadedModel.traits`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoder_service import weights
from encoder_service.device import resolve_device, resolve_precision, use_exact_fp32
from encoder_service.errors import ModelLoadError
from encoder_service.families import open_clip as open_clip_family
from encoder_service.families.base import TextTokenizer, Traits
from encoder_service.families.openai import encode_text_trimmed, openai_traits

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources, which warns on import
    import clip
    from clip.model import CLIP, build_model

log = logging.getLogger("clipsearch.encoder.model")

__all__ = ["CLIP", "LoadedModel", "ModelLoadError", "build_model", "clip",
           "encode_text_trimmed", "load_model"]

def _named_weights_path(name: str, weights_dir: Path) -> Path:
    return weights_dir / os.path.basename(clip.clip._MODELS[name])


def read_state_dict(name_or_path: str, weights_dir: str, download: bool, mirror: str = "",
                    timeout_s: float = weights.DEFAULT_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """The state dict of a named model (from `weights_dir`, downloaded if allowed, from
    `mirror` when given) or of a local checkpoint: an OpenAI JIT archive or a plain state
    dict. clip.load cannot read a plain state dict with jit=False (openai/CLIP#396), so
    both are read here."""
    folder = Path(weights_dir).expanduser()
    if name_or_path in clip.available_models():
        path = _named_weights_path(name_or_path, folder)
        try:  # checked against the SHA-256 in OpenAI's URL; (re)downloaded if allowed
            path = weights.ensure_weights(clip.clip._MODELS[name_or_path], folder,
                                          download=download, mirror=mirror,
                                          timeout_s=timeout_s)
        except weights.WeightsError as exc:
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
    """A CLIP model (any family) ready to encode batches on its device in its precision.

    On CUDA each tower has its own stream (texts at the higher priority), so a text batch
    is never queued behind an image batch on the GPU, and the only host synchronisation
    is the final copy of the vectors, which waits for that stream alone."""

    model: Any  # clip's CLIP, or an open_clip CLIP / CustomTextCLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    name: str
    device: torch.device
    precision: str
    fingerprint: str
    traits: Traits
    device_note: str = ""  # why `auto` settled for the CPU, when it did
    _streams: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            # Lower numbers are higher priorities: a text search overtakes queued image work.
            self._streams = {"text": torch.cuda.Stream(self.device, priority=-1),
                             "image": torch.cuda.Stream(self.device, priority=0)}
            torch.cuda.synchronize(self.device)  # weights copied on the default stream

    @property
    def dimension(self) -> int:
        return self.traits.dimension

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.traits.tokenizer

    @property
    def context_length(self) -> int:
        return self.traits.tokenizer.context_length

    @property
    def image_resolution(self) -> int:
        """The image tower's input side (the larger one, for a non-square input)."""
        return max(self.traits.image.height, self.traits.image.width)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        kind = self.traits.autocast or ("bf16" if self.precision == "bf16" else "")
        if kind:
            dtype = torch.bfloat16 if kind == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def on_stream(self, tower: str) -> contextlib.AbstractContextManager[Any]:
        """Runs what follows on `tower`'s CUDA stream (nothing to do on a CPU)."""
        stream = self._streams.get(tower)
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, 3, r, r) preprocessed pixels -> (n, dim) unit float32 vectors."""
        with self.on_stream("image"), self._autocast():
            features = self.model.encode_image(pixels.to(self.device, self.traits.input_dtype,
                                                         non_blocking=True))
            return _normalised(features)

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """(n, context) token ids (on the CPU) -> (n, dim) unit float32 vectors."""
        with self.on_stream("text"), self._autocast():
            features = self.traits.encode_text(tokens)
            return _normalised(features)


def keep_matmul_weights_in(model: CLIP, dtype: torch.dtype) -> None:
    """Stores the weights that autocast would cast to `dtype` on every call (linear and
    attention projections) in `dtype` once. The results are bit-identical to autocast
    over fp32 weights, without re-reading and converting the fp32 weights on every call
    (ViT-B/32's text tower alone is ~150 MB of fp32; batch 1 is memory-bound):
    batch-1 text 8.8 -> 5.4 ms, images at batch 32 73 -> 79/s on this 2-core CPU. Conv1,
    embeddings and LayerNorms stay fp32, so `model.dtype` and the residual streams do too."""
    keep_linear_weights_in(model, dtype)
    with torch.no_grad():
        for param in (model.text_projection, model.visual.proj):
            param.data = param.data.to(dtype)


def keep_linear_weights_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Stores the weights and biases of `module`'s linear layers and attention projections
    in `dtype` (what autocast casts them to on every call)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.MultiheadAttention):
                for name in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
                    param = getattr(layer, name, None)
                    if isinstance(param, torch.nn.Parameter):
                        param.data = param.data.to(dtype)


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True)
    return features.cpu().numpy()


def load_model(name_or_path: str, *, weights_dir: str = "~/.cache/clip", download: bool = True,
               device: str = "auto", precision: str = "auto",
               allow_fp16_on_cpu: bool = False, weights_mirror: str = "",
               download_timeout_s: float = weights.DEFAULT_TIMEOUT_S) -> LoadedModel:
    """Loads weights, builds the CLIP model and places it on the chosen device/precision.

    `name_or_path`: an OpenAI name (`ViT-B/32`) or checkpoint, or `open_clip:ARCH/TAG`
    (or `open_clip:ARCH/PATH`). `allow_fp16_on_cpu` builds the CUDA fp16 layout on the
    CPU: for tests, since the development and CI machines have no GPU. `weights_mirror`
    and `download_timeout_s` apply to OpenAI's named weights (encoder_service/weights.py)."""
    choice = resolve_device(device)
    chosen = resolve_precision(precision, choice.device, allow_fp16_on_cpu=allow_fp16_on_cpu)
    use_exact_fp32(chosen)
    if open_clip_family.is_open_clip_name(name_or_path):
        return _load_open_clip(name_or_path, weights_dir, download, choice.device, chosen,
                               choice.note)
    state_dict = read_state_dict(name_or_path, weights_dir, download, weights_mirror,
                                 download_timeout_s)
    weights_fingerprint = fingerprint(state_dict)
    try:
        # build_model gives clip.load's CUDA layout: fp16 matmul and conv weights, fp32
        # LayerNorms and embeddings (CLIP's LayerNorm computes in fp32, so fp16 LayerNorm
        # weights would fail its first forward pass: no model.half()).
        model = build_model(state_dict)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{name_or_path}: not a loadable CLIP state dict: {exc}") from exc
    # fp32 and bf16 autocast start from fp32 weights (as clip.load does on the CPU).
    if chosen != "fp16":
        model = model.float()
    if chosen == "bf16":
        keep_matmul_weights_in(model, torch.bfloat16)
    try:
        model = model.to(choice.device)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{name_or_path} does not fit on {choice.device}: {exc}") from exc
    preprocess = clip.clip._transform(model.visual.input_resolution)
    return LoadedModel(model=model.eval(), preprocess=preprocess, name=name_or_path,
                       device=choice.device, precision=chosen, fingerprint=weights_fingerprint,
                       traits=openai_traits(model, name_or_path), device_note=choice.note)


def _load_open_clip(name: str, weights_dir: str, download: bool, device: torch.device,
                    precision: str, device_note: str) -> LoadedModel:
    """An OpenCLIP model in open_clip's own layout for `precision` (bf16: autocast over
    fp32 weights; open_clip reads its text tower's cast dtype from the weights, so they
    stay fp32 for its residual stream to stay fp32)."""
    model, preprocess, source, model_cfg, tokenizer = open_clip_family.build(
        name, weights_dir, download, precision)
    weights_fingerprint = fingerprint(open_clip_family.checkpoint_state_dict(source))
    if precision == "bf16":
        # Measured on this 2-core CPU, random ViT-B-16 at batch 4: bf16 autocast over fp32
        # weights 0.53 images/s (each linear re-cast its weights and ran as a batched
        # matmul over copies), 10.5 with the image tower's linear weights kept in bf16;
        # fp32 5.1. Only the image tower: open_clip takes its text tower's cast dtype, and
        # so its residual stream's, from those weights.
        keep_linear_weights_in(model.visual, torch.bfloat16)
    try:
        model = model.to(device)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{name} does not fit on {device}: {exc}") from exc
    traits = open_clip_family.traits(model, source, model_cfg, tokenizer, precision)
    log.info("%s: %s from %s (text forward: %s)", name, type(model).__name__,
             source.checkpoint, traits.text_path)
    return LoadedModel(model=model, preprocess=preprocess, name=name, device=device,
                       precision=precision, fingerprint=weights_fingerprint, traits=traits,
                       device_note=device_note)
