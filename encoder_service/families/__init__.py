"""Model families the encoder serves: OpenAI `clip` (the default) and OpenCLIP."""

from encoder_service.families.base import EmptyText, ImageSpec, TextTokenizer, Traits

__all__ = ["EmptyText", "ImageSpec", "TextTokenizer", "Traits"]
