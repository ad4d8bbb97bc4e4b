"""Decoding untrusted image bytes into the model's input, safely and exactly as the reference."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

# Only these decoders run on caller bytes: PIL can open many more (EPS would start
# Ghostscript), which has no place behind a network port.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Pillow's process-wide bomb guard fires inside Image.open with its own limit; the
# per-call `max_pixels` check below replaces it, with a message that names the size.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """These bytes cannot be used as an image; the message says why."""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens and fully decodes `data` (the first frame of an animation). The pixel count
    is checked from the header, before decoding, so a decompression bomb costs nothing."""
    image = probe_image(data, max_pixels)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode {image.format} data: {exc}") from exc
    return image


def probe_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens `data` and checks its header only (format, size, pixel limit): cheap, for
    callers that leave the full decode to the encoder."""
    if not data:
        raise ImageError("empty: zero bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})"
                         ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"too many pixels: {width}x{height} = {width * height} "
                         f"is over the limit of {max_pixels}")
    if width == 0 or height == 0:
        raise ImageError(f"empty image: {width}x{height}")
    return image


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

    def batch(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """(n, 3, r, r) float32 model input: ToTensor's /255, then Normalize's (x-m)/s."""
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255)
        return batch.sub(self.mean).div(self.std)


def image_pixels(data: bytes, stages: PreprocessStages, max_pixels: int) -> np.ndarray:
    """Decodes `data` and runs the PIL stage of clip's preprocess on it; with
    `stages.batch` this is `preprocess(Image.open(path))`, the reference input."""
    image = open_image(data, max_pixels)
    try:
        return stages.pixels(image)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot convert {image.format} {image.mode} image: {exc}") from exc
