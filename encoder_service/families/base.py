"""What the encoder needs from a model, whichever family it comes from.

A family (OpenAI `clip`, OpenCLIP) turns a model name into a built model and a `Traits`:
the tokenizer, the text forward pass that is exact for that text tower, the vector
dimension and the image preprocessing. The server reads only these, so it does not care
which family is loaded."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


class EmptyText(ValueError):
    """A text with no tokens at all (empty or only whitespace/punctuation the tokenizer drops)."""


class TextTokenizer(ABC):
    """A model's own tokenizer, one text at a time, reporting truncation.

    Subclasses give `kind` (what tokenizer it is, for GetModelInfo) and `truncation`
    (how a text over the context is cut, in words)."""

    kind: str = ""
    truncation: str = ""

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        # Hugging Face fast tokenizers keep padding/truncation state in the Rust object;
        # the decode pool calls from several threads, so calls are serialised.
        self._lock = threading.Lock()

    def tokenize(self, text: str) -> tuple[torch.Tensor, bool]:
        """(context_length,) token ids, exactly the model's reference tokenizer's row for
        `text`, and whether the text was cut to fit. Raises EmptyText."""
        with self._lock:
            return self._tokenize(text)

    @abstractmethod
    def _tokenize(self, text: str) -> tuple[torch.Tensor, bool]: ...

    def longest(self) -> torch.Tensor:
        """Tokens as long as the context allows (warm-up runs the worst case)."""
        return self.tokenize(" ".join(["photo"] * self.context_length))[0]


@dataclass(frozen=True)
class ImageSpec:
    """The image tower's input and how a picture becomes it (from the model's config)."""

    height: int
    width: int
    resize_mode: str  # "shortest" (resize then centre-crop), "longest" (fit and pad), "squash"
    interpolation: str  # "bicubic", "bilinear", ...
    crop: bool  # whether a centre crop follows the resize
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Traits:
    """Everything model-specific the server uses."""

    family: str  # "openai" | "open_clip"
    architecture: str  # "ViT-B/32", "ViT-B-16-SigLIP", ...
    dimension: int
    tokenizer: TextTokenizer
    # CPU token ids (n, context_length) -> (n, dimension) features on the model's device,
    # not normalised; runs under the caller's stream and autocast.
    encode_text: Callable[[torch.Tensor], torch.Tensor]
    image: ImageSpec
    input_dtype: torch.dtype  # what the image tower takes its pixels in
    # Autocast dtype the towers run under ("bf16", "fp16"; "" for none): bf16 always runs
    # so; fp16 does where the family's fp16 weight layout cannot run the model.
    autocast: str = ""
    # How the text forward pass runs: "trimmed" (causal tower pooled at end-of-text: only
    # the positions up to the batch's last end-of-text token are computed) or "full".
    text_path: str = "full"
