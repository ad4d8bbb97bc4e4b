"""The OpenAI `clip` family: its BPE tokenizer and the trimmed text forward pass.

Reference: `model.encode_text(clip.tokenize(t))`, `model.encode_image(preprocess(img))`."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from encoder_service.families.base import EmptyText, ImageSpec, TextTokenizer, Traits

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources, which warns on import
    import clip
    from clip.model import CLIP

# clip.clip._transform: Resize(n, bicubic) on the short side, CenterCrop(n), RGB, Normalize.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipBpeTokenizer(TextTokenizer):
    """clip.tokenize(text, truncate=True): OpenAI's BPE, start and end markers."""

    kind = "clip-bpe"

    def __init__(self, context_length: int) -> None:
        super().__init__(context_length)
        self.truncation = (f"texts over {context_length} tokens (start and end markers "
                           f"included) keep their first {context_length - 1} tokens and "
                           f"end-of-text")

    def _tokenize(self, text: str) -> tuple[torch.Tensor, bool]:
        bpe = clip.clip._tokenizer.encode(text)
        if not bpe:
            raise EmptyText("empty text (no tokens)")
        tokens = clip.tokenize(text, context_length=self.context_length, truncate=True)[0]
        return tokens, len(bpe) + 2 > self.context_length


def encode_text_trimmed(model: CLIP, tokens: torch.Tensor,
                        causal_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP.encode_text over only the first L positions, L = the last end-of-text
    position in the batch + 1. The text tower is causal (position i attends to <= i)
    and pools at end-of-text, so the dropped padding cannot change any output: the
    result equals model.encode_text(tokens) while costing L/77 of it.

    L and the end-of-text positions are read from `tokens` where they are (the CPU, in
    the service), so no device synchronisation is needed; `causal_mask` is CLIP's
    (context, context) mask already on the model's device, built here when not given."""
    end_of_text = tokens.argmax(dim=-1)
    length = int(end_of_text.max()) + 1
    device = model.positional_embedding.device
    tokens = tokens[:, :length].to(device, non_blocking=True)
    end_of_text = end_of_text.to(device, non_blocking=True)
    if causal_mask is None:
        causal_mask = model.build_attention_mask().to(device)
    x = model.token_embedding(tokens).type(model.dtype)
    x = x + model.positional_embedding[:length].type(model.dtype)
    x = x.permute(1, 0, 2)  # NLD -> LND, as CLIP's transformer expects
    mask = causal_mask[:length, :length].to(x.dtype)
    for block in model.transformer.resblocks:
        x = x + block.attn(*[block.ln_1(x)] * 3, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2)).type(model.dtype)
    rows = torch.arange(x.shape[0], device=device)
    return x[rows, end_of_text] @ model.text_projection


def openai_traits(model: Any, name: str) -> Traits:
    """The traits of an OpenAI CLIP already on its device and in its precision."""
    causal_mask = model.build_attention_mask().to(model.positional_embedding.device, model.dtype)
    side = int(model.visual.input_resolution)
    return Traits(
        family="openai", architecture=name, dimension=int(model.text_projection.shape[1]),
        tokenizer=ClipBpeTokenizer(int(model.context_length)),
        encode_text=lambda tokens: encode_text_trimmed(model, tokens, causal_mask),
        image=ImageSpec(height=side, width=side, resize_mode="shortest",
                        interpolation="bicubic", crop=True, mean=OPENAI_MEAN, std=OPENAI_STD),
        input_dtype=model.dtype, text_path="trimmed")
