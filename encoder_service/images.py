"""Decoding untrusted image bytes into the model's input, safely and exactly as the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

# The torch-free checks live in the shared package (the search tier uses them too).
from clipsearch.image_check import ACCEPTED_FORMATS, ImageError, open_image, probe_image

CPU = torch.device("cpu")

__all__ = ["ACCEPTED_FORMATS", "ImageError", "PreprocessStages", "image_pixels", "open_image",
           "probe_image"]


@dataclass(frozen=True)
class PreprocessStages:
    """clip's preprocess split in two, bit-identical to running it whole. The PIL stage
    (resize, crop, RGB) runs on the decode threads; the tensor stage (ToTensor and
    Normalize, batched) runs on the model thread, the only thread that runs torch's
    parallel kernels: OpenMP teams on several threads throttle each other's spin-waits
    (measured here: a batch-1 text forward 5 -> 10 ms on the model thread)."""

    pil_stage: Callable[[Image.Image], Image.Image]
    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor
    on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)  # mean and std per CUDA device

    @classmethod
    def split(cls, preprocess: Any) -> PreprocessStages:
        transforms = list(preprocess.transforms)
        cut = next(i for i, t in enumerate(transforms) if isinstance(t, T.ToTensor))
        normalize = transforms[cut + 1]
        if not isinstance(normalize, T.Normalize) or len(transforms) != cut + 2:
            raise ValueError(f"unexpected preprocess pipeline: {transforms}")
        return cls(T.Compose(transforms[:cut]),
                   torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1),
                   torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(r, r, 3) uint8: the image resized, cropped and in RGB."""
        return np.asarray(self.pil_stage(image), dtype=np.uint8)

    def batch(self, pixels: Sequence[np.ndarray],
              device: torch.device = CPU) -> torch.Tensor:
        """(n, 3, r, r) float32 model input on `device`: ToTensor's /255, then Normalize's
        (x-m)/s. On CUDA the uint8 pixels (a quarter of the float bytes) are stacked into
        pinned memory and copied without blocking, and the same elementwise operations
        run on the GPU: on 2 CPU cores they took 23 ms for 32 images and 263 ms for 256,
        time the GPU would sit idle."""
        if device.type == "cuda":
            pinned = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8,
                                 pin_memory=True)
            np.stack(pixels, out=pinned.numpy())
            stacked = pinned.to(device, non_blocking=True)
        else:
            stacked = torch.from_numpy(np.stack(pixels))
        mean, std = self._constants(device)
        return stacked.permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on `device`, copied there once."""
        if device.type == "cpu":
            return self.mean, self.std
        key = str(device)
        if key not in self.on_device:
            self.on_device[key] = (self.mean.to(device), self.std.to(device))
        return self.on_device[key]


def image_pixels(data: bytes, stages: PreprocessStages, max_pixels: int) -> np.ndarray:
    """Decodes `data` and runs the PIL stage of clip's preprocess on it; with
    `stages.batch` this is `preprocess(Image.open(path))`, the reference input."""
    image = open_image(data, max_pixels)
    try:
        return stages.pixels(image)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot convert {image.format} {image.mode} image: {exc}") from exc
