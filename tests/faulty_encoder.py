"""`python -m tests.faulty_encoder serve encoder ...`: the real encoder process with GPU
faults injected, since no test machine has a GPU to cause them:

* CLIPSEARCH_TEST_OOM_ABOVE=N: an image batch of more than N items raises
  torch.OutOfMemoryError, as a GPU with room for N images would. Warm-up's batches (all
  items alike) are exempt unless CLIPSEARCH_TEST_OOM_IN_WARMUP=1.
* an all-white image raises torch.OutOfMemoryError even alone;
* the text "poison pill" raises the sticky CUDA error of an illegal memory access.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from clipsearch.cli import main
from encoder_service.model import LoadedModel, clip

POISON = "poison pill"
_encode_images = LoadedModel.encode_images
_encode_tokens = LoadedModel.encode_tokens


def encode_images(self: LoadedModel, pixels: torch.Tensor) -> np.ndarray:
    limit = int(os.environ.get("CLIPSEARCH_TEST_OOM_ABOVE", "0"))
    alike = bool(torch.all(pixels == pixels[:1]))
    warm_up_exempt = alike and os.environ.get("CLIPSEARCH_TEST_OOM_IN_WARMUP") != "1"
    if limit and len(pixels) > limit and not warm_up_exempt:
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {len(pixels)} images "
                                     f"> {limit})")
    # Normalised white is >= 1.93 in every channel; no photo is that bright everywhere.
    white = pixels.amin(dim=(1, 2, 3)) > 1.9
    if bool(white.any()):
        raise torch.OutOfMemoryError("CUDA out of memory (injected: a white image)")
    return _encode_images(self, pixels)


def encode_tokens(self: LoadedModel, tokens: torch.Tensor) -> np.ndarray:
    poison = clip.tokenize([POISON])[0][: tokens.shape[1]]
    if bool((tokens == poison).all(dim=1).any()):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    return _encode_tokens(self, tokens)


LoadedModel.encode_images = encode_images  # type: ignore[method-assign]
LoadedModel.encode_tokens = encode_tokens  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
